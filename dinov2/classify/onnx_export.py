"""A trained classifier as ONNX, so that it can be served without PyTorch.

``export_classifier_onnx("runs/shapes", "deploy/shapes.onnx")`` writes two files:

* ``shapes.onnx``: ``images`` (B, 3, crop, crop), normalised as the classifier's preprocessing
  says, -> one output per head, ``probabilities:<task>`` (B, C_task), the softmax of its logits.
  The batch is dynamic; the image size is the classifier's ``crop_size`` (what it was trained on);
* ``shapes.json``: the heads (names, class names in output order) and the preprocessing.

:mod:`dinov2.classify.onnx_predict` runs the pair with onnxruntime, numpy and Pillow only. Command
line: ``python -m dinov2.classify.onnx_export --model runs/shapes --output deploy/shapes.onnx``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

from dinov2.hub.interop_onnx import FixedSizeFeatures, export_module_onnx
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.utils.io import atomic_write_text

from .checkpoint import PathLike, load_classifier, resolve_classifier_path
from .heads import MultiHeadClassifier, pooled_features

SIDECAR_FORMAT = "dinov2-classifier-onnx"
SIDECAR_VERSION = 1


def output_name(task: str) -> str:
    return f"probabilities:{task}"


def sidecar_path(onnx_path: PathLike) -> Path:
    """Where the heads and preprocessing of an exported classifier are: beside it, ``.json``."""
    return Path(onnx_path).with_suffix(".json")


class ClassifierProbabilities(nn.Module):
    """``images -> (probabilities of head 1, ...)``, at the classifier's crop size.

    A DINOv2 backbone runs through :class:`~dinov2.hub.interop_onnx.FixedSizeFeatures` (position
    embedding resized once, at export); any other backbone through its own forward.
    """

    def __init__(self, model: MultiHeadClassifier, image_size: int):
        super().__init__()
        self.model = model
        backbone = model.backbone
        self.features = (
            FixedSizeFeatures(backbone, image_size, image_size) if isinstance(backbone, DinoVisionTransformer) else None
        )

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if self.features is not None:
            cls, patches = self.features(images)
            pooled = {"cls": cls, "mean": patches.mean(dim=1)}
        else:
            pooled = pooled_features(self.model.backbone, images)
        logits = self.model.forward_from_features(pooled)
        return tuple(logits[spec.name].float().softmax(dim=-1) for spec in self.model.head_specs)


def export_classifier_onnx(model: PathLike, output: PathLike) -> Path:
    """Write ``output`` (``.onnx``) and its ``.json`` sidecar for the classifier file or training
    output directory ``model``; returns the ``.onnx`` path."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise ValueError(f"ONNX output {output} must end in .onnx")
    source = resolve_classifier_path(model)
    classifier, config = load_classifier(source, "cpu")
    crop = int(config.preprocessing["crop_size"])
    wrapper = ClassifierProbabilities(classifier, crop)
    example = torch.zeros(2, 3, crop, crop)
    export_module_onnx(wrapper, example, output, [output_name(spec.name) for spec in config.heads])
    sidecar = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "onnx_file": output.name,
        "source": source.name,
        "heads": [
            {"name": spec.name, "classes": list(spec.classes), "output": output_name(spec.name)}
            for spec in config.heads
        ],
        "preprocessing": config.preprocessing,
    }
    atomic_write_text(sidecar_path(output), json.dumps(sidecar, indent=2) + "\n")
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a trained dinov2 classifier to ONNX (+ a .json sidecar).")
    parser.add_argument("--model", required=True, help="classifier file (.pth) or classifier training output dir")
    parser.add_argument("--output", required=True, help="the .onnx file to write (the sidecar goes beside it)")
    return parser


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    path = export_classifier_onnx(args.model, args.output)
    print(f"wrote {path} and {sidecar_path(path)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
