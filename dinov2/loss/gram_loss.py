"""Gram anchoring (DINOv3): keep the student's patch-to-patch similarities close to those of an
earlier, frozen copy of the model (the Gram teacher).

Over long training the DINO / iBOT objectives keep improving global (CLS) features while patch
features drift towards each other and lose locality. The Gram term does not constrain the patch
features themselves, only their cosine-similarity structure within each image, so the student
stays free to move its features as long as which patches look alike stays as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GramLoss", "patch_similarity"]


def patch_similarity(patch_tokens: torch.Tensor) -> torch.Tensor:
    """``(B, N, D)`` patch features -> ``(B, N, N)`` cosine similarities within each image."""
    if patch_tokens.dim() != 3:
        raise ValueError(f"patch tokens must be (batch, patches, dim), got shape {tuple(patch_tokens.shape)}")
    normed = F.normalize(patch_tokens.float(), dim=-1)
    return normed @ normed.transpose(1, 2)


class GramLoss(nn.Module):
    """Mean squared error between the student's and the Gram teacher's patch-similarity matrices.

    ``loss = mean_{b, i, j} (S_s[b, i, j] - S_t[b, i, j])^2`` with ``S = X_hat X_hat^T`` per image
    and ``X_hat`` the L2-normalised patch features (student and teacher may differ in width: only
    the ``N x N`` matrices are compared, so they must have the same number of patches).

    Args:
        remove_neg: clip negative similarities to 0 in both matrices (only which patches are
            alike is anchored, not how dissimilar the others are).
        remove_only_teacher_neg: clip the teacher's negative similarities to 0, and the
            student's where the teacher's are negative too (a student similarity that is negative
            where the teacher's is positive is still pulled up). Exclusive with ``remove_neg``.

    The teacher matrix is a target: computed without gradient.
    """

    def __init__(self, remove_neg: bool = False, remove_only_teacher_neg: bool = False):
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("gram.remove_neg and gram.remove_only_teacher_neg are exclusive; set at most one")
        self.remove_neg = bool(remove_neg)
        self.remove_only_teacher_neg = bool(remove_only_teacher_neg)

    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
        """``(B, N, D_s)`` and ``(B, N, D_t)`` patch features -> scalar loss (float32)."""
        if student_patches.shape[:2] != teacher_patches.shape[:2]:
            raise ValueError(
                "Gram loss: student and Gram teacher patch tokens differ in (batch, patches): "
                f"{tuple(student_patches.shape[:2])} vs {tuple(teacher_patches.shape[:2])}"
            )
        student_sim = patch_similarity(student_patches)
        with torch.no_grad():
            teacher_sim = patch_similarity(teacher_patches.detach())
        if self.remove_neg:
            student_sim = student_sim.clamp(min=0.0)
            teacher_sim = teacher_sim.clamp(min=0.0)
        elif self.remove_only_teacher_neg:
            teacher_negative = teacher_sim < 0
            teacher_sim = teacher_sim.clamp(min=0.0)
            student_sim = torch.where(teacher_negative & (student_sim < 0), torch.zeros_like(student_sim), student_sim)
        return F.mse_loss(student_sim, teacher_sim)
