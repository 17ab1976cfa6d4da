"""Run a trained classifier on new images: Python API and command line.

Python::

    from dinov2.classify.predict import predict
    df = predict(images="photos/", model="runs/shapes/model_best.pth")          # pandas DataFrame
    records = predict(images=[img1, "a.png"], model=..., output_format="json")  # list of dicts

Command line::

    python -m dinov2.classify.predict --model runs/shapes --images photos/ --output out.csv

Every image gets, for every head, the probability of every class and the predicted label.
Test-time augmentation (``tta=True``, the default) averages the class probabilities of the image
and its horizontal mirror; ``multi_crop=True`` replaces the single centre crop by five crops
(centre and corners) of the resized image, each mirrored too when ``tta``.

Result forms:

* DataFrame: one row per image; columns ``image``, then per task ``<task>_label`` and
  ``<task>_prob_<class>`` for each class in the head's class order.
* JSON: a list of ``{"image": name, "predictions": {task: {"label": str, "probability": float,
  "probabilities": {class: float}}}}``.

``output_path`` writes the result as CSV (``.csv``) or JSON (``.json``), atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:  # pandas is imported only when a table is asked for
    import pandas as pd
from torchvision.transforms import v2

from dinov2.data.image_io import load_image_file

from .checkpoint import load_classifier, resolve_classifier_path
from .device import select_device
from .onnx_predict import OnnxPredictor, image_files, prediction_records, read_sidecar
from .transforms import normalise_transform, resize_transform

OUTPUT_FORMATS = ("dataframe", "json")
ImageInput = Union[str, os.PathLike, Image.Image]


class ImageViews:
    """The normalised views of one image that a classifier sees: the centre crop (or five crops
    with ``multi_crop``) of the resized image, each also mirrored with ``tta``."""

    def __init__(self, settings: Dict, tta: bool = True, multi_crop: bool = False):
        self.tta, self.multi_crop = bool(tta), bool(multi_crop)
        self._resize = resize_transform(settings)
        self._normalise = normalise_transform(settings)
        crop = settings["crop_size"]
        self._crop = v2.FiveCrop(crop) if multi_crop else v2.CenterCrop(crop)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """(V, 3, crop, crop)."""
        resized = self._resize(image)
        crops = list(self._crop(resized)) if self.multi_crop else [self._crop(resized)]
        if self.tta:
            crops += [v2.functional.horizontal_flip(c) for c in crops]
        return torch.stack([self._normalise(c) for c in crops])


class Predictor:
    """A classifier loaded once, turning PIL images into per-task class probabilities."""

    def __init__(
        self,
        model: Union[str, os.PathLike],
        device: Optional[Union[str, torch.device]] = None,
        tta: bool = True,
        multi_crop: bool = False,
        batch_size: int = 32,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = select_device(device)
        # The file itself (a training output directory names one of its files), so that its
        # checksum can identify the model without showing where it lives.
        self.model_file = resolve_classifier_path(model)
        self.model, self.config = load_classifier(self.model_file, self.device)
        self.model_path = str(model)
        self.tta, self.multi_crop, self.batch_size = bool(tta), bool(multi_crop), int(batch_size)
        self._views = ImageViews(self.config.preprocessing, tta=tta, multi_crop=multi_crop)

    @property
    def heads(self):
        return self.config.heads

    def views(self, image: Image.Image) -> torch.Tensor:
        """(V, 3, crop, crop) normalised views of one image: crops, each also mirrored with TTA."""
        return self._views(image)

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image]) -> Dict[str, np.ndarray]:
        """``{task: (N, C) float64}`` class probabilities, averaged over the views of each image."""
        out: Dict[str, List[np.ndarray]] = {h.name: [] for h in self.heads}
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            views = torch.stack([self.views(img) for img in chunk])  # (B, V, 3, h, w)
            batch, count = views.shape[:2]
            logits = self.model(views.flatten(0, 1).to(self.device))
            for task, value in logits.items():
                probs = value.float().softmax(dim=-1).reshape(batch, count, -1).mean(dim=1)
                out[task].append(probs.double().cpu().numpy())
        return {t: np.concatenate(p) if p else np.zeros((0, 0)) for t, p in out.items()}

    def records(self, names: Sequence[str], images: Sequence[Image.Image]) -> List[dict]:
        """JSON-ready result of each image (see the module docstring)."""
        return prediction_records(names, self.probabilities(images), self.heads)


def list_images(images: Union[ImageInput, Sequence[ImageInput]]) -> List[tuple]:
    """``[(name, path or PIL image)]`` for a directory, a file, or a list of paths / PIL images."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    entries = []
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            entries.append((getattr(item, "filename", "") or f"image_{i}", item))
            continue
        entries.extend(image_files([item]))
    if not entries:
        raise ValueError("no images given")
    return entries


