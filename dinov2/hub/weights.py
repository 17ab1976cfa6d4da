"""Reading backbone weights from files, and strict loading with useful errors.

Accepted files: a plain state dict in the official DINOv2 key format (``.pth``/``.pt``), a
``.safetensors`` file, or a checkpoint dict that nests one (``{"teacher": {...}}`` with
``backbone.``-prefixed keys, as upstream training writes, or ``{"model": {...}}``).
Nothing here unpickles arbitrary objects: ``torch.load(..., weights_only=True)`` only.
"""

import os
from pathlib import Path
from typing import Dict, Mapping, Union

import torch
from torch import nn

from dinov2.utils.io import atomic_path

PathLike = Union[str, os.PathLike]

# Where a nested checkpoint keeps its backbone, and the key prefix to strip, in lookup order.
_NESTED_LOCATIONS = (
    ("teacher_backbone", ""),
    ("teacher", "backbone."),
    ("model", ""),
    ("state_dict", ""),
)


class WeightsError(ValueError):
    """A weights file does not match the model it is loaded into."""


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Tensors of a weights file, unwrapped from known checkpoint layouts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # re-raised with the file name; weights_only refuses code
            raise WeightsError(f"cannot read {path} as a weights-only torch file: {error}") from error
    return unwrap_backbone_state_dict(state, source=str(path))


def unwrap_backbone_state_dict(state: Mapping, source: str = "state dict") -> Dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise WeightsError(f"{source}: expected a dict of tensors, got {type(state).__name__}")
    if "cls_token" not in state:
        for key, prefix in _NESTED_LOCATIONS:
            nested = state.get(key)
            if isinstance(nested, Mapping):
                stripped = {k[len(prefix) :]: v for k, v in nested.items() if k.startswith(prefix)}
                if stripped:
                    return unwrap_backbone_state_dict(stripped, source=f"{source}[{key!r}]")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    not_tensors = sorted(set(state) - set(tensors))
    if not_tensors:
        raise WeightsError(f"{source}: entries that are not tensors: {not_tensors[:10]}")
    return tensors


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise ``WeightsError`` listing missing, unexpected and mis-shaped keys, if any."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if keys:
                problems.append(f"{title} ({len(keys)}): " + ", ".join(keys))
        raise WeightsError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))


def load_backbone_weights(model: nn.Module, path_or_state: Union[PathLike, Mapping]) -> nn.Module:
    """Load weights into ``model`` strictly; errors list every bad key."""
    if isinstance(path_or_state, Mapping):
        state, source = unwrap_backbone_state_dict(path_or_state), "state dict"
    else:
        state, source = read_state_dict(path_or_state), str(path_or_state)
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)
    return model


def save_state_dict(state: Mapping[str, torch.Tensor], path: PathLike) -> Path:
    """Write a state dict atomically (``.safetensors`` by suffix, torch format otherwise)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp))
        else:
            torch.save(tensors, tmp)
    return path
