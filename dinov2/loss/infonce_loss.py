"""InfoNCE between two views of each image (the NT-Xent loss of SimCLR, Chen et al. 2020).

Each L2-normalised feature of one view must pick the other view of its own image among every
other feature of the batch, both views, at temperature ``tau``: a cross-entropy over cosine
similarities / tau. On the Quick, Draw! recipe the term, on the DINO head's BatchNorm bottleneck,
gives at 1,000 iterations the k-NN that DINO alone reaches at about 2,000 (docs/quickdraw_recipe.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dinov2 import distributed
from dinov2.loss.koleo_loss import gather_rows

__all__ = ["InfoNCELoss"]


class InfoNCELoss(nn.Module):
    """``mean_i -log softmax(sim_i / tau)[positive_i]`` over both views' features.

    Args:
        temperature: tau, the softmax temperature of the cosine similarities (0.2).
        distributed: the negatives are the features of all ranks (all-gather with autograd), so
            a multi-rank run computes the loss of one process holding the whole batch; the loss
            is averaged over this rank's features. Without a process group it is the same as
            ``False``.
    """

    def __init__(self, temperature: float = 0.2, distributed: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"InfoNCE temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.distributed = distributed
        self.process_group = None  # the ranks whose features are negatives (None: all)

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Args: ``views``: two ``(B, D)`` tensors, row ``i`` of each from image ``i``.
        Returns: scalar float32 loss."""
        if len(views) != 2 or views[0].shape != views[1].shape or views[0].ndim != 2:
            shapes = [tuple(v.shape) for v in views]
            raise ValueError(f"InfoNCELoss expects two (batch, dim) views of equal shape, got {shapes}")
        queries = [F.normalize(v.float(), p=2, dim=-1, eps=1e-8) for v in views]
        keys, offset = list(queries), 0
        if self.distributed and distributed.is_enabled():
            gathered = [gather_rows(q, self.process_group) for q in queries]
            keys, offset = [rows for rows, _ in gathered], gathered[0][1]
        n_local, n_all = queries[0].shape[0], keys[0].shape[0]
        all_keys = torch.cat(keys)  # (2 n_all, D): view 0 of every image, then view 1
        own = torch.arange(n_local, device=all_keys.device) + offset
        losses = []
        for view, query in enumerate(queries):
            logits = query @ all_keys.t() / self.temperature
            self_column = own + view * n_all
            logits[torch.arange(n_local, device=logits.device), self_column] = float("-inf")
            positive = own + (1 - view) * n_all
            losses.append(F.cross_entropy(logits, positive))
        return (losses[0] + losses[1]) / 2

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, distributed={self.distributed}"
