"""Teacher targets for the DINO and iBOT losses.

The teacher's head logits are turned into target distributions in one of two ways:

* softmax centering: ``softmax((logits - center) / temp)`` where ``center`` is an exponential
  moving average of the batch mean of the teacher logits (DINO's recipe against collapse);
* Sinkhorn-Knopp: a few rounds of alternating prototype / sample normalisation that spread
  the batch evenly over the prototypes (SwAV's recipe, used by DINOv2 as an option).

Both work on any logits of shape ``(..., K)`` (CLS logits, or the masked patch logits of iBOT),
and both reduce their sums across ranks when a ``torch.distributed`` process group is
initialised, so every rank computes targets from the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.distributed import all_reduce_max, all_reduce_sum

__all__ = ["TeacherCentering", "sinkhorn_knopp", "softmax_center"]


def softmax_center(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """``softmax((logits - center) / temp)`` over the last dimension, computed in float32."""
    return F.softmax((logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(
    logits: torch.Tensor,
    temp: float,
    n_iterations: int = 3,
    n_samples: int | torch.Tensor | None = None,
    group=None,
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets over the global batch.

    Args:
        logits: ``(B_local, K)`` teacher logits of this rank.
        temp: teacher temperature.
        n_iterations: rounds of (prototype normalisation, sample normalisation).
        n_samples: this rank's number of valid rows (defaults to ``B_local``); the global batch
            size is its sum over ranks. iBOT passes its number of masked patches here.
        group: the ranks whose rows form the global batch (None: all ranks).

    Returns:
        ``(B_local, K)`` float32 targets. Each row (sample) sums to 1; summed over the global
        batch, each prototype (column) receives about ``B_global / K`` of the mass (exactly in
        the limit of many iterations).

    The global maximum logit is subtracted before ``exp`` so large logits or small temperatures
    cannot overflow; the constant cancels in the first global normalisation, so the result is
    the same as the textbook ``exp(logits / temp)`` form.
    """
    if logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects (batch, prototypes) logits, got shape {tuple(logits.shape)}")
    logits = logits.float()
    device = logits.device
    n_local = logits.shape[0] if n_samples is None else n_samples
    global_batch = torch.as_tensor(n_local, device=device, dtype=torch.float32).reshape(1).clone()
    all_reduce_sum(global_batch, group=group)
    # No host sync (.item()) anywhere: with an empty global batch every tensor below is empty
    # and the result is an empty (0, K) tensor; ranks with no rows still join every collective.
    n_prototypes = logits.shape[1]

    local_max = logits.max() if logits.numel() > 0 else logits.new_tensor(float("-inf"))
    global_max = local_max.reshape(1).clone()
    all_reduce_max(global_max, group=group)

    q = torch.exp((logits - global_max) / temp).t()  # (K, B_local)
    total = q.sum().reshape(1)
    all_reduce_sum(total, group=group)
    q /= total
    for _ in range(n_iterations):
        # Every prototype gets a total mass of 1/K over the global batch ...
        per_prototype = q.sum(dim=1, keepdim=True)
        all_reduce_sum(per_prototype, group=group)
        q /= per_prototype
        q /= n_prototypes
        # ... then every sample gets a mass of 1/B (columns are local, no reduction needed).
        q /= q.sum(dim=0, keepdim=True)
        q /= global_batch
    q *= global_batch  # rows of the result are distributions over prototypes
    return q.t()


class TeacherCentering(nn.Module):
    """Holds the EMA centre of teacher logits and produces teacher targets.

    Base class of :class:`~dinov2.loss.DINOLoss` and :class:`~dinov2.loss.iBOTPatchLoss`. The
    centre is a registered buffer of shape ``(1, out_dim)``, so it is saved in state dicts and
    checkpoints and moves with ``.to(device)``.

    Typical use per step (softmax centering)::

        targets = loss.softmax_center_teacher(teacher_logits, teacher_temp)  # uses the old centre
        loss.update_center(teacher_logits)                                    # then EMA update

    or, with Sinkhorn-Knopp (the centre is not used)::

        targets = loss.sinkhorn_knopp_teacher(teacher_logits, teacher_temp)
    """

    def __init__(self, out_dim: int, center_momentum: float = 0.9):
        super().__init__()
        if out_dim <= 0:
            raise ValueError(f"out_dim must be positive, got {out_dim}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # The ranks whose batches form the global batch (None: all). A distillation student
        # trained on a subset of ranks sets its own group here.
        self.process_group = None

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.shape[-1] != self.out_dim:
            raise ValueError(
                f"{type(self).__name__}: logits have {logits.shape[-1]} prototypes, expected out_dim={self.out_dim}"
            )

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Targets ``softmax((teacher_logits - center) / teacher_temp)``; any shape ``(..., K)``, float32."""
        self._check_logits(teacher_logits)
        return softmax_center(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_logits: torch.Tensor,
        teacher_temp: float,
        n_iterations: int = 3,
        n_samples: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets for ``(B, K)`` logits; see :func:`sinkhorn_knopp`."""
        self._check_logits(teacher_logits)
        return sinkhorn_knopp(
            teacher_logits, teacher_temp, n_iterations=n_iterations, n_samples=n_samples, group=self.process_group
        )

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA update of the centre with the mean of ``teacher_logits`` (rows = all dims but the last).

        The sum and the row count are all-reduced together (one collective), so the mean is over
        the global batch even when ranks hold different numbers of rows (e.g. masked patches).
        If the global batch is empty the centre is left unchanged.
        """
        self._check_logits(teacher_logits)
        rows = teacher_logits.reshape(-1, self.out_dim).float()
        stats = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
        all_reduce_sum(stats, group=self.process_group)
        count = stats[-1]
        batch_center = (stats[:-1] / count.clamp(min=1)).to(self.center.dtype)
        updated = self.center * self.center_momentum + batch_center * (1.0 - self.center_momentum)
        # torch.where instead of an `if count == 0` keeps the GPU free of host synchronisation.
        self.center.copy_(torch.where(count > 0, updated, self.center))

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, center_momentum={self.center_momentum}"
