"""Training losses: the U-Net's weighted pixel-wise softmax cross-entropy, Dice, and both.

The paper's Eq. 1 is E = sum_x w(x) log(p_l(x)(x)) (maximised); here it is the mean over pixels
of w(x) * (-log softmax at the true class), so that the value does not grow with the tile size.
Losses are computed in float32 even under bf16/fp16 autocast: the log-softmax of large logits
and the sums over millions of pixels lose too much precision in half types.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


class LossInputError(ValueError):
    """Logits, target and weight that do not fit together."""


def _check(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
    """Raise LossInputError unless logits are N x K x h x w and target/weight N x h x w."""
    if logits.ndim != 4:
        raise LossInputError(f"logits must be N x K x h x w, got shape {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise LossInputError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)};"
            f" expected {expected} (crop the target to the network output)"
        )
    if target.dtype.is_floating_point:
        raise LossInputError(f"target must hold integer class ids, got {target.dtype}")
    if weight is not None and tuple(weight.shape) != expected:
        raise LossInputError(
            f"weight shape {tuple(weight.shape)} does not match logits {tuple(logits.shape)};"
            f" expected {expected}"
        )


def weighted_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean over pixels of w(x) * (-log softmax(logits)[true class]); plain CE when weight=None."""
    _check(logits, target, weight)
    nll = F.nll_loss(F.log_softmax(logits.float(), dim=1), target.long(), reduction="none")
    if weight is None:
        return nll.mean()
    return (weight.float() * nll).mean()


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """1 - soft Dice of the softmax, averaged over the foreground classes 1..K-1.

    Sums run over the whole batch per class ("batch Dice"): tiles without any cell would make a
    per-tile Dice swing between 0 and 1 on a handful of pixels. `eps` smooths both terms.
    """
    _check(logits, target)
    n_classes = logits.shape[1]
    if n_classes < 2:
        raise LossInputError(f"Dice loss needs at least 2 classes, got {n_classes}")
    prob = F.softmax(logits.float(), dim=1)[:, 1:]
    onehot = F.one_hot(target.long(), n_classes).permute(0, 3, 1, 2)[:, 1:].float()
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    total = prob.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2.0 * inter + eps) / (total + eps)).mean()


def combined_loss(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    dice_weight: float = 1.0,
    eps: float = 1.0,
) -> Tensor:
    """Weighted cross-entropy plus `dice_weight` times the Dice loss."""
    return weighted_cross_entropy(logits, target, weight) + dice_weight * dice_loss(
        logits, target, eps
    )
