"""LoRA adapters on the backbone's attention (and optionally MLP) projections, via ``peft``.

Adapters are injected in place (``peft.inject_adapter_in_model``), so the backbone keeps its class
and key names (``blocks.0.attn.qkv.base_layer.weight``, ``...qkv.lora_A.default.weight``).
:func:`merge_lora` folds them back into plain ``nn.Linear`` weights for export.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from torch import nn

ATTENTION_TARGETS = ("qkv", "proj")
# The feed-forward linears of every backbone built here: Mlp (fc1, fc2), DINOv2's SwiGLU (w12
# fused, w3) and DINOv3's SwiGLUFFNAligned (w1, w2, w3). Names match whole (peft's fullmatch),
# so w1 is not w12.
MLP_TARGETS = ("fc1", "fc2", "w12", "w1", "w2", "w3")


def lora_settings(r: int = 8, alpha: float = 16.0, dropout: float = 0.0, mlp: bool = False) -> Dict[str, Any]:
    """The plain-value description of an adapter set, as stored in checkpoints."""
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    return {"r": int(r), "alpha": float(alpha), "dropout": float(dropout), "mlp": bool(mlp)}


def _target_regex(mlp: bool) -> str:
    # Only the transformer blocks: a bare "proj" would also match patch_embed.proj (a Conv2d).
    parts = [rf"attn\.{name}" for name in ATTENTION_TARGETS]
    if mlp:
        parts += [rf"mlp\.{name}" for name in MLP_TARGETS]
    return rf"(.*\.)?blocks\.\d+\.({'|'.join(parts)})"


def add_lora(backbone: nn.Module, settings: Mapping[str, Any]) -> nn.Module:
    """Inject adapters into ``backbone`` in place; afterwards only adapter weights require grad."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise ImportError("LoRA needs the peft package: pip install 'dinov2[lora]'") from error
    config = LoraConfig(
        r=int(settings["r"]),
        lora_alpha=float(settings["alpha"]),
        lora_dropout=float(settings["dropout"]),
        target_modules=_target_regex(bool(settings.get("mlp", False))),
        bias="none",
    )
    inject_adapter_in_model(config, backbone)
    if not has_lora(backbone):
        raise ValueError(f"no LoRA target modules (attn.qkv/attn.proj) found in {type(backbone).__name__}")
    for name, param in backbone.named_parameters():
        param.requires_grad = "lora_" in name
    return backbone


def _lora_layers(module: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def has_lora(module: nn.Module) -> bool:
    try:
        return bool(_lora_layers(module))
    except ImportError:
        return False


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the base layer back in place (in place)."""
    for name, layer in _lora_layers(module):
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return module


def trainable_fraction(model: nn.Module) -> Dict[str, float]:
    """Trainable and total parameter counts and their ratio."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}
