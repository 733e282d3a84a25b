"""The `resunet` command. Each subcommand lives in its own small function and exists only once it works.

Errors users cause (`ResunetError`) are printed as one message on stderr with exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

import resunet
from resunet.data.limits import DEFAULT_MAX_VOXELS
from resunet.errors import ResunetError

app = typer.Typer(
    name="resunet",
    help="Residual U-Net with spatial attention for medical image segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

# memory limits shared by predict and both servers (resunet.data.limits, resunet.infer.memory)
_MAX_VOXELS = typer.Option(DEFAULT_MAX_VOXELS, help="Most voxels x channels one image may declare "
                           "(checked from its header, before decoding); beyond: refused.")
_MAX_MEMORY_GB = typer.Option(None, help="Memory for the whole process in GiB (default: half of the "
                              "physical RAM); an image whose estimated need does not fit is refused.")


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


_FOLDS = typer.Option(
    1, "--folds", min=1, max=10, help="K > 1: K-fold cross-validation, one model per fold (each gets 1/K of the "
    "training time), ensembled by `resunet predict -m RUN_FOLDER`.")


@app.command()
def plan(
    dataset: Path = typer.Argument(..., help="nnU-Net / Decathlon / images+masks folder."),
    minutes: float = typer.Option(10.0, help="Training budget in minutes (the whole `resunet train` run)."),
    out: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the plan as YAML (for train --config)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="output_dir the plan writes into (default runs/NAME)."),
    semi_supervised: Optional[str] = typer.Option(
        None, "--semi-supervised", metavar="METHOD", help="Also train on the dataset's unlabelled images, by "
        "mean_teacher (timed with its step) or pseudo_label (its labelling passes reserved); see "
        "semi_supervised in docs/config.md."),
    folds: int = _FOLDS,
) -> None:
    """Fingerprint a dataset, time candidate networks here and print the training plan with reasons."""
    from resunet.plan import plan_dataset

    result = plan_dataset(dataset, minutes, output_dir=run_dir, semi_supervised=semi_supervised, folds=folds)
    console.print(result.table())
    if out is not None:
        result.write_yaml(out)
        console.print(f"plan written to {out}; train it with: resunet train --config {out}")


@app.command()
def train(
    dataset_arg: Optional[Path] = typer.Argument(
        None, metavar="[DATASET]", help="Dataset folder: plan for this machine and --minutes, then train."),
    minutes: Optional[float] = typer.Option(None, help="Budget for planning + training a DATASET (default 10)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file (see docs/config.md); with DATASET it overrides the plan."),
    overrides: list[str] = typer.Option([], "--set", help="Override a key: --set stages.0.epochs=5 (repeatable)."),
    dataset: Optional[Path] = typer.Option(None, help="Shortcut for --set data.dataset=... (no planning)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (output_dir)."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="auto (default: the fastest of fp32 / bf16 / fp16 this machine runs whose losses "
        "track fp32's, measured and cached), fp32, bf16 or fp16 (forced)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Checkpoint to load matching weights from."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder exactly."),
    folds: Optional[int] = typer.Option(
        None, "--folds", min=1, max=10, help="K > 1: K-fold cross-validation, one model per fold (with DATASET each "
        "gets 1/K of the training time), ensembled by `resunet predict -m RUN_FOLDER`."),
) -> None:
    """Train a model. `resunet train DATASET --minutes N` plans the whole run for this machine and
    budget (see `resunet plan`); `--config` / `--set` train a YAML config (and override a plan).
    Works under torchrun for DDP."""
    import time

    started = time.perf_counter()  # before the imports below (torch): the budget is the command's

    from resunet.train.config import load_config, parse_overrides
    from resunet.train.folds import ENSEMBLE_FILE, train_folds
    from resunet.train.signals import TrainingInterrupted
    from resunet.train.trainer import fit
    from resunet.model import run_checkpoint

    if resume is not None:
        if not (resume / "last.pt").is_file() and not (resume / ENSEMBLE_FILE).is_file():
            raise ResunetError(
                f"{resume} holds no run to resume (no last.pt, no {ENSEMBLE_FILE}); pass the output folder of an "
                "earlier `resunet train` (it holds config.yaml and last.pt)"
            )
        if dataset_arg is not None:
            raise ResunetError("--resume continues a run with its own saved plan; drop the DATASET argument")
        if config is None:
            config = resume / "config.yaml"
        overrides = [*overrides, f"output_dir={resume}"]
    if minutes is not None and dataset_arg is None:
        raise ResunetError("--minutes plans a run: give the DATASET folder as the first argument")
    tree = parse_overrides(overrides)
    for key, value in (("dataset", dataset), ("output_dir", out), ("precision", precision), ("init_from", init_from),
                       ("folds", folds)):
        if value is not None:
            target = tree.setdefault("data", {}) if key == "dataset" else tree
            target[key] = str(value) if isinstance(value, Path) else value
    if dataset_arg is not None:
        cfg = _planned_config(dataset_arg, 10.0 if minutes is None else minutes, config, tree, out, started,
                              folds or 1)
    else:
        cfg = load_config(config, tree)
    try:
        if cfg.folds > 1:
            folded = train_folds(cfg, resume=resume is not None)
            summary = (f"{len(folded.folds)} folds, cross-validation Dice {folded.cv_dice}; predict with "
                       f"`resunet predict -m {folded.run_dir}`")
            run_dir = folded.run_dir
        else:
            result = fit(cfg, resume=resume is not None)
            summary, run_dir = f"{result.epochs_run} epochs, best val Dice {result.best_val_dice}", result.run_dir
            summary += f"; model {run_checkpoint(run_dir).name}" if os.environ.get("RANK", "0") == "0" else ""
    except TrainingInterrupted as stop:  # SIGINT / SIGTERM: last.pt written; say where and how to resume
        Console(stderr=True).print(str(stop), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(stop.exit_code) from None
    if os.environ.get("RANK", "0") == "0":
        minutes_taken = (time.perf_counter() - started) / 60
        console.print(f"run folder: {run_dir} ({summary}, {minutes_taken:.1f} min)")


def _planned_config(dataset: Path, minutes: float, config: Optional[Path], tree: dict, out: Optional[Path],
                    started: float, folds: int = 1):
    """Plan ``dataset`` for ``minutes``, apply ``--config`` / ``--set``, keep the plan in the run folder."""
    from resunet.plan import plan_dataset

    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ResunetError("plan first (`resunet plan DATASET -o plan.yaml`), then torchrun ... train --config plan.yaml")
    result = plan_dataset(dataset, minutes, output_dir=out, started=started,
                          semi_supervised=_semi_requested(config, tree), folds=folds)
    console.print(result.table())
    cfg = result.overridden(config, tree)
    result.save_record(cfg.output_dir)
    return cfg


def _semi_requested(config: Optional[Path], tree: dict) -> Optional[str]:
    """The semi-supervised method ``--config`` / ``--set`` switch on (``semi_supervised.enabled``,
    ``.method``), None when off. The plan must know: it then accepts unlabelled images and times
    or reserves what the method costs."""
    import yaml

    from resunet.train.config import merge_trees

    extra = {}
    if config is not None:
        try:
            extra = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError):
            extra = {}  # the plan's own reading of --config reports it
    merged = merge_trees(extra if isinstance(extra, dict) else {}, tree)
    semi = merged.get("semi_supervised")
    if not (isinstance(semi, dict) and semi.get("enabled")):
        return None
    return str(semi.get("method") or "mean_teacher")


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


@app.command()
def predict(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint (.pt), exported .onnx, or a run folder "
                               "(its final.pt, else best.pt; a --folds run: its folds ensembled)."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Image file, DICOM series folder, or folder of cases."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (or file name for a single case)."),
    dicomweb: Optional[str] = typer.Option(
        None, "--dicomweb", help="Instead of --input: a DICOMweb root URL (e.g. http://pacs:8042/dicom-web); "
        "the series of --study / --series are fetched (QIDO-RS, WADO-RS) and get DICOM SEGs."),
    study: Optional[str] = typer.Option(None, "--study", help="With --dicomweb: every CT / MR series of this study."),
    series: Optional[str] = typer.Option(None, "--series", help="With --dicomweb: this series only."),
    stow: bool = typer.Option(False, "--stow", help="With --dicomweb: store each SEG back on the server (STOW-RS)."),
    tta: bool = typer.Option(False, "--tta", help="Average over flipped inputs (slower, smoother)."),
    batch_size: int = typer.Option(8, help="Slices / windows per forward pass."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    amp: bool = typer.Option(False, "--amp", help="bf16 (CPU) / fp16 (GPU) autocast."),
    largest_component: bool = typer.Option(False, help="Keep the largest connected component per class."),
    fill_holes: bool = typer.Option(False, help="Fill holes enclosed by one class."),
    min_size: int = typer.Option(0, help="Remove components smaller than this many voxels."),
    backend: str = typer.Option(
        "auto", help="auto (fastest matching fp32 on this machine, cached), eager, channels_last, bf16, fp16, "
        "onnx (implied by a .onnx model), tensorrt (NVIDIA GPU)."),
    png_visible: bool = typer.Option(
        False, "--png-visible", help="PNG masks for the eye: 0/255 for a binary model (labels spread over "
        "0..255 otherwise) instead of the label indices 0, 1, ..."),
    save_probabilities: bool = typer.Option(
        False, "--save-probabilities", help="Also write CASE.npz beside each mask: per-class probabilities "
        "(float32, the input's grid) with spacing, origin, direction and label names."),
    num_parts: int = typer.Option(1, help="Split the cases into this many parts (job arrays; nnU-Net's convention)."),
    part_id: int = typer.Option(0, help="Which part this process predicts: 0 .. --num-parts - 1."),
    resume: bool = typer.Option(False, "--continue", help="Skip cases whose outputs are already complete."),
    dicom_format: str = typer.Option("seg", help="What a DICOM series gets: seg (DICOM SEG) or rtstruct "
                                     "(RT Structure Set, ROI names = label names)."),
    max_voxels: int = _MAX_VOXELS,
    max_memory_gb: Optional[float] = _MAX_MEMORY_GB,
) -> None:
    """Segment images with a trained model; masks are written in the input's geometry.

    Pictures (PNG, JPEG, RGB or grey) give PNG masks of the same size and name.
    """
    from resunet.hardware import set_threads
    from resunet.infer.dicomweb import predict_dicomweb
    from resunet.infer.ensemble import open_predictor
    from resunet.infer.predictor import PostprocessConfig
    from resunet.infer.run import predict_inputs

    if (input is None) == (dicomweb is None):
        raise ResunetError("give either --input PATH or --dicomweb URL (with --study UID or --series UID)")
    if input is not None and (study or series or stow):
        raise ResunetError("--study, --series and --stow go with --dicomweb URL, not with --input")
    if dicomweb and (save_probabilities or num_parts != 1 or resume):
        raise ResunetError("--save-probabilities, --num-parts and --continue work with --input only")
    if batch_size < 1:
        raise ResunetError(f"--batch-size must be >= 1, got {batch_size}")
    if min_size < 0:
        raise ResunetError(f"--min-size must be >= 0 voxels, got {min_size}")
    set_threads()
    predictor = open_predictor(
        model, device=device, batch_size=batch_size, tta=tta, amp=amp, backend=backend,
        postprocess=PostprocessConfig(largest_component, fill_holes, min_size),
    )
    if dicomweb:
        (written, failed), skipped = predict_dicomweb(
            predictor, dicomweb, output, study=study, series=series, stow=stow, dicom_format=dicom_format,
            max_voxels=max_voxels, max_memory_gb=max_memory_gb), []
    else:
        written, failed, skipped = predict_inputs(
            predictor, input, output, png_visible=png_visible, save_probabilities=save_probabilities,
            num_parts=num_parts, part_id=part_id, skip_complete=resume, dicom_format=dicom_format,
            max_voxels=max_voxels, max_memory_gb=max_memory_gb)
    console.print(f"{len(written)} file(s) written to {output}"
                  + (f"; {len(skipped)} case(s) already complete, skipped" if skipped else ""))
    if predictor.backend_choice is not None:
        console.print(predictor.backend_choice.summary(), soft_wrap=True)
    if failed:
        lines = "\n".join(f"  {case}: {why}" for case, why in failed.items())
        raise ResunetError(f"{len(failed)} case(s) failed (the others were written):\n{lines}")


@app.command()
def evaluate(
    pred: Path = typer.Option(..., "--pred", help="Folder of predicted label maps."),
    gt: Path = typer.Option(..., "--gt", help="Folder of ground-truth label maps (same file names)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the CSVs (default: --pred)."),
    labels: Optional[Path] = typer.Option(None, help="dataset.json holding the label names (default: values found)."),
    tolerance_mm: float = typer.Option(1.0, "--tolerance", help="Surface Dice / boundary F1 tolerance in mm."),
    images: Optional[Path] = typer.Option(
        None, help="Folder of the images (NIfTI, PNG, JPEG; RGB pictures shown in colour): adds "
        "worst/median/best overlays to report.md."),
) -> None:
    """Dice, IoU, sensitivity, specificity, precision, HD95, ASSD, surface Dice, boundary F1 per case and class."""
    from resunet.evaluation import evaluate_and_write, label_names
    from resunet.report.report import write_report

    if tolerance_mm < 0:
        raise ResunetError(f"--tolerance must be >= 0 mm, got {tolerance_mm}")
    result, paths = evaluate_and_write(pred, gt, label_names(labels, gt), tolerance_mm, out or pred)
    paths["report"] = write_report(result, pred, gt, images, out or pred)
    table = Table(title=f"{len({r['case'] for r in result.rows})} case(s): mean ± sd")
    metrics = ("dice", "iou", "hd95", "assd", "surface_dice", "boundary_f1")
    table.add_column("class")
    for m in metrics:
        table.add_column(m, justify="right")
    summary = result.summary()
    for label, name in sorted({(r["label"], r["name"]) for r in summary}):
        get = {r["metric"]: r for r in summary if r["label"] == label}
        table.add_row(name, *[f"{get[m]['mean']:.4f} ± {get[m]['sd']:.4f}" for m in metrics])
    console.print(table)
    for what, cases in (("no prediction", result.missing_pred), ("no ground truth", result.missing_gt)):
        if cases:
            console.print(f"[yellow]{len(cases)} case(s) with {what}:[/] {', '.join(cases)}")
    for case, why in result.failed.items():
        console.print(f"[red]{case} failed:[/] {why}")
    console.print(f"written: {', '.join(str(p) for p in paths.values())}")


@app.command()
def compare(
    dataset: Path = typer.Argument(..., help="Dataset folder (nnU-Net / Decathlon / images+masks)."),
    models: str = typer.Option("unet,attention_unet,resunet", help="Comma-separated model names."),
    minutes: float = typer.Option(8.0, "--budget", help="Training budget per model, in minutes."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Shared training config (default: planned for the budget)."),
    out: Path = typer.Option(Path("resunet-compare"), "--out", "-o", help="Output folder."),
) -> None:
    """Train several networks under the same budget and compare Dice, HD95, boundary F1, size and speed."""
    from resunet.compare import compare_models
    from resunet.nets import MODELS
    from resunet.plan import plan_dataset
    from resunet.train.config import load_config

    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        raise ResunetError(f"unknown model(s) {unknown}; valid names: {', '.join(MODELS)}")
    if minutes <= 0:
        raise ResunetError(f"--budget must be positive, got {minutes}")
    if config is not None:
        base = load_config(config, {"data": {"dataset": str(dataset)}})
    else:
        base = plan_dataset(dataset, minutes, output_dir=out / "plan").config
    compare_models(base, names, out, minutes)


@app.command()
def export(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint (final.pt / best.pt) of a training run."),
    output: Path = typer.Option(..., "--output", "-o", help="File to write (.onnx or .pt/.ts)."),
    format: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript."),
) -> None:
    """Export a checkpoint as a self-describing ONNX (or TorchScript) file; checks parity before finishing."""
    from resunet.data.io import make_folder
    from resunet.export.onnx import example_input, export_checked
    from resunet.export.torchscript import export_torchscript
    from resunet.model import load_model

    if format not in ("onnx", "torchscript"):
        raise ResunetError(f"--format must be onnx or torchscript, got {format!r}")
    if model.suffix.lower() == ".onnx":
        raise ResunetError(f"{model} is already an ONNX file; pass the checkpoint (.pt) it came from")
    loaded = load_model(model)
    make_folder(output.parent)
    if format == "torchscript":
        export_torchscript(loaded.network, loaded.spec, output)
        console.print(f"TorchScript written to {output}")
        return
    diff = export_checked(loaded.network, loaded.spec, output)
    shape = tuple(example_input(loaded.spec).shape)
    console.print(f"ONNX written to {output} (max |logit diff| vs PyTorch on {shape}: {diff:.2e})", soft_wrap=True)


@app.command()
def bench(
    base: int = typer.Option(64, help="ResUNet base width of the backend benchmark."),
    size: int = typer.Option(256, help="Slice size (pixels per side) of the backend benchmark."),
    slices: int = typer.Option(16, help="Slices in the backend benchmark's volume."),
    repeats: int = typer.Option(3, help="Timed repeats (median reported)."),
    peers: bool = typer.Option(True, "--peers/--no-peers",
                               help="Also run the quick MONAI comparisons (whole-volume predict, training step)."),
) -> None:
    """Quick benchmark set: auto backend vs fp32 eager; whole-volume predict and training step vs MONAI."""
    import subprocess

    import resunet as package
    from resunet.bench import bench_backends
    from resunet.hardware import machine_key

    if min(base, size, slices, repeats) < 1:
        raise ResunetError("--base, --size, --slices and --repeats must be positive")
    r = bench_backends(base=base, size=size, slices=slices, repeats=repeats)
    table = Table(title=f"predict {slices} x {size}^2, ResUNet base {base}")
    for col in ("backend", "seconds", "ms / slice"):
        table.add_column(col, justify="right")
    for name in ("eager", "auto"):
        label = name if name == "eager" else f"auto ({r['chosen']})"
        table.add_row(label, f"{r['seconds'][name]:.2f}", f"{r['ms_per_slice'][name]:.0f}")
    console.print(table)
    console.print("machine: " + machine_key(__import__("torch").device("cpu")), soft_wrap=True)
    console.print(f"speed-up auto / eager: {r['ratio']:.2f}x; mask Dice auto vs eager: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in r["dice"].items()), soft_wrap=True)
    console.print("calibration (ms per batch): " + ", ".join(
        f"{k} {v:.0f}" + (" rejected" if k in r["rejected"] else "") for k, v in r["calibration_ms"].items()),
        soft_wrap=True)
    if not peers:
        return
    scripts = Path(package.__file__).resolve().parents[2] / "benchmarks"
    quick = {  # the full-size runs and their recorded figures: benchmarks/RESULTS.md
        "bench_predict.py": ["--depth-slices", "8", "--size", "512", "--base", "32", "--repeats", "1"],
        "bench_train.py": ["--iterations", "2", "--data-batches", "3", "--workers", "2"],
    }
    try:
        import monai  # noqa: F401
    except ImportError:
        console.print("MONAI comparisons skipped: MONAI is not installed (pip install -e '.[test]')")
        return
    if not scripts.is_dir():
        console.print(f"MONAI comparisons skipped: {scripts} not found (they run from a source checkout)")
        return
    for script, args in quick.items():
        console.print(f"\n[bold]$ python benchmarks/{script} {' '.join(args)}[/]")
        done = subprocess.run([sys.executable, str(scripts / script), *args], cwd=scripts)
        if done.returncode:
            raise ResunetError(f"benchmarks/{script} failed with exit status {done.returncode}")


serve_app = typer.Typer(help="Serve a model: HTTP API with dynamic batching, or a DICOM node for a PACS.",
                        no_args_is_help=True)
app.add_typer(serve_app, name="serve")


# ---- serve http (resunet.serve.http)


@serve_app.command("http")
def serve_http(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint (.pt), exported model (.onnx) or a run folder "
                               "(a --folds run: its folds ensembled)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, help="TCP port (0: pick a free one; the URL is printed)."),
    max_batch: int = typer.Option(8, help="Most requests per model call (1 turns batching off)."),
    max_wait_ms: float = typer.Option(10.0, help="How long the first request of a batch waits for others (ms)."),
    queue_size: int = typer.Option(64, help="Requests that may wait; beyond that: 503 + Retry-After."),
    max_upload_mb: float = typer.Option(512.0, help="Largest upload accepted (MiB); beyond that: 413."),
    token: Optional[str] = typer.Option(None, envvar="RESUNET_TOKEN", show_envvar=True,
                                        help="Require 'Authorization: Bearer TOKEN' (prefer the env variable)."),
    backend: Optional[str] = typer.Option(None, help="eager (default for a checkpoint), channels_last, bf16, fp16, "
                                          "onnx (the default and only choice for a .onnx model) or auto."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    batch_size: int = typer.Option(8, help="Slices / windows per forward pass inside a model call."),
    log_level: str = typer.Option("info", help="uvicorn log level (warning hides the access log)."),
    max_voxels: int = _MAX_VOXELS,
    max_memory_gb: Optional[float] = _MAX_MEMORY_GB,
    memory_wait_s: float = typer.Option(5.0, help="Seconds a request waits for memory; then 503 + Retry-After."),
    studies: Optional[Path] = typer.Option(
        None, "--studies", help="Folder of images: turns on the MONAI Label API (/info/, /datastore/, "
        "/infer/MODEL for 3D Slicer / OHIF) with this folder as its datastore."),
) -> None:
    """HTTP API: POST /v1/segment (NIfTI / PNG in, mask out), /health, /v1/model, /metrics; dynamic batching."""
    from resunet.infer.ensemble import open_predictor
    from resunet.serve.http import run_http_server
    from resunet.serve.monai_label import monai_label_routes

    routes = [monai_label_routes(studies)] if studies is not None else []
    predictor = open_predictor(model, backend=backend, device=device, batch_size=batch_size)
    run_http_server(predictor, host=host, port=port, log_level=log_level, max_batch=max_batch,
                    max_wait_ms=max_wait_ms, queue_size=queue_size, max_upload_mb=max_upload_mb, token=token,
                    max_voxels=max_voxels, max_memory_gb=max_memory_gb, memory_wait_s=memory_wait_s, routes=routes)


# ---- serve dicom (resunet.serve.dicom_node)


@serve_app.command("dicom")
def serve_dicom(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint (.pt) or a run folder (its final.pt, else best.pt; a --folds run: its folds ensembled)."),
    dest: Optional[str] = typer.Option(
        None, "--dest", help="Where SEGs go by C-STORE: AE@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242)."),
    dest_dicomweb: Optional[str] = typer.Option(
        None, "--dest-dicomweb", help="Where SEGs go by STOW-RS: a DICOMweb root URL (e.g. "
        "http://127.0.0.1:8042/dicom-web); with or instead of --dest."),
    allow_aet: list[str] = typer.Option([], "--allow-aet", help="Calling AE title allowed to send (repeatable; all others are refused)."),
    spool: Path = typer.Option(..., "--spool", help="Private folder for received series, SEGs and failures."),
    ae_title: str = typer.Option("RESUNET", "--ae-title", help="This node's AE title."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(11112, help="DICOM port to listen on."),
    series_timeout: float = typer.Option(5.0, help="A series is complete after this many seconds without a new instance."),
    max_series_instances: int = typer.Option(2000, help="Refuse instances beyond this many per series."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    batch_size: int = typer.Option(8, help="Slices / windows per forward pass."),
    tta: bool = typer.Option(False, "--tta", help="Average over flipped inputs (slower, smoother)."),
    max_voxels: int = _MAX_VOXELS,
    max_memory_gb: Optional[float] = _MAX_MEMORY_GB,
) -> None:
    """DICOM node: receive CT/MR series from a PACS, segment each, send a DICOM SEG to --dest / --dest-dicomweb."""
    from resunet.infer.ensemble import open_predictor
    from resunet.serve.dicom_node import Destination, DicomNodeConfig, run_dicom_node

    config = DicomNodeConfig(
        spool=spool, destination=Destination.parse(dest) if dest else None, allowed_aets=tuple(allow_aet),
        ae_title=ae_title, host=host, port=port, series_timeout=series_timeout,
        max_series_instances=max_series_instances, max_voxels=max_voxels, max_memory_gb=max_memory_gb,
        dicomweb=dest_dicomweb,
    )
    run_dicom_node(open_predictor(model, device=device, batch_size=batch_size, tta=tta), config)


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
