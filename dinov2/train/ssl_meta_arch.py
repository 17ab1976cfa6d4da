"""SSLMetaArch: the student, its EMA teacher and the DINO / iBOT / KoLeo / InfoNCE losses of one training step.

Layout (also the layout of ``state_dict()``, so of checkpoints)::

    student.backbone      DinoVisionTransformer (with stochastic depth)
    student.dino_head     DINOHead on the CLS token
    student.ibot_head     DINOHead on masked patch tokens, only with ``ibot.separate_head``
                          (otherwise the DINO head scores the patch tokens too)
    teacher.*             the same modules, an exponential moving average of the student
    dino_loss.center      EMA centre of the teacher's CLS logits (buffer)
    ibot_patch_loss.center  EMA centre of the teacher's patch logits (buffer)

The teacher never receives gradients (``requires_grad=False``, forward under ``no_grad``) and
sees the global crops only; the student sees the (iBOT-masked) global crops and the local crops
in one list forward. Each head module is called once per step with its token groups (global-crop
CLS tokens, local-crop CLS tokens, masked patch tokens); how each group is normalised is the
head's business (:class:`~dinov2.layers.dino_head.DINOHead`). A loss whose weight is 0 is not
computed at all.

InfoNCE (``infonce.loss_weight``) contrasts the student's two global crops of each image on the
DINO head's L2-normalised bottleneck (after its BatchNorm), against every other crop of the
global batch; it needs no teacher.

Gram anchoring (``gram.use_loss``) adds ``gram_loss`` on the student's global-crop patch tokens
against a :class:`~dinov2.train.gram_teacher.GramTeacher`, which the trainer owns (its weights
are not part of this module's ``state_dict``) and passes to :meth:`SSLMetaArch.forward_backward`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

from dinov2 import distributed
from dinov2.layers.dino_head import DINOHead
from dinov2.loss import DINOLoss, GramLoss, InfoNCELoss, KoLeoLoss, iBOTPatchLoss
from dinov2.models import build_model_from_cfg
from dinov2.train.warm_start import load_warm_start_weights

logger = logging.getLogger("dinov2")

__all__ = ["SSLMetaArch", "CENTERINGS", "PRECISIONS"]

CENTERINGS = ("centering", "sinkhorn_knopp")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: the local shard of an FSDP2 DTensor, else the data itself."""
    data = param.data
    to_local = getattr(data, "to_local", None)
    return to_local() if to_local is not None else data


