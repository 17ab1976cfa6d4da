"""iBOT loss on masked patch tokens: the student predicts the teacher's targets for patches it
did not see."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinov2.loss.centering import TeacherCentering

__all__ = ["iBOTPatchLoss", "masks_weight_from_masks", "IBOT_WEIGHTINGS"]

IBOT_WEIGHTINGS = ("upstream", "paper")


def masks_weight_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Per-masked-token weights ``1 / (masked tokens in its image)``, in the order of
    ``masks.flatten().nonzero()``.

    Args:
        masks: ``(n_images, n_tokens)`` bool masks.

    Returns:
        ``(n_masked,)`` float32 weights; the weights of each masked image sum to 1.
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a 2-D bool tensor (images, tokens), got {masks.dtype} {tuple(masks.shape)}")
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


class iBOTPatchLoss(TeacherCentering):  # noqa: N801 - the method's name is "iBOT"
    """Cross-entropy between teacher targets and student predictions on masked patch tokens.

    Per masked token ``i`` the term is ``l_i = -sum_k p_i[k] * log_softmax(z_i / student_temp)[k]``.

    Weighting (``weighting``):

    * ``"upstream"`` (DINOv2's code, default): ``sum_i w_i * l_i / n_images`` where
      ``w_i = 1 / (masked tokens of i's image)`` (``masks_weight`` from the collate function) and
      ``n_images`` is the number of global crops in the batch, masked or not. Every masked
      image counts equally whatever its mask ratio.
    * ``"paper"``: the plain mean of ``l_i`` over all masked tokens, so images with more masked
      tokens weigh more.

    Teacher targets: :meth:`softmax_center_teacher` / :meth:`update_center` with the EMA centre,
    or :meth:`sinkhorn_knopp_teacher` on the ``(M, K)`` masked teacher logits with
    ``n_samples=n_masked_patches`` (all-reduced inside).

    Args:
        patch_out_dim: number of prototypes of the iBOT head.
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the centre (0.9).
        weighting: ``"upstream"`` or ``"paper"`` (see above).
    """

    def __init__(
        self,
        patch_out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        weighting: str = "upstream",
    ):
        super().__init__(patch_out_dim, center_momentum)
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}")
        if weighting not in IBOT_WEIGHTINGS:
            raise ValueError(f"iBOT weighting must be one of {IBOT_WEIGHTINGS}, got {weighting!r}")
        self.student_temp = student_temp
        self.weighting = weighting

    def forward_masked(
        self,
        student_patch_logits_masked: torch.Tensor,
        teacher_probs_masked: torch.Tensor,
        masks_weight: torch.Tensor | None,
        n_images: int,
        n_masked_patches: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss over the masked tokens of the batch.

        Args:
            student_patch_logits_masked: ``(M, K)`` student head logits of the masked tokens
                (``student_patch_logits.flatten(0, 1)[mask_indices_list]``).
            teacher_probs_masked: ``(M, K)`` teacher targets for the same tokens.
            masks_weight: ``(M,)`` per-token weights from the collate function (or
                :func:`masks_weight_from_masks`); required for ``"upstream"``, ignored by ``"paper"``.
            n_images: number of global crops in the batch (``collated_masks.shape[0]``), masked or
                not; the ``"upstream"`` weighting divides by it.
            n_masked_patches: if given, only the first ``n_masked_patches`` rows are used (for
                callers that pad the masked buffers to the collate's ``upperbound``).

        Returns:
            Scalar loss (float32). Zero (still attached to the graph) when no token is masked.
        """
        self._check_logits(student_patch_logits_masked)
        if student_patch_logits_masked.shape != teacher_probs_masked.shape:
            raise ValueError(
                f"iBOTPatchLoss: student {tuple(student_patch_logits_masked.shape)} and teacher "
                f"{tuple(teacher_probs_masked.shape)} masked tokens differ in shape"
            )
        if n_masked_patches is not None:
            n = int(n_masked_patches)
            student_patch_logits_masked = student_patch_logits_masked[:n]
            teacher_probs_masked = teacher_probs_masked[:n]
            if masks_weight is not None:
                masks_weight = masks_weight[:n]
        log_probs = F.log_softmax(student_patch_logits_masked.float() / self.student_temp, dim=-1)
        per_token = -(teacher_probs_masked.float() * log_probs).sum(dim=-1)  # (M,)

        if self.weighting == "paper":
            if per_token.numel() == 0:
                return per_token.sum()
            return per_token.mean()

        if masks_weight is None:
            raise ValueError("iBOTPatchLoss with weighting='upstream' needs masks_weight")
        if masks_weight.shape != per_token.shape:
            raise ValueError(
                f"iBOTPatchLoss: masks_weight has shape {tuple(masks_weight.shape)}, expected {tuple(per_token.shape)}"
            )
        if n_images <= 0:
            raise ValueError(f"iBOTPatchLoss: n_images must be positive, got {n_images}")
        return (per_token * masks_weight.float()).sum() / n_images

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """Same as :meth:`forward_masked`."""
        return self.forward_masked(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, student_temp={self.student_temp}, weighting={self.weighting!r}"
