"""`ModelSpec`: the model contract -- everything prediction needs except the weights.

One owner for what a trained model is: the network to rebuild (``model``: `build_model` keyword
arguments), the preprocessing it was trained with, its label names, how it sees a case
(``inference``: 2-D slices with 2.5-D ``context`` or 3-D windows of ``patch_size``), the plan that
chose it (``plan``, or None), and the network's interface (``spatial_dims``, ``in_channels``,
``out_channels``, ``divisor``). Checkpoints store it as top-level fields beside the weights
(`resunet.model.checkpoint`), exported ONNX / TorchScript files embed its JSON (``to_dict``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from resunet.data.preprocess import PreprocessConfig
from resunet.errors import ModelError

SPEC_FORMAT = "resunet-model-spec"
SPEC_VERSION = 1
#: the checkpoint fields that hold the spec (the rest of a checkpoint is weights and run record)
CHECKPOINT_FIELDS = ("model", "preprocess", "labels", "inference", "plan")


class InferenceSpec(BaseModel):
    """How the model sees a case: ``mode`` 2-D (slice by slice, ``context`` neighbours on each side
    as extra channels) or 3-D (sliding windows of ``patch_size`` voxels, array order).

    ``modality_dropout``: the ``augment.modality_dropout`` it was trained with; > 0 means it has
    seen cases with modalities zero-filled, so a case missing one may be predicted (zero-filled
    after normalisation). ``channel_names``: the training dataset's name of each image channel
    (modality), empty when unknown (checkpoints written before these fields existed)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["2d", "3d"]
    context: int = Field(0, ge=0)
    patch_size: list[int]
    modality_dropout: float = Field(0.0, ge=0.0, le=1.0)
    channel_names: list[str] = Field(default_factory=list)


class ModelSpec(BaseModel):
    """See the module docstring. ``labels``: name -> value, 0 = background."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: dict[str, Any]
    preprocess: PreprocessConfig
    labels: dict[str, int]
    inference: InferenceSpec
    plan: dict[str, Any] | None = None
    spatial_dims: int
    in_channels: int
    out_channels: int
    divisor: int
    weights_sha256: str | None = None

    @classmethod
    def for_network(cls, network: Any, *, preprocess: PreprocessConfig | dict[str, Any], labels: dict[str, int],
                    inference: InferenceSpec | dict[str, Any], plan: dict[str, Any] | None = None,
                    weights_sha256: str | None = None) -> "ModelSpec":
        """The spec of a built network (a `resunet.nets` model) trained with these settings."""
        from resunet.nets import model_config

        return cls.model_validate({
            "model": model_config(network),
            "preprocess": preprocess if isinstance(preprocess, dict) else preprocess.model_dump(mode="json"),
            "labels": labels, "plan": plan, "weights_sha256": weights_sha256,
            "inference": inference if isinstance(inference, dict) else inference.model_dump(),
            "spatial_dims": network.spatial_dims, "in_channels": network.in_channels,
            "out_channels": network.out_channels, "divisor": network.divisor,
        })

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "ModelSpec":
        """Validate a spec read from ``source`` (a checkpoint, an ONNX file); `ModelError` naming it."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ModelError(
                f"{source} does not hold a complete resunet model ({where}: {first['msg']}); "
                "use the best.pt / last.pt of a `resunet train` run or a file written by `resunet export`"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, tagged with the spec format (what exported files embed)."""
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION, **self.model_dump(mode="json")}

    def checkpoint_fields(self) -> dict[str, Any]:
        """The fields a checkpoint stores beside its weights (`CHECKPOINT_FIELDS`)."""
        data = self.model_dump(mode="json")
        return {k: data[k] for k in CHECKPOINT_FIELDS}

    @property
    def num_input_channels(self) -> int:
        """Image channels (modalities) a case must have: network inputs / (2 * context + 1)."""
        return self.in_channels // (2 * self.inference.context + 1)

    @property
    def accepts_missing_modality(self) -> bool:
        """Trained with modality dropout: a case may lack some (not all) of its modalities."""
        return self.inference.modality_dropout > 0 and self.num_input_channels > 1

    def channel_name(self, channel: int) -> str:
        """The training dataset's name of image channel ``channel`` (``channel 1`` when unknown)."""
        names = self.inference.channel_names
        if len(names) == self.num_input_channels and names[channel] not in ("", str(channel)):
            return names[channel]
        return f"channel {channel}"

    @property
    def label_values(self) -> list[int]:
        """Foreground label values, ascending."""
        return sorted(v for v in self.labels.values() if v != 0)

    def build_network(self) -> Any:
        """A freshly initialised network of this spec's architecture (load weights into it)."""
        from resunet.nets import build_model

        config = dict(self.model)
        return build_model(config.pop("name"), **config)
