"""Reading backbone weights from files, and strict loading with useful errors.

Accepted files: a plain state dict in the official DINOv2 key format (``.pth``/``.pt``), a
``.safetensors`` file, or a checkpoint dict that nests one (``{"teacher": {...}}`` with
``backbone.``-prefixed keys, as upstream training writes, or ``{"model": {...}}``).
Nothing here unpickles arbitrary objects: ``torch.load(..., weights_only=True)`` only, through
:func:`load_weights_only`, which backbone weights, classifier files and classifier resume states
share, so that a refused, empty, truncated or foreign file gets an error that names it and says why.
"""

import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

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
    """A weights file that cannot be read, or does not match the model it is loaded into."""


# How torch's weights-only unpickler names a global it refuses ("GLOBAL posix.system ...").
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")
# The unpickler's own reason, which torch wraps in advice (including "retry with weights_only=False",
# exactly what must not be done with a file from a stranger).
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\nCheck the documentation|$)", re.S)


def _unpickling_refusal(error: pickle.UnpicklingError) -> Optional[str]:
    """Why the weights-only unpickler refused the file, or None when the data is simply not a
    pickle it can parse (garbage, truncation)."""
    message = str(error)
    found = _REFUSED_GLOBAL.search(message)
    if found:
        return (
            f"it contains a pickled global {found.group(1)} that weights-only loading does not allow "
            "(unpickling it could run code; only tensors and plain containers are read)"
        )
    reason = _UNPICKLER_REASON.search(message)
    detail = " ".join(reason.group(1).split()) if reason else message.strip().splitlines()[-1]
    if detail.startswith(("Unsupported operand", "String is too long")) or "WeightsUnpickler" not in message:
        return None
    return f"its pickle data holds objects that weights-only loading does not allow ({detail})"


def load_weights_only(path: PathLike, what: str = "torch file") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with errors that name the file and say why.

    ``what`` says what the file is meant to be ("weights file", "classifier resume state", ...).
    A pickle that needs anything beyond tensors and plain containers is refused, never retried
    with ``weights_only=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"cannot read {what} {path}: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # ``from None``: torch's own message suggests retrying with weights_only=False, the unsafe way.
        refusal = _unpickling_refusal(error)
        if refusal is None:
            raise WeightsError(_unreadable(what, path, error)) from None
        raise WeightsError(f"refusing to load {what} {path}: {refusal}") from None
    except RuntimeError as error:
        if "PytorchStreamReader" not in str(error):
            raise
        raise WeightsError(_unreadable(what, path, error)) from error
    except (EOFError, KeyError, ValueError, OSError, IndexError) as error:
        raise WeightsError(_unreadable(what, path, error)) from error


def _unreadable(what: str, path: Path, error: BaseException) -> str:
    # torch's messages run on with advice; the first sentence (or the unpickler's reason) is the point.
    found = _UNPICKLER_REASON.search(str(error))
    reason = " ".join(found.group(1).split()) if found else str(error).split(". ")[0]
    return (
        f"cannot read {what} {path}: the file is truncated or corrupt, or not a torch file "
        f"({type(error).__name__}: {reason})"
    )


def load_safetensors_file(path: PathLike, what: str = "weights file") -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file (a format that cannot hold code), errors naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"cannot read {what} {path}: the file is empty (0 bytes)")
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise WeightsError(f"cannot read {what} {path} as a safetensors file: {error}") from error


def read_state_dict(path: PathLike, what: str = "weights file") -> Dict[str, torch.Tensor]:
    """Tensors of a weights file, unwrapped from known checkpoint layouts; ``what`` names the
    file's role in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        state = load_safetensors_file(path, what)
    else:
        state = load_weights_only(path, what)
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
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
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
