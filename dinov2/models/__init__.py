"""Backbone construction from a training config."""

from typing import Tuple

from omegaconf import DictConfig

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
    )


def build_backbone(student_cfg: DictConfig, img_size: int, drop_path_rate: float = 0.0) -> DinoVisionTransformer:
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
    gets ``train.stochastic_depth`` and ``train.activation_checkpointing``: the teacher runs
    without gradients, so it has no activations to save.
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
    return student, teacher, student.embed_dim


__all__ = [
    "ARCHITECTURES",
    "DinoVisionTransformer",
    "build_backbone",
    "build_model_from_cfg",
    "make_vit",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_large",
    "vit_giant2",
]
