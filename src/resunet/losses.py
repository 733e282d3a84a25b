"""Dice, Focal and Dice+Focal losses, computed from logits.

Shapes: ``logits`` ``(B, C, *S)``. With ``C == 1`` the task is binary (sigmoid) and ``target`` is
``(B, 1, *S)`` or ``(B, *S)`` with values in {0, 1} (soft values allowed). With ``C > 1`` the task is
multi-class (softmax) and ``target`` is either class indices ``(B, 1, *S)`` / ``(B, *S)`` (integer
dtype) or one-hot / soft ``(B, C, *S)`` (floating dtype).

Empty targets: the soft Dice of a class is ``(2*I + smooth) / (P + T + smooth)`` per sample and class
(``I`` intersection, ``P``/``T`` predicted and target mass). When a class is absent from the target
and the prediction is ~0, its Dice is ~1 (loss ~0); when it is absent but predicted, its Dice falls
towards 0 (loss ~1). ``smooth`` defaults to 1e-5, so a class absent from both contributes no
gradient-free "free" Dice. Set ``batch_dice=True`` to pool over the batch first (nnU-Net's choice
for 2-D slices, where many slices hold no foreground).

Focal loss is evaluated per pixel from log-sigmoid / log-softmax (finite and exact at
``|logit| = 100``), then averaged -- not a focal factor applied to an averaged BCE.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resunet.errors import ResunetError


def _target_as_probabilities(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return the target as float ``(B, C, *S)`` matching ``logits`` (one-hot for index targets)."""
    if logits.ndim < 3:
        raise ResunetError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
    b, c, *spatial = logits.shape
    if target.ndim == logits.ndim - 1:
        target = target.unsqueeze(1)
    if target.ndim != logits.ndim or target.shape[0] != b or list(target.shape[2:]) != spatial:
        raise ResunetError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    if c == 1:
        if target.shape[1] != 1:
            raise ResunetError("binary logits (C=1) need a (B, 1, *S) target")
        return target.to(logits.dtype)
    if target.shape[1] == 1 and not target.is_floating_point():
        idx = target[:, 0].long()
        if idx.min() < 0 or idx.max() >= c:
            raise ResunetError(f"target holds class indices outside 0..{c - 1}")
        return F.one_hot(idx, c).movedim(-1, 1).to(logits.dtype)
    if target.shape[1] != c:
        raise ResunetError(
            f"multi-class target needs {c} channels (one-hot) or integer class indices, "
            f"got shape {tuple(target.shape)} with dtype {target.dtype}"
        )
    return target.to(logits.dtype)


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


class DiceLoss(nn.Module):
    """``1 - soft Dice`` averaged over classes (and samples unless ``batch_dice``).

    ``include_background`` only matters for multi-class logits: channel 0 is dropped when False.
    """

    def __init__(self, smooth: float = 1e-5, include_background: bool = False, batch_dice: bool = False) -> None:
        super().__init__()
        if smooth < 0:
            raise ResunetError("smooth must be >= 0")
        self.smooth = smooth
        self.include_background = include_background
        self.batch_dice = batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _target_as_probabilities(logits, target)
        probs = _probabilities(logits.float())
        target = target.float()
        if logits.shape[1] > 1 and not self.include_background:
            probs, target = probs[:, 1:], target[:, 1:]
        dims = tuple(range(2, logits.ndim))
        if self.batch_dice:
            dims = (0, *dims)
        intersection = (probs * target).sum(dims)
        denominator = probs.sum(dims) + target.sum(dims)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        return 1 - dice.mean()


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017), per pixel from logits, mean over pixels.

    ``loss = -alpha_t * (1 - p_t)**gamma * log(p_t)``. Binary: ``alpha_t = alpha`` on foreground
    pixels and ``1 - alpha`` on background. Multi-class: ``alpha`` is either one weight per class or a
    scalar meaning ``alpha`` for every foreground class and ``1 - alpha`` for class 0.
    ``alpha=None`` disables class weighting.
    """

    def __init__(self, alpha: float | Sequence[float] | None = 0.7, gamma: float = 2.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ResunetError("gamma must be >= 0")
        self.alpha = alpha
        self.gamma = gamma

    def _alpha_weights(self, c: int, device: torch.device) -> torch.Tensor | None:
        if self.alpha is None:
            return None
        if isinstance(self.alpha, (int, float)):
            w = torch.full((c,), float(self.alpha), device=device)
            w[0] = 1.0 - float(self.alpha)
            return w
        w = torch.as_tensor(list(self.alpha), dtype=torch.float32, device=device)
        if w.numel() != c:
            raise ResunetError(f"alpha has {w.numel()} weights but the logits have {c} classes")
        return w

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _target_as_probabilities(logits, target).float()
        logits = logits.float()
        if logits.shape[1] == 1:
            log_p = F.logsigmoid(logits)
            log_not_p = F.logsigmoid(-logits)
            # soft targets allowed: weighted sum of the two outcomes
            log_pt_pos, log_pt_neg = log_p, log_not_p
            mod_pos = (-torch.expm1(log_pt_pos)).pow(self.gamma)  # (1 - p)**gamma
            mod_neg = (-torch.expm1(log_pt_neg)).pow(self.gamma)  # p**gamma
            a = 1.0 if self.alpha is None else float(self.alpha)  # type: ignore[arg-type]
            a_neg = 1.0 if self.alpha is None else 1.0 - a
            loss = -(target * a * mod_pos * log_pt_pos + (1 - target) * a_neg * mod_neg * log_pt_neg)
            return loss.mean()
        log_p = F.log_softmax(logits, dim=1)
        modulation = (-torch.expm1(log_p)).pow(self.gamma)
        per_class = -target * modulation * log_p
        weights = self._alpha_weights(logits.shape[1], logits.device)
        if weights is not None:
            per_class = per_class * weights.view(1, -1, *([1] * (logits.ndim - 2)))
        return per_class.sum(dim=1).mean()


class DiceFocalLoss(nn.Module):
    """``dice_weight * DiceLoss + focal_weight * FocalLoss`` (the seed's defaults 0.5 / 0.5)."""

    def __init__(
        self,
        dice_weight: float = 0.5,
        focal_weight: float = 0.5,
        alpha: float | Sequence[float] | None = 0.7,
        gamma: float = 2.0,
        smooth: float = 1e-5,
        include_background: bool = False,
        batch_dice: bool = False,
    ) -> None:
        super().__init__()
        if dice_weight < 0 or focal_weight < 0 or dice_weight + focal_weight == 0:
            raise ResunetError("dice_weight and focal_weight must be >= 0 and not both 0")
        self.dice_weight = dice_weight
        self.focal_weight = focal_weight
        self.dice = DiceLoss(smooth=smooth, include_background=include_background, batch_dice=batch_dice)
        self.focal = FocalLoss(alpha=alpha, gamma=gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.focal_weight * self.focal(logits, target)