def _precision(name: str, key: str) -> torch.dtype:
    if name not in PRECISIONS:
        raise ValueError(f"compute_precision.{key} must be one of {sorted(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def _batch_all_reduce(process_group=None):
    """The sum over the ranks sharing the batch that GlobalBatchNorm1d takes (None: one process)."""
    if not distributed.is_enabled():
        return None
    return functools.partial(distributed.differentiable_all_reduce_sum, group=process_group)


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: DictConfig, process_group=None):
        """``process_group``: the ranks whose batches this model trains on (its heads' BatchNorm
        statistics, centring, Sinkhorn-Knopp and KoLeo reduce over them); None: all ranks. A
        distillation student trained on a subset of ranks passes its own."""
        super().__init__()
        self.cfg = cfg
        self.process_group = process_group
        if cfg.train.centering not in CENTERINGS:
            raise ValueError(f"train.centering must be one of {CENTERINGS}, got {cfg.train.centering!r}")
        self.centering = cfg.train.centering
        self.dino_loss_weight = float(cfg.dino.loss_weight)
        self.koleo_loss_weight = float(cfg.dino.koleo_loss_weight)
        self.ibot_loss_weight = float(cfg.ibot.loss_weight)
        self.infonce_loss_weight = float(cfg.infonce.loss_weight)
        self.do_dino = self.dino_loss_weight > 0
        self.do_koleo = self.koleo_loss_weight > 0
        self.do_ibot = self.ibot_loss_weight > 0
        self.do_infonce = self.infonce_loss_weight > 0
        if not (self.do_dino or self.do_ibot or self.do_koleo or self.do_infonce):
            raise ValueError(
                "dino.loss_weight, dino.koleo_loss_weight, ibot.loss_weight and infonce.loss_weight are all 0: "
                "nothing to train"
            )
        self.separate_ibot_head = bool(cfg.ibot.separate_head)
        self.n_global_crops = 2
        self.n_local_crops = int(cfg.crops.local_crops_number)
        self.param_dtype = _precision(cfg.compute_precision.param_dtype, "param_dtype")
        self.teacher_dtype = _precision(cfg.compute_precision.teacher_dtype, "teacher_dtype")

        student_backbone, teacher_backbone, embed_dim = build_model_from_cfg(cfg)
        self.embed_dim = embed_dim
        if cfg.student.pretrained_weights:
            # Continued pretraining: both start from the given backbone, the heads start fresh.
            # (position embeddings resampled when the file was made for another image size)
            load_warm_start_weights(student_backbone, cfg.student.pretrained_weights)
            logger.info("student and teacher backbones initialised from %s", cfg.student.pretrained_weights)

        student = {"backbone": student_backbone, "dino_head": self._make_head(cfg.dino, embed_dim)}
        teacher = {"backbone": teacher_backbone, "dino_head": self._make_head(cfg.dino, embed_dim)}
        if self.separate_ibot_head:
            student["ibot_head"] = self._make_head(cfg.ibot, embed_dim)
            teacher["ibot_head"] = self._make_head(cfg.ibot, embed_dim)
        elif cfg.ibot.head_n_prototypes != cfg.dino.head_n_prototypes and self.do_ibot:
            raise ValueError(
                f"ibot.head_n_prototypes ({cfg.ibot.head_n_prototypes}) differs from dino.head_n_prototypes "
                f"({cfg.dino.head_n_prototypes}) but the iBOT head is shared; set ibot.separate_head=true"
            )
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(teacher)

        # The teacher starts as an exact copy of the student (stochastic depth has no parameters).
        student_names = [name for name, _ in self.student.named_parameters()]
        teacher_names = [name for name, _ in self.teacher.named_parameters()]
        if student_names != teacher_names:
            raise RuntimeError("student and teacher parameters differ in names or order")
        self.teacher.load_state_dict(self.student.state_dict(), strict=True)
        for param in self.teacher.parameters():
            param.requires_grad_(False)

        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes, student_temp=float(cfg.dino.student_temp))
        ibot_prototypes = cfg.ibot.head_n_prototypes if self.separate_ibot_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(
            ibot_prototypes, student_temp=float(cfg.dino.student_temp), weighting=cfg.ibot.patch_weighting
        )
        # Neighbours over the global batch, so a multi-rank run computes the same KoLeo term as
        # one process with the whole batch (dino.koleo_distributed=false: per rank, as upstream).
        self.koleo_loss = KoLeoLoss(distributed=bool(cfg.dino.koleo_distributed))
        self.infonce_loss = InfoNCELoss(temperature=float(cfg.infonce.temperature))
        for loss in (self.dino_loss, self.ibot_patch_loss, self.koleo_loss, self.infonce_loss):
            loss.process_group = process_group
        self.gram_loss_weight = float(cfg.gram.loss_weight) if cfg.gram.use_loss else 0.0
        self.gram_loss = GramLoss(
            remove_neg=bool(cfg.gram.remove_neg), remove_only_teacher_neg=bool(cfg.gram.remove_only_teacher_neg)
        )
        self._center_backup: Optional[Dict[str, torch.Tensor]] = None

    @staticmethod
    def _make_head(head_cfg: DictConfig, embed_dim: int, process_group=None) -> DINOHead:
        return DINOHead(
            in_dim=embed_dim,
            out_dim=head_cfg.head_n_prototypes,
            nlayers=head_cfg.head_nlayers,
            hidden_dim=head_cfg.head_hidden_dim,
            bottleneck_dim=head_cfg.head_bottleneck_dim,
            use_bn=bool(head_cfg.head_use_bn),
            norm_last_layer=bool(head_cfg.head_norm_last_layer),
            # BatchNorm statistics over every rank's batch (the model is built after distributed.enable()).
            bn_all_reduce=_batch_all_reduce(process_group),
        )

    # ---------------------------------------------------------------- helpers
    def _head_logits(
        self,
        modules: nn.ModuleDict,
        cls_groups: List[torch.Tensor],
        masked_tokens: Optional[torch.Tensor],
        with_bottleneck: bool = False,
    ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(DINO logits of each CLS group, iBOT logits of the masked patch tokens or None, the DINO
        head's bottleneck features of the first CLS group if ``with_bottleneck``, else None).

        One call per head module, with every group it scores (an FSDP-wrapped head is then
        gathered once); the head keeps the groups apart where it normalises over the batch.
        """
        dino_logits, ibot_logits, bottleneck = [], None, None
        shared = masked_tokens is not None and not self.separate_ibot_head
        groups = cls_groups + [masked_tokens] if shared else cls_groups
        if groups:
            dino_logits = modules["dino_head"](groups, with_bottleneck=with_bottleneck)
            if with_bottleneck:
                dino_logits, bottlenecks = dino_logits
                bottleneck = bottlenecks[0]
        if shared:
            dino_logits, ibot_logits = dino_logits[:-1], dino_logits[-1]
        elif masked_tokens is not None:
            ibot_logits = modules["ibot_head"](masked_tokens)
        return dino_logits, ibot_logits, bottleneck

    def _autocast(self, dtype: torch.dtype, device: torch.device):
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def forward(self, *args, **kwargs):
        raise RuntimeError("SSLMetaArch is driven by forward_backward(data, teacher_temp), not forward()")

    def train(self, mode: bool = True):
        super().train(mode)
        # No stochastic depth or dropout in the teacher (BatchNorm in its heads still normalises
        # with the statistics of its own batch: DINOHead.train).
        self.teacher.eval()
        return self

    # ---------------------------------------------------------------- teacher
    @torch.no_grad()
    def _teacher_logits(
        self, global_crops: torch.Tensor, mask_indices: torch.Tensor
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(DINO logits of the teacher's global-crop CLS tokens, iBOT logits of its patch tokens at
        ``mask_indices``), each None when its loss is off. Distillation students override this
        (:mod:`dinov2.train.distill_meta_arch`): their targets come from a frozen teacher."""
        with self._autocast(self.teacher_dtype, global_crops.device):
            out = self.teacher["backbone"](global_crops, is_training=True)
            masked_tokens = None
            if self.do_ibot:
                patch_tokens = out["x_norm_patchtokens"].flatten(0, 1)
                masked_tokens = torch.index_select(patch_tokens, 0, mask_indices)
            # The teacher's CLS tokens of both global crops are one group (one crop size).
            cls_groups = [out["x_norm_clstoken"]] if self.do_dino else []
            dino_groups, ibot_logits, _ = self._head_logits(self.teacher, cls_groups, masked_tokens)
        return (dino_groups[0] if dino_groups else None), ibot_logits

    @torch.no_grad()
    def _teacher_targets(
        self, global_crops: torch.Tensor, mask_indices: torch.Tensor, n_masked: int, teacher_temp: float
    ):
        """Teacher targets: per global crop for DINO, per masked patch for iBOT."""
        dino_logits, ibot_logits = self._teacher_logits(global_crops, mask_indices)
        batch = global_crops.shape[0] // self.n_global_crops
        dino_targets = ibot_targets = None
        if dino_logits is not None:
            dino_logits = dino_logits.float()
            if self.centering == "centering":
                dino_targets = self.dino_loss.softmax_center_teacher(dino_logits, teacher_temp)
                self.dino_loss.update_center(dino_logits)
            else:
                dino_targets = self.dino_loss.sinkhorn_knopp_teacher(dino_logits, teacher_temp)
            dino_targets = dino_targets.view(self.n_global_crops, batch, -1)
        if ibot_logits is not None:
            ibot_logits = ibot_logits.float()
            if self.centering == "centering":
                ibot_targets = self.ibot_patch_loss.softmax_center_teacher(ibot_logits, teacher_temp)
                self.ibot_patch_loss.update_center(ibot_logits)
            else:
                ibot_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    ibot_logits, teacher_temp, n_samples=n_masked
                )
        return dino_targets, ibot_targets

    # ------------------------------------------------------------------- step
    def forward_backward(
        self, data: dict, teacher_temp: float, scaler=None, gram_targets: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """Compute every loss term on one collated batch and back-propagate the weighted total.

        Args:
            data: the output of :func:`dinov2.data.collate.collate_data_and_cast`, tensors on the
                model's device.
            teacher_temp: teacher softmax temperature of this iteration.
            scaler: a ``torch.amp.GradScaler`` (fp16) or None.
            gram_targets: the Gram teacher's patch tokens of the global crops on the student's
                patch grid (:meth:`~dinov2.train.gram_teacher.GramTeacher.patch_tokens`), when the
                Gram term is on at this iteration; None otherwise.

        Returns:
            Detached scalar tensors: ``dino_global_crops_loss`` and ``dino_local_crops_loss``
            (shares of ``dino_loss``, which is their sum), ``dino_loss``, ``ibot_loss``,
            ``koleo_loss``, ``infonce_loss``, ``gram_loss`` (each unweighted, only those computed) and ``total_loss`` (weighted sum,
            the value back-propagated).
        """
        self._backup_centers()
        global_crops = data["collated_global_crops"]
        local_crops = data["collated_local_crops"] if self.n_local_crops > 0 else None
        masks = data["collated_masks"]
        mask_indices = data["mask_indices_list"]
        n_masked = int(data["n_masked_patches"])
        mask_indices = mask_indices[:n_masked]
        masks_weight = data["masks_weight"][:n_masked]
        device = global_crops.device
        n_global_images = global_crops.shape[0]
        # With no masked patch on this rank the iBOT head still runs (on zero rows): under FSDP
        # every rank must call the same modules.
        do_ibot = self.do_ibot

        dino_targets, ibot_targets = self._teacher_targets(global_crops, mask_indices, n_masked, teacher_temp)

        student = self.student
        with self._autocast(self.param_dtype, device):
            inputs = [global_crops] + ([local_crops] if local_crops is not None else [])
            student_masks = [masks if self.do_ibot else None] + ([None] if local_crops is not None else [])
            outputs = student["backbone"](inputs, masks=student_masks, is_training=True)
            global_out = outputs[0]
            global_cls = global_out["x_norm_clstoken"]
            local_cls = outputs[1]["x_norm_clstoken"] if local_crops is not None else None

            masked_tokens = None
            if do_ibot:
                masked_tokens = torch.index_select(global_out["x_norm_patchtokens"].flatten(0, 1), 0, mask_indices)

            # One group per crop size: the CLS tokens of small local crops are distributed
            # differently from those of global crops. InfoNCE needs the head's bottleneck of the
            # global crops, so the head runs for it even without the DINO loss.
            cls_groups = []
            if self.do_dino:
                cls_groups = [global_cls] + ([local_cls] if local_cls is not None else [])
            elif self.do_infonce:
                cls_groups = [global_cls]
            dino_groups, ibot_logits, global_bottleneck = self._head_logits(
                student, cls_groups, masked_tokens, with_bottleneck=self.do_infonce
            )

        losses: Dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=device, dtype=torch.float32)
        if self.do_dino:
            global_logits = list(dino_groups[0].float().chunk(self.n_global_crops))
            teacher_list = list(dino_targets.unbind(0))
            # Pairs: every student global crop against the *other* teacher global crop(s), and
            # every local crop against every teacher global crop; dino_loss is their mean.
            global_loss = self.dino_loss(global_logits, teacher_list, skip_same_view=True)
            n_global_pairs = DINOLoss.num_pairs(self.n_global_crops, self.n_global_crops, skip_same_view=True)
            n_local_pairs = DINOLoss.num_pairs(self.n_local_crops, self.n_global_crops, skip_same_view=False)
            n_pairs = n_global_pairs + n_local_pairs
            global_share = global_loss * (n_global_pairs / n_pairs)
            dino_loss = global_share
            losses["dino_global_crops_loss"] = global_share
            if local_cls is not None:
                local_logits = list(dino_groups[1].float().chunk(self.n_local_crops))
                local_loss = self.dino_loss(local_logits, teacher_list, skip_same_view=False)
                local_share = local_loss * (n_local_pairs / n_pairs)
                dino_loss = dino_loss + local_share
                losses["dino_local_crops_loss"] = local_share
            losses["dino_loss"] = dino_loss
            total = total + self.dino_loss_weight * dino_loss
        if self.do_koleo:
            # Sum over the global crops, each crop's batch on its own (upstream convention).
            koleo = sum(self.koleo_loss(chunk) for chunk in global_cls.float().chunk(self.n_global_crops))
            losses["koleo_loss"] = koleo
            total = total + self.koleo_loss_weight * koleo
        if self.do_infonce:
            infonce = self.infonce_loss(global_bottleneck.float().chunk(self.n_global_crops))
            losses["infonce_loss"] = infonce
            total = total + self.infonce_loss_weight * infonce
        if do_ibot:
            ibot = self.ibot_patch_loss.forward_masked(
                ibot_logits.float(), ibot_targets, masks_weight=masks_weight, n_images=n_global_images
            )
            losses["ibot_loss"] = ibot
            total = total + self.ibot_loss_weight * ibot
        if gram_targets is not None:
            # On the student's (masked) global-crop patches, as DINOv3: the Gram teacher saw the
            # unmasked crops, so the term also asks masked patches to keep their similarities.
            gram = self.gram_loss(global_out["x_norm_patchtokens"], gram_targets)
            losses["gram_loss"] = gram
            total = total + self.gram_loss_weight * gram
        losses["total_loss"] = total

        if scaler is not None:
            scaler.scale(total).backward()
        else:
            total.backward()
        return {name: value.detach() for name, value in losses.items()}

    @torch.no_grad()
    def gram_targets(self, gram_teacher: nn.Module, global_crops: torch.Tensor) -> torch.Tensor:
        """The Gram teacher's patch tokens of ``global_crops`` on the student's patch grid, in the
        teacher's precision (the ``gram_targets`` of :meth:`forward_backward`)."""
        patch_size = self.student["backbone"].patch_size
        grid = (global_crops.shape[-2] // patch_size, global_crops.shape[-1] // patch_size)
        with self._autocast(self.teacher_dtype, global_crops.device):
            return gram_teacher.patch_tokens(global_crops, grid)

    # ------------------------------------------------------------ EMA teacher
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student`` for every parameter.

        Works on plain tensors and on FSDP2 DTensors alike: student and teacher are sharded the
        same way, so their local shards correspond element by element.
        """
        teacher_params: List[torch.Tensor] = []
        student_params: List[torch.Tensor] = []
        for s_param, t_param in zip(self.student.parameters(), self.teacher.parameters()):
            student_local, teacher_local = _local_tensor(s_param), _local_tensor(t_param)
            if student_local.shape != teacher_local.shape:
                raise RuntimeError(
                    f"student and teacher shards differ in shape: {tuple(student_local.shape)} vs {tuple(teacher_local.shape)}"
                )
            student_params.append(student_local.to(teacher_local.dtype))
            teacher_params.append(teacher_local)
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    # ------------------------------------------------------ centre bookkeeping
    def _center_buffers(self) -> Dict[str, torch.Tensor]:
        return {"dino_loss": self.dino_loss.center, "ibot_patch_loss": self.ibot_patch_loss.center}

    def _backup_centers(self) -> None:
        self._center_backup = {name: buf.detach().clone() for name, buf in self._center_buffers().items()}

    @torch.no_grad()
    def revert_centers(self) -> None:
        """Undo the centre updates of the last ``forward_backward`` (used when its step is skipped
        because a loss was not finite, so no NaN reaches the centres)."""
        if self._center_backup is None:
            return
        for name, buf in self._center_buffers().items():
            buf.copy_(self._center_backup[name])

    # -------------------------------------------------------------- freezing
    def last_layer_parameters(self) -> List[nn.Parameter]:
        """The student's trainable prototype tensors (``*.last_layer.weight_v``, and ``weight_g``
        unless ``head_norm_last_layer``), frozen for the first epoch(s)."""
        return [p for name, p in self.student.named_parameters() if "last_layer" in name]

    def zero_last_layer_grads(self) -> None:
        for param in self.last_layer_parameters():
            param.grad = None

    def teacher_backbone(self) -> nn.Module:
        return self.teacher["backbone"]
