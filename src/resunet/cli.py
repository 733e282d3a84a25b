"""The `resunet` command. Each subcommand lives in its own small function and exists only once it works.

Errors users cause (`ResunetError`) are printed as one message on stderr with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
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


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file (see docs/config.md)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a key: --set stages.0.epochs=5 (repeatable)."),
    dataset: Optional[Path] = typer.Option(None, help="Shortcut for --set data.dataset=..."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (output_dir)."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision (bf16 on CPU, fp16 on GPU)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Checkpoint to load matching weights from."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder exactly."),
) -> None:
    """Train a model from a YAML config (and/or --set overrides); works under torchrun for DDP."""
    from resunet.train.config import load_config, parse_overrides
    from resunet.train.trainer import fit

    if resume is not None:
        if config is None:
            config = resume / "config.yaml"
        overrides = [*overrides, f"output_dir={resume}"]
    tree = parse_overrides(overrides)
    for key, value in (("dataset", dataset), ("output_dir", out), ("amp", amp), ("init_from", init_from)):
        if value is not None:
            target = tree.setdefault("data", {}) if key == "dataset" else tree
            target[key] = str(value) if isinstance(value, Path) else value
    cfg = load_config(config, tree)
    result = fit(cfg, resume=resume is not None)
    console.print(f"run folder: {result.run_dir} ({result.epochs_run} epochs, best val Dice {result.best_val_dice})")


@app.command()
def demo(
    out: Path = typer.Option(Path("resunet-demo"), "--out", "-o", help="Folder for data, run, predictions, overlays."),
    minutes: float = typer.Option(8.0, help="Training budget in minutes (the whole demo adds ~1-2 min)."),
) -> None:
    """Train a 2.5-D ResUNet on real brain MRI (MNI152 tissue maps) on CPU, predict and evaluate held-out slabs."""
    from resunet.demo import run_demo

    if minutes <= 0:
        raise ResunetError(f"--minutes must be positive, got {minutes}")
    run_demo(out, minutes)


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
