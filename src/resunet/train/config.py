"""One pydantic model describing a training run; read from YAML, overridable from the CLI.

The resolved config is written to ``<run>/config.yaml`` and stored in every checkpoint, so a run
can be repeated and a checkpoint can be predicted with nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from resunet.data.augment import AugmentConfig
from resunet.data.preprocess import PreprocessConfig
from resunet.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the cases come from, how they are split, preprocessed and sampled."""

    dataset: Path = Field(description="nnU-Net / Decathlon / images+masks folder")
    cache_dir: Path | None = Field(None, description="preprocessed cache; default ~/.cache/resunet")
    val_cases: list[str] = Field(default_factory=list, description="explicit validation case ids")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="used when val_cases is empty")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    mode: Literal["2d", "3d"] = Field("2d", description="2d: a 2-D network slice by slice (2.5-D with context); 3d: 3-D patches")
    context: int = Field(0, ge=0, description="2.5-D: neighbouring slices on each side as channels")
    foreground_fraction: float = Field(0.33, ge=0.0, le=1.0, description="share of patches centred on a labelled voxel")


class ModelConfig(_Strict):
    name: Literal["resunet", "unet", "attention_unet", "resunet_transformer"] = Field(
        "resunet", description="network (`resunet models` lists them)")
    base_channels: int = Field(32, ge=1, description="channels of the first level; doubled per level")
    depth: int = Field(5, ge=2, le=7, description="levels (poolings + 1); patches must be multiples of 2**(depth-1)")
    fusion: Literal["early", "late"] = Field(
        "early", description="how the modalities (image channels) meet: early = stacked as input channels of one "
        "encoder; late = one encoder branch per modality (its 2.5-D slices), fused per level, one shared decoder")
    transformer_layers: int = Field(2, ge=1, description="resunet_transformer: Transformer blocks at the bottleneck "
                                    "(ignored by the other networks)")
    transformer_heads: int = Field(4, ge=1, description="resunet_transformer: attention heads; must divide the token "
                                   "width (transformer_dim, else base_channels * 2**(depth-1))")
    transformer_dim: int | None = Field(None, ge=1, description="resunet_transformer: token width (a linear projection "
                                        "in and out of the bottleneck); None: the bottleneck width, no projection")

    def build_kwargs(self) -> dict[str, Any]:
        """`resunet.nets.build_model` keyword arguments of this network besides the data-given
        ``spatial_dims`` / ``in_channels`` / ``out_channels``: widths, depth and the model's own
        settings (`resunet.nets.model_options`: only those the chosen network takes)."""
        from resunet.nets import model_options

        own = {key: getattr(self, key) for key in model_options(self.name)}
        return {"base_channels": self.base_channels, "depth": self.depth, **own}


class LossConfig(_Strict):
    dice_weight: float = Field(0.5, ge=0.0, description="weight of the soft Dice term")
    focal_weight: float = Field(0.5, ge=0.0, description="weight of the focal term (gamma 0: cross-entropy)")
    alpha: float | None = Field(0.7, ge=0.0, le=1.0, description="focal class balance (foreground weight, binary); None: none")
    gamma: float = Field(2.0, ge=0.0, description="focal exponent; 0 makes the focal term cross-entropy")
    batch_dice: bool = Field(True, description="Dice over the whole batch (nnU-Net) instead of per sample")


class OptimizerConfig(_Strict):
    name: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with Nesterov momentum")
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="decoupled (AdamW) / L2 (SGD) weight decay")
    momentum: float = Field(0.99, ge=0.0, lt=1.0, description="SGD only (nesterov)")


class ScheduleConfig(_Strict):
    kind: Literal["poly", "cosine", "constant"] = Field("poly", description="LR decay over all stages' iterations")
    warmup_iterations: int = Field(0, ge=0, description="linear LR warm-up from 0, in iterations")
    poly_exponent: float = Field(0.9, gt=0.0, description="poly: lr * (1 - t / T) ** exponent")


