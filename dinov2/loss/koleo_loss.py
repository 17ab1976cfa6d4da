"""KoLeo regulariser: spread the student's CLS features uniformly over the sphere by
maximising the log distance of each feature to its nearest neighbour in the batch
(Kozachenko-Leonenko differential entropy estimator, Sablayrolles et al. 2019)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinov2 import distributed

__all__ = ["KoLeoLoss", "gather_rows"]


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate equally sized ``(b, D)`` tensors of all ranks along dim 0 (callers pad to the
    largest batch); the backward pass sums the gradients of all ranks and returns each rank its
    own slice (every rank's loss depends on every rank's features). Plain ``all_gather`` /
    ``all_reduce`` work on gloo and NCCL alike."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group=None) -> torch.Tensor:
        world_size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.local_size, ctx.group = dist.get_rank(group), x.shape[0], group
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = ctx.rank * ctx.local_size
        return grad[start : start + ctx.local_size], None


def gather_rows(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """(the ``(b, D)`` rows of every rank of ``group`` concatenated in rank order, the offset of
    this rank's rows in them), with autograd. Ranks may hold different numbers of rows (e.g.
    after skipping unreadable images): all_gather needs equal shapes, so every rank is padded to
    the largest and the padding is dropped again."""
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device), group=group)
    sizes = [int(s) for s in sizes]
    largest = max(sizes)
    padded = F.pad(x, (0, 0, 0, largest - x.shape[0]))
    gathered = _AllGatherWithGrad.apply(padded, group)
    rows = torch.cat([gathered[r * largest : r * largest + n] for r, n in enumerate(sizes)])
    return rows, sum(sizes[: dist.get_rank(group)])


class KoLeoLoss(nn.Module):
    """``-mean_i log(d_i)`` with ``d_i`` the distance of L2-normalised feature ``i`` to its
    nearest other feature.

    Robustness (the textbook form ``-log(||x_i - x_nn|| + eps)`` breaks down at the corners):

    * batch size 1: there is no neighbour, the loss is 0 (kept in the autograd graph, so
      ``backward()`` still works and gives zero gradients);
    * duplicate features: the distance is computed as ``sqrt(||x_i - x_nn||^2 + eps^2)``, so the
      loss is finite (``-log(eps)`` for an exact duplicate) and the gradient is finite; it is
      exactly zero at an exact duplicate instead of the ``~1/eps`` spike of ``||.|| + eps``;
    * zero feature vectors: normalisation clamps the norm, so no NaN from ``0 / 0`` (the
      gradient is finite but large there, as for any normalisation of a near-zero vector).

    Away from these corners the value equals ``-mean(log(d_i))`` to within ``eps``.
    The computation runs in float32 whatever the input dtype.

    Args:
        eps: smoothing of the distance (1e-8).
        distributed: search nearest neighbours among the features of all ranks
            (all-gather with autograd; ranks may hold different batch sizes, e.g. after
            skipping unreadable images); the loss is still averaged over this rank's
            features. Off by default here (DINOv2 uses the per-rank batch); the training
            config turns it on with ``dino.koleo_distributed``. Without a process group it is
            the same as ``False``.
    """

    def __init__(self, eps: float = 1e-8, distributed: bool = False):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.eps = eps
        self.distributed = distributed
        # The ranks whose features are searched (None: all). A distillation student trained on a
        # subset of ranks sets its own group here.
        self.process_group = None

    def forward(self, student_features: torch.Tensor) -> torch.Tensor:
        """Args: ``student_features`` ``(B, D)`` (e.g. the student's CLS tokens of one crop).
        Returns: scalar float32 loss."""
        if student_features.ndim != 2:
            raise ValueError(f"KoLeoLoss expects (batch, dim) features, got shape {tuple(student_features.shape)}")
        x = F.normalize(student_features.float(), p=2, dim=-1, eps=1e-8)
        candidates, self_offset = x, 0
        if self.distributed and distributed.is_enabled():
            candidates, self_offset = gather_rows(x, self.process_group)

        n_local, n_all = x.shape[0], candidates.shape[0]
        if n_all < 2 or n_local == 0:
            return x.sum() * 0.0
        with torch.no_grad():
            similarity = x @ candidates.t()  # (n_local, n_all), cosine similarity
            own = torch.arange(n_local, device=x.device)
            similarity[own, own + self_offset] = -2.0  # below any cosine: never pick itself
            nearest = similarity.argmax(dim=1)
        squared = (x - candidates[nearest]).pow(2).sum(dim=-1)
        distance = torch.sqrt(squared + self.eps**2)
        return -torch.log(distance).mean()

    def extra_repr(self) -> str:
        return f"eps={self.eps}, distributed={self.distributed}"
