import math

import pytest
import torch

from resunet import ResunetError
from resunet.losses import DiceFocalLoss, DiceLoss, FocalLoss


def test_binary_dice_hand_computed():
    # p = sigmoid(0) = 0.5 everywhere, target has 2 of 4 pixels -> I = 1, P + T = 2 + 2
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    loss = DiceLoss(smooth=0.0)(logits, target)
    assert loss.item() == pytest.approx(1 - 2 * 1 / 4)


def test_multiclass_dice_index_and_one_hot_targets_agree_and_background_excluded():
    logits = torch.tensor([[[[40.0, -40.0]], [[-40.0, 40.0]], [[-40.0, -40.0]]]])  # (1, 3, 1, 2)
    index = torch.tensor([[[0, 1]]])
    one_hot = torch.nn.functional.one_hot(index, 3).movedim(-1, 1).float()
    a = DiceLoss(smooth=1e-5)(logits, index)
    b = DiceLoss(smooth=1e-5)(logits, one_hot)
    assert a.item() == pytest.approx(b.item())
    # class 1 perfect (Dice ~1), class 2 absent from both (Dice = smooth/smooth = 1) -> loss ~0
    assert a.item() == pytest.approx(0.0, abs=1e-4)


def test_dice_empty_target_conventions():
    empty = torch.zeros(1, 1, 4, 4)
    assert DiceLoss()(torch.full((1, 1, 4, 4), -40.0), empty).item() == pytest.approx(0.0, abs=1e-3)
    assert DiceLoss()(torch.full((1, 1, 4, 4), 40.0), empty).item() == pytest.approx(1.0, abs=1e-3)


def test_focal_binary_hand_computed():
    logit, alpha, gamma = 0.5, 0.7, 2.0
    p = 1 / (1 + math.exp(-logit))
    expected_pos = -alpha * (1 - p) ** gamma * math.log(p)
    expected_neg = -(1 - alpha) * p**gamma * math.log(1 - p)
    x = torch.tensor([[[[logit, logit]]]])
    t = torch.tensor([[[[1.0, 0.0]]]])
    assert FocalLoss(alpha, gamma)(x, t).item() == pytest.approx((expected_pos + expected_neg) / 2, rel=1e-6)


def test_focal_multiclass_hand_computed_and_gamma0_is_weighted_cross_entropy():
    x = torch.tensor([[[[2.0]], [[0.5]], [[-1.0]]]])  # (1, 3, 1, 1)
    t = torch.tensor([[[1]]])
    p = torch.softmax(x[0, :, 0, 0], 0)[1].item()
    expected = -0.7 * (1 - p) ** 2 * math.log(p)
    assert FocalLoss(0.7, 2.0)(x, t).item() == pytest.approx(expected, rel=1e-6)
    ce = torch.nn.functional.cross_entropy(x, t)
    assert FocalLoss(None, 0.0)(x, t).item() == pytest.approx(ce.item(), rel=1e-6)


@pytest.mark.parametrize("c", [1, 3])
def test_focal_is_stable_at_extreme_logits(c):
    x = torch.full((1, c, 2, 2), 100.0, requires_grad=True)
    x.data[:, 0] = -100.0
    t = torch.ones(1, 1, 2, 2) if c == 1 else torch.ones(1, 2, 2, dtype=torch.long)
    loss = DiceFocalLoss()(x, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # confidently right -> ~0 focal; confidently wrong at |logit| = 100 -> alpha * 100 (binary)
    wrong = FocalLoss(0.7, 2.0)(torch.full((1, 1, 1, 1), -100.0), torch.ones(1, 1, 1, 1))
    assert wrong.item() == pytest.approx(70.0, rel=1e-5)
    right = FocalLoss(0.7, 2.0)(torch.full((1, 1, 1, 1), 100.0), torch.ones(1, 1, 1, 1))
    assert right.item() == pytest.approx(0.0, abs=1e-12)


def test_dice_focal_is_the_weighted_sum():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    t = torch.randint(0, 3, (2, 1, 8, 8))
    combined = DiceFocalLoss(dice_weight=0.3, focal_weight=0.9)(x, t)
    expected = 0.3 * DiceLoss()(x, t) + 0.9 * FocalLoss()(x, t)
    assert combined.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bad_targets_are_rejected_clearly():
    with pytest.raises(ResunetError, match="does not match"):
        DiceLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ResunetError, match="outside 0..2"):
        DiceFocalLoss()(torch.zeros(1, 3, 4, 4), torch.full((1, 4, 4), 3, dtype=torch.long))