class StageConfig(_Strict):
    """One stage of a multi-stage run: its own patch / slice size, batch size, epochs, LR scale."""

    patch_size: list[int] = Field(description="(H, W) for 2-D, (D, H, W) for 3-D, in voxels")
    batch_size: int = Field(ge=1, description="patches per iteration")
    epochs: int = Field(ge=1, description="epochs of this stage")
    iterations_per_epoch: int = Field(50, ge=1, description="iterations per epoch (an epoch is a fixed number of steps)")
    lr_scale: float = Field(1.0, gt=0.0, description="multiplies optimizer.lr during this stage")


class SemiSupervisedConfig(_Strict):
    """Training on unlabelled images too, by one of two methods: ``mean_teacher``
    (`resunet.train.semi_supervised`: an EMA teacher of the student, and a consistency loss between
    their predictions on two views of the same patch) or ``pseudo_label``
    (`resunet.train.pseudo_labels`: the model labels the unlabelled images during the run, and they
    train as labelled cases from then on)."""

    enabled: bool = Field(
        False, description="also train on unlabelled images: nnU-Net imagesTr/ images without a labelsTr/ file, "
        "imagesUnlabelled/ (channel files named as in imagesTr/; MSD: one file per case), MSD 'training' entries "
        "without 'label', images/ pictures without a mask; never used as labelled (training or validation)")
    method: Literal["mean_teacher", "pseudo_label"] = Field(
        "mean_teacher", description="mean_teacher: a consistency loss on every step (a step costs more); "
        "pseudo_label: the model's own labels of the unlabelled images join the labelled cases at the "
        "pseudo_label_at points of the schedule (a step costs what a supervised one does)")
    pseudo_label_at: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        [0.4, 0.7], min_length=1, description="pseudo_label: fractions of the epochs after which the current model "
        "(re)labels the unlabelled images; the LR schedule restarts there; from the first on, half "
        "of the sampled cases are labelled, half pseudo-labelled")
    pseudo_label_curriculum: bool = Field(
        True, description="pseudo_label: at the k-th of K labellings only the k/K most confident unlabelled cases "
        "train (confidence: mean top-class probability over the voxels labelled foreground); False: all of them")
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0, description="teacher = d * teacher + (1 - d) * student after "
                             "every step (d = min(ema_decay, 1 - 1 / (step + 1)): the teacher starts as the student)")
    consistency: Literal["mse", "kl"] = Field(
        "mse", description="mse: squared difference of the class probabilities (summed over classes, mean over "
        "voxels); kl: KL divergence of the student's probabilities from the teacher's, mean over voxels")
    consistency_weight: float = Field(1.0, ge=0.0, description="weight of the consistency loss after the ramp-up "
                                      "(added to the supervised Dice + focal loss)")
    rampup_fraction: float = Field(0.25, ge=0.0, le=1.0, description="share of all iterations over which the "
                                   "consistency weight rises from 0 along a sigmoid (exp(-5 (1 - t)^2), rescaled)")
    unlabelled_batch_size: int | None = Field(None, ge=1, description="unlabelled patches per iteration; None: the "
                                              "stage's batch_size (they share the student's forward pass)")
    view_noise: float = Field(0.1, ge=0.0, description="Gaussian noise added to each view, independently, as a "
                              "fraction of each patch's intensity std (on top of augment's intensity transforms)")


