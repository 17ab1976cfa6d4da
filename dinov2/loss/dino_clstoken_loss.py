"""DINO loss on the CLS-token head outputs: student crops against teacher global crops."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dinov2.loss.centering import TeacherCentering

__all__ = ["DINOLoss"]


class DINOLoss(TeacherCentering):
    """Cross-entropy between teacher targets and student predictions over crop pairs.

    For every student crop ``s`` and every teacher crop ``t`` the term is
    ``-sum_k p_t[k] * log_softmax(z_s / student_temp)[k]`` averaged over the batch; the loss is
    the mean of these terms over all compared pairs.

    "Except the same view": the student list starts with the global crops in the same order as
    the teacher list, so with ``skip_same_view=True`` student crop ``i`` is not compared with
    teacher crop ``i`` (for ``i < len(teacher_probs_list)``). With 2 global and N local crops
    that gives ``2 * 1 + 2 * N`` pairs. Pass ``skip_same_view=False`` when the student list holds
    only local crops.

    Teacher targets come from :meth:`softmax_center_teacher` (+ :meth:`update_center`) or
    :meth:`sinkhorn_knopp_teacher`, inherited from :class:`TeacherCentering`; the EMA centre is
    the registered buffer ``center`` of shape ``(1, out_dim)``.

    Args:
        out_dim: number of prototypes (head output size).
        student_temp: student softmax temperature (0.1 in DINO / DINOv2).
        center_momentum: EMA momentum of the centre (0.9).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__(out_dim, center_momentum)
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}")
        self.student_temp = student_temp

    def forward(
        self,
        student_logits_list: Sequence[torch.Tensor],
        teacher_probs_list: Sequence[torch.Tensor],
        skip_same_view: bool = True,
    ) -> torch.Tensor:
        """Mean cross-entropy over the compared (student crop, teacher crop) pairs.

        Args:
            student_logits_list: one ``(B, K)`` tensor of student head logits per crop, global
                crops first (e.g. ``student_logits.chunk(n_crops)``).
            teacher_probs_list: one ``(B, K)`` tensor of teacher targets per global crop.
            skip_same_view: do not compare student crop ``i`` with teacher crop ``i``.

        Returns:
            Scalar loss (float32).
        """
        if len(student_logits_list) == 0 or len(teacher_probs_list) == 0:
            raise ValueError("DINOLoss needs at least one student crop and one teacher crop")
        total = None
        n_pairs = 0
        for s_idx, student_logits in enumerate(student_logits_list):
            self._check_logits(student_logits)
            log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
            for t_idx, teacher_probs in enumerate(teacher_probs_list):
                if skip_same_view and s_idx == t_idx:
                    continue
                if teacher_probs.shape != student_logits.shape:
                    raise ValueError(
                        f"DINOLoss: student crop {s_idx} has shape {tuple(student_logits.shape)} but "
                        f"teacher crop {t_idx} has shape {tuple(teacher_probs.shape)}"
                    )
                term = -(teacher_probs.float() * log_probs).sum(dim=-1).mean()
                total = term if total is None else total + term
                n_pairs += 1
        if n_pairs == 0:
            raise ValueError("DINOLoss: no (student, teacher) pair left to compare; check skip_same_view")
        return total / n_pairs

    @staticmethod
    def num_pairs(n_student_crops: int, n_teacher_crops: int, skip_same_view: bool = True) -> int:
        """Number of pairs :meth:`forward` averages over (useful to re-weight partial calls)."""
        skipped = min(n_student_crops, n_teacher_crops) if skip_same_view else 0
        return n_student_crops * n_teacher_crops - skipped