def records_to_dataframe(records: Sequence[dict], heads) -> "pd.DataFrame":
    import pandas as pd

    rows = []
    for record in records:
        row = {"image": record["image"]}
        for head in heads:
            pred = record["predictions"][head.name]
            row[f"{head.name}_label"] = pred["label"]
            for name in head.classes:
                row[f"{head.name}_prob_{name}"] = pred["probabilities"][name]
        rows.append(row)
    columns = ["image"] + [
        col for head in heads for col in [f"{head.name}_label"] + [f"{head.name}_prob_{c}" for c in head.classes]
    ]
    return pd.DataFrame(rows, columns=columns)


def write_results(records: Sequence[dict], heads, output_path: Union[str, os.PathLike]) -> Path:
    """CSV or JSON by the file suffix, written atomically."""
    path = Path(output_path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"output file {path} must end in .csv or .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if suffix == ".csv":
            records_to_dataframe(records, heads).to_csv(tmp, index=False)
        else:
            tmp.write_text(json.dumps(list(records), indent=2), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _load(entry) -> Image.Image:
    source = entry[1]
    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")
    return load_image_file(source, policy="raise")


def predict(
    images: Union[ImageInput, Sequence[ImageInput]],
    model: Union[str, os.PathLike, Predictor],
    output_format: str = "dataframe",
    output_path: Optional[Union[str, os.PathLike]] = None,
    tta: bool = True,
    device: Optional[Union[str, torch.device]] = None,
    batch_size: int = 32,
    multi_crop: bool = False,
):
    """Class probabilities and predicted labels of every head for every image.

    ``images``: a directory (searched recursively), an image file, or a list of paths and PIL
    images. ``model``: a classifier file, a classifier training output directory, an exported
    ``.onnx`` classifier (run with ONNX Runtime, see :mod:`dinov2.classify.onnx_export`), or a
    :class:`Predictor` / :class:`~dinov2.classify.onnx_predict.OnnxPredictor`. Returns a DataFrame
    (``output_format="dataframe"``) or a list of dicts (``"json"``); ``output_path`` also writes
    it (``.csv`` or ``.json``).
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    if isinstance(model, (Predictor, OnnxPredictor)):
        predictor = model
    elif str(model).endswith(".onnx"):
        # An exported classifier (dinov2.classify.onnx_export): ONNX Runtime instead of PyTorch,
        # fed the views the PyTorch path makes (torchvision), so that both give the same probabilities.
        views = ImageViews(read_sidecar(model)["preprocessing"], tta=tta, multi_crop=multi_crop)
        predictor = OnnxPredictor(
            model, tta=tta, multi_crop=multi_crop, batch_size=batch_size, views=lambda image: views(image).numpy()
        )
    else:
        predictor = Predictor(model, device=device, tta=tta, multi_crop=multi_crop, batch_size=batch_size)
    entries = list_images(images)
    records: List[dict] = []
    # Decode a batch at a time, so a large folder never sits in memory at once.
    for start in range(0, len(entries), predictor.batch_size):
        chunk = entries[start : start + predictor.batch_size]
        records.extend(predictor.records([name for name, _ in chunk], [_load(e) for e in chunk]))
    if output_path is not None:
        write_results(records, predictor.heads, output_path)
    if output_format == "json":
        return records
    return records_to_dataframe(records, predictor.heads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Classify images with a trained dinov2 classifier.")
    parser.add_argument("--model", required=True, help="classifier file (.pth) or classifier training output dir")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or directories")
    parser.add_argument("--output", default=None, help="results file, .csv or .json (default: JSON on stdout)")
    parser.add_argument("--no-tta", action="store_true", help="no horizontal-flip test-time augmentation")
    parser.add_argument("--multi-crop", action="store_true", help="average five crops instead of one centre crop")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best available)")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    records = predict(
        images=args.images,
        model=args.model,
        output_format="json",
        output_path=args.output,
        tta=not args.no_tta,
        device=args.device,
        batch_size=args.batch_size,
        multi_crop=args.multi_crop,
    )
    if args.output is None:
        print(json.dumps(records, indent=2))
    else:
        print(f"wrote {len(records)} results to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
