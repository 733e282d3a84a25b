"""One optimisation step and one validation pass: the two functions the training loop calls."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from resunet.hardware import autocast
from resunet.infer.postprocess import logits_to_labels
from resunet.infer.predictor import predict_case_logits
from resunet.metrics import dice_from_counts

def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    dtype: torch.dtype | None = None,
    frozen: Sequence[nn.Parameter] = (),
    extra_images: torch.Tensor | None = None,
    extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Forward, loss, backward, optimiser step. ``images`` ``(B, C, *S)``, ``labels`` ``(B, 1, *S)``.

    ``dtype``: the autocast dtype of the forward pass (None: fp32; `resunet.train.precision`
    chooses it). Parameters in ``frozen`` get no update (their gradients are dropped before the
    step). ``extra_images`` ``(B', C, *S)`` (semi-supervised: unlabelled patches) go through the
    same forward pass, after ``images``; ``extra_loss`` turns their float32 logits into a term
    added to the loss. Returns the loss (the sum) as a float.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, dtype):
        logits = model(images if extra_images is None else torch.cat([images, extra_images]))
    loss = loss_fn(logits[: len(images)].float(), labels)
    if extra_loss is not None:
        loss = loss + extra_loss(logits[len(images):].float())
    scaler.scale(loss).backward()
    for p in frozen:
        p.grad = None
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


@torch.no_grad()
def validation_counts(
    model: nn.Module,
    cases: Sequence,
    loss_fn: nn.Module,
    num_classes: int,
    device: torch.device,
    **predict_kwargs,
) -> torch.Tensor:
    """Sum over ``cases`` of [loss, TP, FP, FN per foreground class] as one float64 tensor.

    Layout: ``[loss_sum, n_cases, tp_1.., fp_1.., fn_1..]`` (classes 1..K-1); summed over DDP ranks
    by the caller, then turned into global (pooled-voxel) Dice per class.
    """
    model.eval()
    fg = max(1, num_classes - 1)
    out = torch.zeros(2 + 3 * fg, dtype=torch.float64)
    for case in cases:
        image = torch.from_numpy(case.image[:].copy()).to(device)
        label = torch.from_numpy(case.label[:].astype("int64")).to(device)
        logits = predict_case_logits(model, image, **predict_kwargs)
        out[0] += float(loss_fn(logits[None].float(), label[None]))
        out[1] += 1
        pred = logits_to_labels(logits).long()
        for c in range(1, fg + 1):
            p, g = pred == c, label == c
            out[1 + c] += float((p & g).sum())
            out[1 + fg + c] += float((p & ~g).sum())
            out[1 + 2 * fg + c] += float((~p & g).sum())
    return out


def summarize_validation(counts: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """(mean validation loss, Dice per foreground class) from summed `validation_counts`."""
    fg = max(1, num_classes - 1)
    loss = float(counts[0] / counts[1].clamp_min(1))
    tp, fp, fn = counts[2 : 2 + fg], counts[2 + fg : 2 + 2 * fg], counts[2 + 2 * fg :]
    return loss, [float(d) for d in dice_from_counts(tp, fp, fn)]
