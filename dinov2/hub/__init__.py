from .backbones import (
    ENTRY_POINTS,
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
    make_dinov2_model,
)
from .weights import WeightsError, load_backbone_weights, read_state_dict, save_state_dict

__all__ = [
    "ENTRY_POINTS",
    "WeightsError",
    "dinov2_vitb14",
    "dinov2_vitb14_reg",
    "dinov2_vitg14",
    "dinov2_vitg14_reg",
    "dinov2_vitl14",
    "dinov2_vitl14_reg",
    "dinov2_vits14",
    "dinov2_vits14_reg",
    "load_backbone_weights",
    "make_dinov2_model",
    "read_state_dict",
    "save_state_dict",
]
