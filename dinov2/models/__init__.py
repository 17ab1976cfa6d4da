"""Backbone construction from a training config."""

from typing import Tuple

from omegaconf import DictConfig
from torch import nn

from dinov2.layers.drop_path import STOCHASTIC_DEPTH_MODES

from .vision_transformer import (
    ARCHITECTURES,
    DinoVisionTransformer,
    make_vit,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)
from .vision_transformer_v3 import (
    ARCHITECTURES_V3,
    DINOV3_RELEASES,
    DinoV3VisionTransformer,
    make_dinov3_release,
    make_vit_v3,
)

GENERATIONS = ("dinov2", "dinov3")


def _backbone_kwargs(student_cfg: DictConfig, img_size: int) -> dict:
    return dict(
        img_size=img_size,
        patch_size=student_cfg.patch_size,
        init_values=student_cfg.layerscale,
        ffn_layer=student_cfg.ffn_layer,
        block_chunks=student_cfg.block_chunks,
        qkv_bias=student_cfg.qkv_bias,
        proj_bias=student_cfg.proj_bias,
        ffn_bias=student_cfg.ffn_bias,
        num_register_tokens=student_cfg.num_register_tokens,
        interpolate_offset=student_cfg.interpolate_offset,
        interpolate_antialias=student_cfg.interpolate_antialias,
        embed_dim=student_cfg.get("embed_dim"),
        depth=student_cfg.get("depth"),
        num_heads=student_cfg.get("num_heads"),
        mlp_ratio=student_cfg.get("mlp_ratio"),
        patch_embed=student_cfg.get("patch_embed", "linear"),
    )


def _dinov3_backbone_kwargs(student_cfg: DictConfig, img_size: int) -> dict:
    if student_cfg.block_chunks not in (0, None):
        raise ValueError("student.block_chunks > 0 is not supported: blocks are kept flat as in the released weights")
    v3 = student_cfg.dinov3
    return dict(
        img_size=img_size,
        patch_size=student_cfg.patch_size,
        init_values=student_cfg.layerscale,
        ffn_layer=student_cfg.ffn_layer,
        qkv_bias=student_cfg.qkv_bias,
        proj_bias=student_cfg.proj_bias,
        ffn_bias=student_cfg.ffn_bias,
        num_storage_tokens=student_cfg.num_register_tokens,
        mask_k_bias=v3.mask_k_bias,
        norm_eps=v3.norm_eps,
        untie_cls_and_patch_norms=v3.untie_cls_and_patch_norms,
        untie_global_and_local_cls_norm=v3.untie_global_and_local_cls_norm,
        rope_base=v3.rope_base,
        rope_normalize_coords=v3.rope_normalize_coords,
        rope_shift_coords=v3.rope_shift_coords,
        rope_jitter_coords=v3.rope_jitter_coords,
        rope_rescale_coords=v3.rope_rescale_coords,
        embed_dim=student_cfg.get("embed_dim"),
        depth=student_cfg.get("depth"),
        num_heads=student_cfg.get("num_heads"),
        mlp_ratio=student_cfg.get("mlp_ratio"),
    )


def build_backbone(student_cfg: DictConfig, img_size: int, drop_path_rate: float = 0.0) -> nn.Module:
    """The backbone a ``student`` config section describes: a :class:`DinoVisionTransformer`, or
    with ``student.generation: dinov3`` a :class:`DinoV3VisionTransformer` (``student.dinov3.*``)."""
    generation = student_cfg.get("generation", "dinov2")
    if generation not in GENERATIONS:
        raise ValueError(f"student.generation must be one of {list(GENERATIONS)}, got {generation!r}")
    if generation == "dinov3":
        if student_cfg.get("patch_embed", "linear") != "linear":
            raise ValueError(f"student.patch_embed {student_cfg.patch_embed!r} needs student.generation dinov2")
        return make_vit_v3(
            student_cfg.arch,
            drop_path_rate=drop_path_rate,
            drop_path_uniform=student_cfg.drop_path_uniform,
            **_dinov3_backbone_kwargs(student_cfg, img_size),
        )
    kwargs = _backbone_kwargs(student_cfg, img_size)
    return make_vit(
        student_cfg.arch,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=student_cfg.drop_path_uniform,
        **kwargs,
    )


def build_model_from_cfg(cfg: DictConfig, only_teacher: bool = False) -> Tuple:
    """(student, teacher, embed_dim) for a training config; the teacher has no stochastic depth.

    With ``only_teacher`` returns (teacher, embed_dim), e.g. for evaluation. Only the student
    gets ``train.stochastic_depth``, ``train.activation_checkpointing`` and
    ``train.packed_attention``: the teacher runs without gradients, so it has no activations to
    save, and sees the global crops only, one resolution.
    """
    img_size = cfg.crops.global_crops_size
    teacher = build_backbone(cfg.student, img_size)
    if only_teacher:
        return teacher, teacher.embed_dim
    student = build_backbone(cfg.student, img_size, drop_path_rate=cfg.student.drop_path_rate)
    train = cfg.get("train") or {}
    mode = train.get("stochastic_depth", "mask")
    if mode not in STOCHASTIC_DEPTH_MODES:
        raise ValueError(f"train.stochastic_depth must be one of {list(STOCHASTIC_DEPTH_MODES)}, got {mode!r}")
    for block in student.blocks:
        block.stochastic_depth = mode
    every = train.get("activation_checkpointing", 0)
    try:
        student.set_activation_checkpointing(every)
    except ValueError as e:
        raise ValueError(f"train.activation_checkpointing: {e}") from None
    try:
        student.set_packed_attention(train.get("packed_attention", "per_resolution"))
    except ValueError as e:
        raise ValueError(f"train.packed_attention: {e}") from None
    return student, teacher, student.embed_dim


__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURES_V3",
    "DINOV3_RELEASES",
    "DinoV3VisionTransformer",
    "DinoVisionTransformer",
    "GENERATIONS",
    "build_backbone",
    "build_model_from_cfg",
    "make_dinov3_release",
    "make_vit",
    "make_vit_v3",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_large",
    "vit_giant2",
]
