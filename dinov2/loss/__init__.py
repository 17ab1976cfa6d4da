"""Self-supervised losses: DINO (CLS tokens), iBOT (masked patch tokens), KoLeo, InfoNCE, Gram anchoring
(patch-similarity matrices against a frozen Gram teacher), and the teacher targets they share
(softmax with EMA centre, Sinkhorn-Knopp). See docs/ssl_components.md and docs/gram_anchoring.md."""

from dinov2.loss.centering import TeacherCentering, sinkhorn_knopp, softmax_center
from dinov2.loss.dino_clstoken_loss import DINOLoss
from dinov2.loss.gram_loss import GramLoss, patch_similarity
from dinov2.loss.ibot_patch_loss import IBOT_WEIGHTINGS, iBOTPatchLoss, masks_weight_from_masks
from dinov2.loss.infonce_loss import InfoNCELoss
from dinov2.loss.koleo_loss import KoLeoLoss

__all__ = [
    "DINOLoss",
    "GramLoss",
    "IBOT_WEIGHTINGS",
    "InfoNCELoss",
    "KoLeoLoss",
    "TeacherCentering",
    "iBOTPatchLoss",
    "masks_weight_from_masks",
    "patch_similarity",
    "sinkhorn_knopp",
    "softmax_center",
]
