from typing import Callable

import torch
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth: zero a sample's residual branch with probability ``drop_prob``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = x.new_empty(shape).bernoulli_(keep_prob)
    # Rescale kept samples so the expected value of the branch is unchanged.
    return x * keep.div_(keep_prob)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


# Stochastic depth implementations a Block can use (see ``uses_sample_subset``).
STOCHASTIC_DEPTH_MODES = ("mask", "subset", "auto")
# "auto" uses the sample subset only above this rate, the rule of the official code: at 0.1 a
# batch of 32 keeps 28 samples and the branch time falls by no more than the measurement noise
# (docs/training.md), while rounding the kept count down drops a larger share of a small batch
# (1 of 4 at rate 0.1) than the per-sample mask does on average.
SUBSET_ABOVE_RATE = 0.1


def uses_sample_subset(mode: str, drop_prob: float) -> bool:
    """Whether a block with rate ``drop_prob`` in stochastic-depth ``mode`` runs the subset scheme."""
    if drop_prob <= 0.0 or mode == "mask":
        return False
    return mode == "subset" or drop_prob > SUBSET_ABOVE_RATE


def drop_add_residual_subset(
    x: torch.Tensor, residual_fn: Callable[[torch.Tensor], torch.Tensor], drop_prob: float
) -> torch.Tensor:
    """``x + residual_fn(x)`` with stochastic depth, computing the branch only where it is kept.

    ``keep = max(int(b * (1 - drop_prob)), 1)`` of the ``b`` samples, drawn uniformly without
    replacement, go through ``residual_fn``; their residual is added back scaled by
    ``b / keep``. Each sample is kept with probability ``keep / b``, so the expected residual
    equals the undropped one, as with the per-sample mask of ``drop_path`` (kept with
    probability ``1 - drop_prob``, scaled by ``1 / (1 - drop_prob)``). The two differ in that the
    number kept here is fixed per batch, not binomial, and the branch costs ``keep / b`` of a
    full one, forward and backward. Rounding down, at least ``drop_prob`` of the batch is dropped:
    more than that for small batches (4 samples at rate 0.1 drop 1).
    """
    b = x.shape[0]
    keep = max(int(b * (1.0 - drop_prob)), 1)
    index = torch.randperm(b, device=x.device)[:keep]
    residual = residual_fn(x[index])
    out = torch.index_add(x.flatten(1), 0, index, residual.flatten(1).to(x.dtype), alpha=b / keep)
    return out.view_as(x)
