import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segcore.losses import LossInputError, combined_loss, dice_loss, weighted_cross_entropy
from segcore.metrics import dice


def _batch(seed: int = 0, n: int = 2, k: int = 3, h: int = 5, w: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, h, w, generator=g) * 2
    target = torch.randint(0, k, (n, h, w), generator=g)
    weight = torch.rand(n, h, w, generator=g) * 10
    return logits, target, weight


def test_weighted_cross_entropy_by_hand():
    # Pixel a: logits (0, ln 3) -> p(class 1) = 3/4, true class 1, weight 2.
    # Pixel b: logits (0, 0)    -> p(class 0) = 1/2, true class 0, weight 1.
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3), 0.0]]]])
    target = torch.tensor([[[1, 0]]])
    weight = torch.tensor([[[2.0, 1.0]]])
    expected = (2 * -math.log(3 / 4) + math.log(2)) / 2
    assert weighted_cross_entropy(logits, target, weight).item() == pytest.approx(expected)
    assert weighted_cross_entropy(logits, target).item() == pytest.approx(
        (-math.log(3 / 4) + math.log(2)) / 2
    )


def test_uniform_weights_are_plain_cross_entropy():
    logits, target, _ = _batch()
    reference = F.cross_entropy(logits, target)
    torch.testing.assert_close(weighted_cross_entropy(logits, target), reference)
    ones = torch.ones_like(target, dtype=torch.float32)
    torch.testing.assert_close(weighted_cross_entropy(logits, target, ones), reference)
    torch.testing.assert_close(weighted_cross_entropy(logits, target, 3 * ones), 3 * reference)


def test_weighted_cross_entropy_is_the_weighted_mean_of_per_pixel_losses():
    logits, target, weight = _batch(1)
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(
        weighted_cross_entropy(logits, target, weight), (weight * per_pixel).mean()
    )


def test_gradients_flow_and_follow_the_weights():
    logits, target, weight = _batch(2)
    weight[0, 1, 2] = 0.0
    logits.requires_grad_(True)
    weighted_cross_entropy(logits, target, weight).backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    assert grad[0, :, 1, 2].abs().max() == 0  # a zero weight removes the pixel from the loss
    assert grad.abs().sum() > 0
    # For softmax CE the gradient of pixel x is w(x) (p - onehot) / n_pixels.
    p = F.softmax(logits.detach(), dim=1)
    onehot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(grad, weight[:, None] * (p - onehot) / target.numel())


def test_dice_loss_equals_one_minus_hard_dice_for_confident_logits():
    _, target, _ = _batch(3, n=2, k=3, h=16, w=16)
    g = torch.Generator().manual_seed(4)
    prediction = torch.where(torch.rand(target.shape, generator=g) < 0.3, 0, target)
    logits = F.one_hot(prediction, 3).permute(0, 3, 1, 2).float() * 50  # softmax ~ one-hot
    hard = dice(target.numpy(), prediction.numpy(), 3)[1:]
    loss = dice_loss(logits, target, eps=0.0)
    assert loss.item() == pytest.approx(1 - np.mean(hard), abs=1e-6)
    assert dice_loss(logits * 0 + F.one_hot(target, 3).permute(0, 3, 1, 2) * 50, target) < 1e-6


def test_dice_loss_by_hand():
    # Two classes, logits 0 -> p = 1/2 everywhere; 4 px of which 1 is foreground.
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[1, 0], [0, 0]]])
    # inter = 1/2, sum(p) = 2, sum(onehot) = 1: Dice = (1 + eps) / (3 + eps).
    assert dice_loss(logits, target, eps=0.0).item() == pytest.approx(1 - 1 / 3)
    assert dice_loss(logits, target, eps=1.0).item() == pytest.approx(1 - 2 / 4)


def test_dice_loss_has_gradients_and_combined_adds_both():
    logits, target, weight = _batch(5)
    logits.requires_grad_(True)
    loss = combined_loss(logits, target, weight, dice_weight=0.5)
    expected = weighted_cross_entropy(logits, target, weight) + 0.5 * dice_loss(logits, target)
    torch.testing.assert_close(loss, expected)
    dice_loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_half_precision_logits_give_a_float32_loss():
    logits, target, weight = _batch(6)
    loss = weighted_cross_entropy(logits.to(torch.bfloat16), target, weight)
    assert loss.dtype == torch.float32
    reference = weighted_cross_entropy(logits.to(torch.bfloat16).float(), target, weight)
    torch.testing.assert_close(loss, reference)


def test_shape_mismatches_raise_one_clear_error():
    logits, target, weight = _batch()
    with pytest.raises(LossInputError, match="crop the target"):
        weighted_cross_entropy(logits, target[:, 1:])
    with pytest.raises(LossInputError, match="weight shape"):
        weighted_cross_entropy(logits, target, weight[:, :, 1:])
    with pytest.raises(LossInputError, match="integer class ids"):
        dice_loss(logits, target.float())
    with pytest.raises(LossInputError, match="at least 2 classes"):
        dice_loss(logits[:, :1], torch.zeros_like(target))