class TrainConfig(_Strict):
    """A whole training run: data, network, loss, optimiser, schedule, stages, augmentation, run settings."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    stages: list[StageConfig] = Field(
        default_factory=lambda: [
            StageConfig(patch_size=[128, 128], batch_size=16, epochs=20),
            StageConfig(patch_size=[256, 256], batch_size=4, epochs=10),
        ],
        min_length=1,
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    semi_supervised: SemiSupervisedConfig = Field(default_factory=SemiSupervisedConfig)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: the fastest of fp32 / bf16 (native bf16 CPUs, CUDA) / fp16 (CUDA) whose losses "
        "track fp32's, timed on the first batches and cached per machine (`resunet.train.precision`)")
    memory_format: Literal["auto", "contiguous", "channels_last"] = Field(
        "auto", description="auto: contiguous or channels-last (channels-last-3d for 3-D), whichever trains faster here")
    prefetch_batches: int | None = Field(
        None, ge=0, le=8, description="batches sampled and augmented in a background thread while the model trains "
        "(0: in the training loop; default: 1 on CUDA, 0 on the CPU, where the thread competes with the step for "
        "the same cores); the batches are identical either way")
    folds: int = Field(
        1, ge=1, le=10, description="K > 1: K-fold cross-validation, one model per fold in <output_dir>/fold_<k> "
        "(fold k validates on the k-th of K seeded parts; data.val_cases / val_fraction are not used), ensembled "
        "by `resunet predict -m <output_dir>` (`resunet.train.folds`)")
    val_interval: int = Field(1, ge=1, description="validate every N epochs")
    val_batch_size: int = Field(8, ge=1, description="slices / windows per forward pass in validation")
    early_stopping_patience: int | None = Field(None, ge=1, description="validations without improvement")
    seed: int = Field(0, description="seeds weights, the split and every batch (a resumed run sees the same batches)")
    deterministic: bool = Field(False, description="deterministic algorithms only (slower on CUDA)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else the CPU")
    output_dir: Path = Field(Path("runs/resunet"), description="run folder: config.yaml, best.pt, last.pt, metrics.csv, curves.png")
    init_from: Path | None = Field(None, description="checkpoint whose matching weights start the run (transfer learning)")
    freeze_encoder_epochs: int = Field(0, ge=0, description="first epochs that train the decoder only (with init_from)")
    max_minutes: float | None = Field(
        None, gt=0, description="wall-clock budget: no new epoch starts once the next one would exceed it"
    )
    plan: dict[str, Any] | None = Field(
        None, description="what `resunet plan` chose and why; a planned run that falls behind its pace trains "
        "fewer epochs (LR schedule recomputed) to end within max_minutes"
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        """Configs (and checkpoints) written before ``precision`` / ``memory_format`` said
        ``amp: true|false`` and ``channels_last: true|false``."""
        if isinstance(data, dict) and ("amp" in data or "channels_last" in data):
            data = dict(data)
            if "amp" in data:
                amp = data.pop("amp")
                data.setdefault("precision", "bf16" if amp else "fp32")
            if "channels_last" in data:
                data.setdefault("memory_format", "channels_last" if data.pop("channels_last") else "contiguous")
        return data

    @model_validator(mode="after")
    def _check_stages(self) -> "TrainConfig":
        dims = 2 if self.data.mode == "2d" else 3
        for i, stage in enumerate(self.stages):
            if len(stage.patch_size) != dims:
                raise ValueError(
                    f"stages[{i}].patch_size has {len(stage.patch_size)} values; mode {self.data.mode} needs {dims}"
                )
            div = 2 ** (self.model.depth - 1)
            if any(s % div for s in stage.patch_size):
                raise ValueError(
                    f"stages[{i}].patch_size {stage.patch_size} must be divisible by {div} (2**(depth-1))"
                )
        if self.data.context and self.data.mode != "2d":
            raise ValueError("data.context (2.5-D) needs data.mode '2d'")
        return self

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; see `resunet train --help`)")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid training configuration in {source}:\n" + "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["data.mode=3d", "stages.0.epochs=5"]`` -> nested dict (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def merge_trees(base: Any, override: Any) -> Any:
    """``override`` merged into ``base`` (nested dicts; a dict with digit keys edits list items)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge_trees(base.get(k), v) if k in base else v
        return out
    if isinstance(base, list) and isinstance(override, dict) and all(str(k).isdigit() for k in override):
        out_list = list(base)
        for k, v in override.items():
            i = int(k)
            if i >= len(out_list):
                raise ConfigError(f"override index {i} is out of range (list has {len(out_list)} items)")
            out_list[i] = merge_trees(out_list[i], v)
        return out_list
    return override


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML file (optional), apply nested ``overrides``, validate."""
    tree: dict[str, Any] = {}
    source = "the command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; check the --config path") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (data:, model:, ...)")
    if overrides:
        tree = merge_trees(tree, overrides)
    return config_from_dict(tree, source)


def config_from_dict(tree: dict[str, Any], source: str = "the configuration") -> TrainConfig:
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
