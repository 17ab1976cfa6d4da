"""Run an exported classifier (``.onnx`` + ``.json`` sidecar) with ONNX Runtime: no PyTorch.

This file imports only numpy, Pillow and onnxruntime, so it can be copied beside the exported
model and run on a machine without PyTorch::

    python onnx_predict.py --model deploy/shapes.onnx --images photos/ [--output out.json]

Preprocessing follows the classifier's stored settings: short side resized to ``resize_size``,
centre crop (or five crops), horizontal-mirror test-time augmentation, normalisation. Here it is
done with Pillow, whose resize rounds differently from torchvision's tensor resize (the PyTorch
path's) by one grey level in about 0.5% of pixels; measured effect on probabilities: 3e-6 to 2e-4
depending on the model (docs/interop.md). Inside this package,
``dinov2.classify.predict.predict(images, model="deploy/shapes.onnx")`` runs the graph on the
torchvision views instead, and then matches the PyTorch classifier within 1e-6.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

SIDECAR_FORMAT = "dinov2-classifier-onnx"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_PIL_FILTERS = {
    "nearest": Image.NEAREST,
    "nearest-exact": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}


class OnnxHead:
    """A task of an exported classifier: its name, class names and graph output."""

    def __init__(self, name: str, classes: Sequence[str], output: str):
        self.name, self.classes, self.output = name, tuple(classes), output


def prediction_records(names: Sequence[str], probs: Dict[str, np.ndarray], heads) -> List[dict]:
    """JSON-ready result of each image from per-head probabilities (rows in ``names`` order): the
    record format of ``predict``, the CLI and the HTTP service, shared by both predictors."""
    records = []
    for i, name in enumerate(names):
        predictions = {}
        for head in heads:
            p = probs[head.name][i]
            best = int(np.argmax(p))
            predictions[head.name] = {
                "label": head.classes[best],
                "probability": float(p[best]),
                "probabilities": {c: float(v) for c, v in zip(head.classes, p)},
            }
        records.append({"image": name, "predictions": predictions})
    return records


def read_sidecar(onnx_path: Union[str, os.PathLike]) -> dict:
    path = Path(onnx_path).with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"exported classifier {onnx_path} has no sidecar {path} (heads and preprocessing)")
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path} is not a dinov2 ONNX classifier sidecar (no format={SIDECAR_FORMAT!r} entry)")
    return sidecar


class OnnxPredictor:
    """An exported classifier loaded once; the same interface as ``dinov2.classify.predict.Predictor``."""

    def __init__(
        self,
        model: Union[str, os.PathLike],
        tta: bool = True,
        multi_crop: bool = False,
        batch_size: int = 32,
        threads: Optional[int] = None,
        views: Optional[Callable[[Image.Image], np.ndarray]] = None,
    ):
        """``views`` replaces the Pillow preprocessing (``dinov2.classify.predict`` passes the
        torchvision one that its PyTorch path uses)."""
        import onnxruntime

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_file = Path(model)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"ONNX classifier not found: {self.model_file}")
        sidecar = read_sidecar(self.model_file)
        self.heads = [OnnxHead(h["name"], h["classes"], h["output"]) for h in sidecar["heads"]]
        self.preprocessing = sidecar["preprocessing"]
        interpolation = self.preprocessing["interpolation"]
        if interpolation not in _PIL_FILTERS:
            raise ValueError(f"{self.model_file}: unknown interpolation {interpolation!r}")
        self._filter = _PIL_FILTERS[interpolation]
        self._mean = np.asarray(self.preprocessing["mean"], dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(self.preprocessing["std"], dtype=np.float32).reshape(3, 1, 1)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.session = onnxruntime.InferenceSession(str(self.model_file), options, providers=["CPUExecutionProvider"])
        self.model_path = str(model)
        self.tta, self.multi_crop, self.batch_size = bool(tta), bool(multi_crop), int(batch_size)
        self._views = views or self.pillow_views

    def _resize(self, image: Image.Image) -> Image.Image:
        # torchvision's rule: the short side becomes resize_size, the long side is truncated.
        short = int(self.preprocessing["resize_size"])
        width, height = image.size
        if width <= height:
            size = (short, int(short * height / width))
        else:
            size = (int(short * width / height), short)
        return image.resize(size, self._filter)

    def _crops(self, image: Image.Image) -> List[Image.Image]:
        crop = int(self.preprocessing["crop_size"])
        width, height = image.size
        if crop > width or crop > height:
            raise ValueError(f"resized image {width}x{height} is smaller than the crop {crop}")

        def box(left: int, top: int) -> Image.Image:
            return image.crop((left, top, left + crop, top + crop))

        centre = box(int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0)))
        if not self.multi_crop:
            return [centre]
        return [box(0, 0), box(width - crop, 0), box(0, height - crop), box(width - crop, height - crop), centre]

    def views(self, image: Image.Image) -> np.ndarray:
        """(V, 3, crop, crop) float32 normalised views of one image: crops, each also mirrored with TTA."""
        return self._views(image)

    def pillow_views(self, image: Image.Image) -> np.ndarray:
        """:meth:`views` made with Pillow and numpy (the default)."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        crops = self._crops(self._resize(image))
        if self.tta:
            crops += [c.transpose(Image.FLIP_LEFT_RIGHT) for c in crops]
        arrays = [np.asarray(c, dtype=np.float32).transpose(2, 0, 1) / 255.0 for c in crops]
        return ((np.stack(arrays) - self._mean) / self._std).astype(np.float32)

    def probabilities(self, images: Sequence[Image.Image]) -> Dict[str, np.ndarray]:
        """``{task: (N, C) float64}`` class probabilities, averaged over the views of each image."""
        out: Dict[str, List[np.ndarray]] = {h.name: [] for h in self.heads}
        outputs = [h.output for h in self.heads]
        for start in range(0, len(images), self.batch_size):
            views = np.stack([self.views(img) for img in images[start : start + self.batch_size]])
            batch, count = views.shape[:2]
            results = self.session.run(outputs, {"images": views.reshape(batch * count, *views.shape[2:])})
            for head, probs in zip(self.heads, results):
                out[head.name].append(probs.astype(np.float64).reshape(batch, count, -1).mean(axis=1))
        return {t: np.concatenate(p) if p else np.zeros((0, 0)) for t, p in out.items()}

    def records(self, names: Sequence[str], images: Sequence[Image.Image]) -> List[dict]:
        """JSON-ready result of each image, as ``Predictor.records`` gives it."""
        return prediction_records(names, self.probabilities(images), self.heads)


