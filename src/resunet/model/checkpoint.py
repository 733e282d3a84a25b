"""Checkpoints: one file holding the weights, the `ModelSpec` fields and the run record.

Files are written atomically (temporary file, fsync, rename) and read with
``torch.load(weights_only=True)`` -- no pickled code is ever executed. A SHA-256 of the weights is
stored and checked on load, so a corrupted file is refused instead of silently predicting garbage.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resunet.data.io import atomic_write
from resunet.errors import ModelError
from resunet.model.spec import ModelSpec

FORMAT = "resunet-checkpoint"
VERSION = 1
#: the weights at the end of the whole LR schedule (weights only), written when a run completes it
FINAL_CHECKPOINT = "final.pt"
#: the weights of the best validation Dice so far (the last weights when nothing validates)
BEST_CHECKPOINT = "best.pt"


def find_run_checkpoint(run_dir: Path | str) -> Path | None:
    """`run_checkpoint`, or None when the folder holds neither file."""
    for name in (FINAL_CHECKPOINT, BEST_CHECKPOINT):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def run_checkpoint(run_dir: Path | str) -> Path:
    """The checkpoint that is a run's model: ``final.pt`` when the run completed its LR schedule
    (nnU-Net also predicts with its final checkpoint), else ``best.pt`` (a run that stopped early,
    by early stopping, its time budget or a signal). The schedule ends at LR 0, so the final
    weights are the converged ones; the best-validated weights are a noisy pick when few cases
    validate (measured on MSD hippocampus, 20 labelled cases of which 2 validate: best.pt came from
    epoch 5 of 28 and scored 0.838 held-out Dice, final.pt 0.869). `ModelError` when neither exists."""
    found = find_run_checkpoint(run_dir)
    if found is not None:
        return found
    raise ModelError(f"{run_dir} holds no {FINAL_CHECKPOINT} or {BEST_CHECKPOINT}: it is not a finished `resunet "
                     f"train` run folder (an interrupted one continues with `resunet train --resume {run_dir}`)")


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (must hold ``state_dict``) atomically, adding format tags and checksum."""
    state = {k: v.detach().cpu() for k, v in payload["state_dict"].items()}
    full = {**payload, "state_dict": state, "format": FORMAT, "version": VERSION,
            "weights_sha256": weights_digest(state)}
    buffer = io.BytesIO()
    torch.save(full, buffer)
    with atomic_write(Path(path)) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint; every failure is a `ModelError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist; pass the final.pt, best.pt or last.pt of a run folder, or the folder")
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol says nothing to users
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's text would suggest weights_only=False: never for untrusted files
        raise ModelError(
            f"{path} is not a readable resunet checkpoint: it holds pickled objects other than tensors "
            "(possibly code), which resunet refuses without running them (weights_only), or it is no "
            "torch file at all; use the best.pt / last.pt of a `resunet train` run from a source you trust"
        ) from None
    except Exception as err:  # truncated zip, not a torch file
        raise ModelError(
            f"{path} is not a readable resunet checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "it may be truncated or of another format -- re-export it from the run folder"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path} is a torch file but not a resunet checkpoint (no '{FORMAT}' tag)")
    if payload.get("version", 0) > VERSION:
        raise ModelError(f"{path} was written by a newer resunet (format {payload['version']}); upgrade resunet")
    digest = weights_digest(payload["state_dict"])
    if digest != payload.get("weights_sha256"):
        raise ModelError(f"{path} failed its checksum (weights corrupted); use another copy of the checkpoint")
    return payload


@dataclass
class TransferReport:
    """What `load_matching_weights` did: tensors loaded, and tensors skipped with the reason."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def load_matching_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> TransferReport:
    """Copy every tensor whose name and shape match ``model``; report the rest (transfer learning)."""
    own = model.state_dict()
    report = TransferReport()
    matched = {}
    for name, tensor in state_dict.items():
        if name not in own:
            report.skipped.append((name, "not in this model"))
        elif own[name].shape != tensor.shape:
            report.skipped.append((name, f"shape {tuple(tensor.shape)} != {tuple(own[name].shape)}"))
        else:
            matched[name] = tensor
            report.loaded.append(name)
    for name in own:
        if name not in state_dict:
            report.skipped.append((name, "not in the checkpoint (kept its initial value)"))
    model.load_state_dict(matched, strict=False)
    return report


def checkpoint_payload(spec: ModelSpec, state_dict: dict[str, torch.Tensor], **record: Any) -> dict[str, Any]:
    """What a checkpoint file holds: the spec's fields (`ModelSpec.checkpoint_fields`), the weights
    and the run ``record`` (``epoch``, ``metrics``, ``history``, ``train_config``, ``training_state``)."""
    return {**spec.checkpoint_fields(), "state_dict": state_dict, **record}
