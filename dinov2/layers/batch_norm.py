"""BatchNorm over the global batch of a multi-process run, on any device and backend.

``torch.nn.SyncBatchNorm`` only runs on GPU-like devices; training on CPU with gloo (and the
tests) needs the same statistics. :class:`GlobalBatchNorm1d` computes the batch mean and
variance from sums that an injected ``all_reduce`` adds up over the ranks sharing the batch. With
an autograd-aware reduction (``dinov2.distributed.differentiable_all_reduce_sum``, which
``SSLMetaArch`` passes to its heads in a multi-process run) its output and gradients equal those of
``nn.BatchNorm1d`` applied to the concatenation of every rank's rows. Without one it is exactly
``nn.BatchNorm1d``. The layer itself knows nothing of process groups.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["AllReduce", "GlobalBatchNorm1d"]

AllReduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the ranks that share a batch and returns the result as a new tensor, with
gradients flowing back to every rank."""


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` on ``(rows, features)`` inputs whose training-mode statistics span all
    ranks (same parameters, buffers and state-dict keys as ``nn.BatchNorm1d``).

    Args:
        num_features, eps, momentum, affine, track_running_stats: as for ``nn.BatchNorm1d``.
        all_reduce: the reduction over the ranks (:data:`AllReduce`); None for one process: the
            statistics of this process's rows, computed by ``nn.BatchNorm1d`` itself.
    """

    def __init__(self, num_features: int, *args, all_reduce: Optional[AllReduce] = None, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.all_reduce is None:
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f"GlobalBatchNorm1d expects (rows, features) inputs, got shape {tuple(x.shape)}")
        # Two collectives (in float32): row count and sums, then the squared deviations from the
        # global mean. The one-pass E[x^2] - mean^2 cancels catastrophically when the rows are
        # nearly identical (CLS tokens at initialisation: mean^2 / var ~ 1e4), which put the
        # statistics 4e-4 away from nn.BatchNorm1d's.
        rows = x.float()
        sums = self.all_reduce(torch.cat([rows.new_tensor([rows.shape[0]]), rows.sum(0)]))
        count = sums[0].clamp(min=1)
        mean = sums[1:] / count
        var = self.all_reduce(((rows - mean) ** 2).sum(0)) / count  # biased, as BatchNorm normalises
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                momentum = 0.1 if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(mean.detach().to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach().to(self.running_var.dtype), alpha=momentum)
                self.num_batches_tracked.add_(1)
        out = (rows - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)