def image_files(paths: Sequence[str]) -> List[tuple]:
    """``[(name, path)]`` of image files and of the images under directories (names relative to them)."""
    entries = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
            entries.extend((str(p.relative_to(path)), p) for p in found)
        elif path.is_file():
            entries.append((str(path), path))
        else:
            raise FileNotFoundError(f"image path not found: {path}")
    return entries


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with an exported dinov2 classifier (ONNX Runtime).")
    parser.add_argument("--model", required=True, help="the exported .onnx file (its .json sidecar beside it)")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or directories")
    parser.add_argument("--output", default=None, help="write the JSON results here (default: stdout)")
    parser.add_argument("--no-tta", action="store_true", help="no horizontal-flip test-time augmentation")
    parser.add_argument("--multi-crop", action="store_true", help="average five crops instead of one centre crop")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    predictor = OnnxPredictor(
        args.model, tta=not args.no_tta, multi_crop=args.multi_crop, batch_size=args.batch_size, threads=args.threads
    )
    entries = image_files(args.images)
    records: List[dict] = []
    for start in range(0, len(entries), predictor.batch_size):
        chunk = entries[start : start + predictor.batch_size]
        records.extend(predictor.records([n for n, _ in chunk], [_open_rgb(p) for _, p in chunk]))
    text = json.dumps(records, indent=2)
    if args.output is None:
        print(text)
    else:
        output = Path(args.output)
        tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, output)
        print(f"wrote {len(records)} results to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
