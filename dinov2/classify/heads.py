"""Classification heads on a backbone: one linear head per named task.

Each head reads a pooled feature of the backbone: the normalised CLS token (``cls``), the mean of
the normalised patch tokens (``mean``) or both concatenated (``cls+mean``). Heads are described by
plain :class:`HeadSpec` values so that a classifier file can rebuild them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn

POOLINGS = ("cls", "mean", "cls+mean")


@dataclass(frozen=True)
class HeadSpec:
    """A task: its name, its class names (index = label id) and the pooled feature it reads."""

    name: str
    classes: Tuple[str, ...]
    pooling: str = "cls"

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"head name must be a non-empty string, got {self.name!r}")
        if len(self.classes) < 2:
            raise ValueError(f"head {self.name!r} needs at least 2 classes, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"head {self.name!r} has duplicate class names: {list(self.classes)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"head {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def to_dict(self) -> dict:
        return {"name": self.name, "classes": list(self.classes), "pooling": self.pooling}

    @classmethod
    def from_dict(cls, data: Mapping) -> "HeadSpec":
        return cls(name=data["name"], classes=tuple(data["classes"]), pooling=data.get("pooling", "cls"))


def backbone_embed_dim(backbone: nn.Module) -> int:
    for attribute in ("embed_dim", "num_features"):
        value = getattr(backbone, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the feature width of {type(backbone).__name__}: no embed_dim/num_features")


def pooled_features(backbone: nn.Module, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``{"cls": (B, D), "mean": (B, D)}`` for a DINOv2 ViT or a timm model."""
    if hasattr(backbone, "forward_features") and hasattr(backbone, "_split_tokens"):  # DinoVisionTransformer
        out = backbone.forward_features(images)
        return {"cls": out["x_norm_clstoken"], "mean": out["x_norm_patchtokens"].mean(dim=1)}
    # timm: forward_features gives tokens (B, N, D) or a feature map (B, C, H, W).
    feats = backbone.forward_features(images)
    pooled = backbone.forward_head(feats, pre_logits=True)
    if feats.ndim == 3:
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        mean = feats[:, prefix:].mean(dim=1)
    elif feats.ndim == 4:
        mean = feats.mean(dim=(2, 3))
    else:
        raise ValueError(f"unexpected timm feature shape {tuple(feats.shape)}")
    return {"cls": pooled, "mean": mean}


class MultiHeadClassifier(nn.Module):
    """Backbone + one linear head per task; ``forward`` returns ``{task: logits (B, C_task)}``."""

    def __init__(self, backbone: nn.Module, heads: Sequence[HeadSpec], dropout: float = 0.0):
        super().__init__()
        if not heads:
            raise ValueError("a classifier needs at least one head")
        names = [h.name for h in heads]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate head names: {names}")
        self.backbone = backbone
        self.head_specs: List[HeadSpec] = list(heads)
        dim = backbone_embed_dim(backbone)
        self.heads = nn.ModuleDict()
        for spec in heads:
            in_dim = 2 * dim if spec.pooling == "cls+mean" else dim
            linear = nn.Linear(in_dim, len(spec.classes))
            nn.init.trunc_normal_(linear.weight, std=0.01)
            nn.init.zeros_(linear.bias)
            self.heads[spec.name] = nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else linear

    @property
    def task_names(self) -> List[str]:
        return [h.name for h in self.head_specs]

    def backbone_is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    def features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.backbone_is_frozen():
            # A frozen backbone needs no autograd graph: saves memory and time in linear probing.
            with torch.no_grad():
                return pooled_features(self.backbone, images)
        return pooled_features(self.backbone, images)

    def forward_from_features(self, pooled: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        logits = {}
        for spec in self.head_specs:
            if spec.pooling == "cls+mean":
                feature = torch.cat((pooled["cls"], pooled["mean"]), dim=-1)
            else:
                feature = pooled[spec.pooling]
            logits[spec.name] = self.heads[spec.name](feature)
        return logits

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.forward_from_features(self.features(images))
