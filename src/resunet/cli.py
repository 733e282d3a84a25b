"""The `resunet` command. Each subcommand lives in its own small function and exists only once it works.

Errors users cause (`ResunetError`) are printed as one message on stderr with exit code 2.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

import resunet
from resunet.errors import ResunetError

app = typer.Typer(
    name="resunet",
    help="Residual U-Net with spatial attention for medical image segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"resunet {resunet.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Residual U-Net with spatial attention for medical image segmentation."""


@app.command()
def models(
    size: int = typer.Option(256, help="Input size (pixels per side) for the GMAC column."),
    spatial_dims: int = typer.Option(2, "--dims", help="2 or 3."),
    base_channels: list[int] = typer.Option([32, 64], "--base", help="Base widths to list."),
    in_channels: int = typer.Option(1, help="Input channels."),
    out_channels: int = typer.Option(1, help="Output channels (classes)."),
) -> None:
    """List the available networks with parameters and GMAC at a given input size."""
    from resunet.nets import MODELS, build_model, count_macs, count_parameters

    if size <= 0:
        raise ResunetError(f"--size must be positive, got {size}")
    table = Table(title=f"Networks ({spatial_dims}-D, input {in_channels}x{'x'.join([str(size)] * spatial_dims)})")
    for col in ("model", "base", "params (M)", "GMAC"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name in MODELS:
        for base in base_channels:
            net = build_model(
                name, spatial_dims=spatial_dims, in_channels=in_channels,
                out_channels=out_channels, base_channels=base,
            )
            div = net.divisor
            s = -(-size // div) * div
            macs = count_macs(net, (1, in_channels, *([s] * spatial_dims)))
            table.add_row(name, str(base), f"{count_parameters(net) / 1e6:.2f}", f"{macs / 1e9:.1f}")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    try:
        app(args=argv, prog_name="resunet")
    except ResunetError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)
