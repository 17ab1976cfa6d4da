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
from .sources import (
    BackboneSourceError,
    build_backbone_from_spec,
    load_backbone,
    load_backbone_from_config,
    resolve_weights_path,
)
from .weights import WeightsError, load_backbone_weights, read_state_dict, save_state_dict

__all__ = [
    "BackboneSourceError",
    "ENTRY_POINTS",
    "WeightsError",
    "build_backbone_from_spec",
    "dinov2_vitb14",
    "dinov2_vitb14_reg",
    "dinov2_vitg14",
    "dinov2_vitg14_reg",
    "dinov2_vitl14",
    "dinov2_vitl14_reg",
    "dinov2_vits14",
    "dinov2_vits14_reg",
    "load_backbone",
    "load_backbone_from_config",
    "load_backbone_weights",
    "make_dinov2_model",
    "read_state_dict",
    "resolve_weights_path",
    "save_state_dict",
]
