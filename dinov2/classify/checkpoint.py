"""Classifier files: everything ``predict`` needs in one weights-only-loadable ``.pth``.

Layout (a plain dict, so ``torch.load(..., weights_only=True)`` reads it)::

    {"format": "dinov2-classifier", "format_version": 1,
     "config": "<JSON: backbone build spec, heads, preprocessing, lora, extra>",
     "state_dict": {name: tensor}}

``lora`` is ``null`` for plain (or merged) weights; otherwise it holds the adapter settings and the
state dict has adapter keys, which :func:`load_classifier` re-creates before loading strictly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from dinov2.hub.sources import build_backbone_from_spec
from dinov2.hub.weights import WeightsError, check_state_dict, load_weights_only
from dinov2.utils.io import atomic_torch_save

from .heads import HeadSpec, MultiHeadClassifier
from .lora import add_lora, has_lora

FORMAT = "dinov2-classifier"
FORMAT_VERSION = 1
# Names looked for, in order, when a directory (a classifier training output) is given.
DIRECTORY_CANDIDATES = ("model_best.pth", "model_final.pth")
PathLike = Union[str, os.PathLike]


class ClassifierFileError(ValueError):
    """A file that is not a readable classifier; the message names it."""


@dataclass
class ClassifierConfig:
    backbone: Dict[str, Any]
    heads: List[HeadSpec]
    preprocessing: Dict[str, Any]
    head_dropout: float = 0.0
    lora: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "backbone": self.backbone,
                "heads": [h.to_dict() for h in self.heads],
                "preprocessing": self.preprocessing,
                "head_dropout": self.head_dropout,
                "lora": self.lora,
                "extra": self.extra,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "ClassifierConfig":
        data = json.loads(text)
        return cls(
            backbone=data["backbone"],
            heads=[HeadSpec.from_dict(h) for h in data["heads"]],
            preprocessing=data["preprocessing"],
            head_dropout=float(data.get("head_dropout", 0.0)),
            lora=data.get("lora"),
            extra=data.get("extra", {}),
        )


def build_classifier(config: ClassifierConfig) -> MultiHeadClassifier:
    """A randomly initialised classifier of the architecture ``config`` describes."""
    backbone = build_backbone_from_spec(config.backbone)
    if config.lora is not None:
        add_lora(backbone, config.lora)
    return MultiHeadClassifier(backbone, config.heads, dropout=config.head_dropout)


def save_classifier(path: PathLike, model: MultiHeadClassifier, config: ClassifierConfig) -> Path:
    """Write ``model`` + ``config`` atomically; ``config.lora`` must say whether adapters are present."""
    if (config.lora is not None) != has_lora(model):
        raise ValueError(
            f"config.lora={config.lora!r} but the model {'has' if has_lora(model) else 'has no'} LoRA adapters"
        )
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_json(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    return atomic_torch_save(payload, path)


def resolve_classifier_path(path: PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in DIRECTORY_CANDIDATES:
            if (path / name).is_file():
                return path / name
        raise ClassifierFileError(f"directory {path} holds none of {list(DIRECTORY_CANDIDATES)}")
    if not path.is_file():
        raise FileNotFoundError(f"classifier file not found: {path}")
    return path


def read_classifier_file(path: PathLike) -> tuple[ClassifierConfig, Dict[str, torch.Tensor], Path]:
    path = resolve_classifier_path(path)
    try:
        payload = load_weights_only(path, "classifier file")
    except WeightsError as error:  # refused (pickled code), empty, truncated or not a torch file
        raise ClassifierFileError(str(error)) from error.__cause__
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ClassifierFileError(f"{path} is not a dinov2 classifier file (no format={FORMAT!r} entry)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ClassifierFileError(f"{path}: unsupported format_version {payload.get('format_version')!r}")
    try:
        config = ClassifierConfig.from_json(payload["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise ClassifierFileError(f"{path}: bad classifier config: {error}") from error
    return config, payload["state_dict"], path


def load_classifier(
    path: PathLike, device: Union[str, torch.device] = "cpu"
) -> tuple[MultiHeadClassifier, ClassifierConfig]:
    """(model in eval mode on ``device``, config) from a classifier file or a training output directory."""
    config, state, path = read_classifier_file(path)
    model = build_classifier(config)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), config
