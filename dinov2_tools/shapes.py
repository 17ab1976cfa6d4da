"""A multi-head demo dataset: hand-drawn-looking shapes rendered from synthetic pen strokes.

Every image is one drawing on white paper, and its labels come from how it was drawn:

* ``presence`` - ``clear`` (one ellipse-like stroke drawn with a steady hand), ``resembles`` (the
  same kind of shape drawn badly: strong wobble, broken into pieces that do not quite meet,
  partly traced twice) or ``none`` (scribbles and zig-zags with no shape at all);
* ``closure`` - ``closed`` when the pen went all the way round (plus a little overshoot),
  ``open`` when it stopped between 50 % and 78 % of the way;
* ``circularity`` - ``round`` for an aspect ratio (minor / major axis) of 0.82-1.0, ``elongated``
  for 0.28-0.5.

``closure`` and ``circularity`` are empty (missing labels) when ``presence`` is ``none``.
Strokes wobble (low-frequency radius noise), jitter (per-point noise) and have a pressure-like
width that swells in the middle of a stroke and tapers at its ends. Image ``i`` depends only on
``(seed, i)``, so the dataset is reproducible and can be grown without changing earlier images.

Files written: ``images/<i:05d>.png``, ``labels.csv`` (all rows, columns ``path, presence,
closure, circularity``), and ``train.csv`` / ``val.csv`` (a deterministic split of the same rows).
Use with ``CSV:path=<out>/train.csv``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

PRESENCE = ("clear", "resembles", "none")
PRESENCE_PROBS = (0.5, 0.25, 0.25)
CLOSURE = ("closed", "open")
CIRCULARITY = ("round", "elongated")
COLUMNS = ("path", "presence", "closure", "circularity")
SUPERSAMPLE = 4

Stroke = Tuple[np.ndarray, np.ndarray]  # (points (n, 2) in [0, 1] canvas units, widths (n,) in canvas units)


def _pressure(n: int, rng: np.random.Generator, base: float) -> np.ndarray:
    """Width along a stroke: tapered ends, a swell in the middle, slow random variation."""
    s = np.linspace(0.0, 1.0, n)
    taper = 0.45 + 0.55 * np.sin(np.pi * np.clip(s * rng.uniform(0.9, 1.1), 0, 1)) ** 0.5
    drift = 1.0 + 0.15 * np.sin(2 * np.pi * (s * rng.uniform(0.5, 1.5) + rng.uniform()))
    return base * taper * drift


def _ellipse_stroke(
    rng: np.random.Generator,
    center: np.ndarray,
    major: float,
    aspect: float,
    rotation: float,
    start: float,
    span: float,
    wobble: float,
    jitter: float,
    width: float,
) -> Stroke:
    n = max(24, int(90 * span / (2 * np.pi)))
    t = start + np.linspace(0.0, span, n)
    # Low-frequency radius noise: a hand that drifts in and out while going round.
    radius = np.ones_like(t)
    for k in (2, 3, 5):
        radius += wobble * rng.uniform(0.3, 1.0) * np.sin(k * t + rng.uniform(0, 2 * np.pi)) / k
    x = major * radius * np.cos(t)
    y = major * aspect * radius * np.sin(t)
    cos, sin = np.cos(rotation), np.sin(rotation)
    points = np.stack([cos * x - sin * y, sin * x + cos * y], axis=1) + center
    points += rng.normal(0.0, jitter, size=points.shape)
    return points, _pressure(n, rng, width)


def _scribble_strokes(rng: np.random.Generator, width: float) -> List[Stroke]:
    """1-3 random-walk or zig-zag strokes: ink without a shape."""
    strokes = []
    for _ in range(int(rng.integers(1, 4))):
        n = int(rng.integers(15, 45))
        start = rng.uniform(0.2, 0.8, size=2)
        if rng.uniform() < 0.5:  # random walk with momentum
            heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.6, size=n))
            steps = rng.uniform(0.01, 0.035) * np.stack([np.cos(heading), np.sin(heading)], axis=1)
        else:  # zig-zag along a random direction
            direction = rng.uniform(0, 2 * np.pi)
            along = np.array([np.cos(direction), np.sin(direction)])
            across = np.array([-along[1], along[0]])
            sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
            steps = 0.02 * along + (sign * rng.uniform(0.03, 0.08))[:, None] * across
        points = np.clip(start + np.cumsum(steps, axis=0), 0.05, 0.95)
        points += rng.normal(0.0, 0.003, size=points.shape)
        strokes.append((points, _pressure(n, rng, width)))
    return strokes


def draw_sample(rng: np.random.Generator, presence: str, closure: str, circularity: str) -> List[Stroke]:
    """The strokes of one drawing with the given labels (closure / circularity unused for ``none``)."""
    width = rng.uniform(0.022, 0.04)
    if presence == "none":
        return _scribble_strokes(rng, width)
    aspect = rng.uniform(0.82, 1.0) if circularity == "round" else rng.uniform(0.28, 0.5)
    major = rng.uniform(0.25, 0.38)
    center = rng.uniform(0.5 - (0.45 - major), 0.5 + (0.45 - major), size=2)
    rotation = rng.uniform(0, np.pi)
    start = rng.uniform(0, 2 * np.pi)
    if closure == "closed":
        span = 2 * np.pi + rng.uniform(0.05, 0.35)
    else:
        span = 2 * np.pi * rng.uniform(0.5, 0.78)
    if presence == "clear":
        return [
            _ellipse_stroke(rng, center, major, aspect, rotation, start, span, rng.uniform(0.02, 0.06), 0.002, width)
        ]
    # "resembles": a badly drawn version - strong wobble, broken into pieces with small gaps and
    # offsets, sometimes traced a second time.
    pieces = int(rng.integers(2, 4))
    cuts = np.sort(rng.uniform(0.15, 0.85, size=pieces - 1)) * span
    bounds = np.concatenate([[0.0], cuts, [span]])
    strokes = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        gap = rng.uniform(0.04, 0.12)
        offset = rng.normal(0.0, 0.02, size=2)
        strokes.append(
            _ellipse_stroke(
                rng,
                center + offset,
                major,
                aspect,
                rotation,
                start + a + gap / 2,
                b - a - gap,
                rng.uniform(0.15, 0.3),
                0.006,
                width,
            )
        )
    if rng.uniform() < 0.4:
        redo = rng.uniform(0.3, 0.6) * span
        strokes.append(
            _ellipse_stroke(
                rng,
                center + rng.normal(0, 0.03, size=2),
                major * rng.uniform(0.9, 1.1),
                aspect,
                rotation + rng.normal(0, 0.15),
                start + rng.uniform(0, span - redo),
                redo,
                rng.uniform(0.15, 0.3),
                0.006,
                width * 0.8,
            )
        )
    return strokes


def render(strokes: List[Stroke], size: int, rng: np.random.Generator) -> Image.Image:
    """Strokes in [0, 1] canvas units -> RGB image, dark ink on white, antialiased by supersampling."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 255)
    draw = ImageDraw.Draw(canvas)
    ink = int(rng.integers(0, 70))
    for points, widths in strokes:
        xy = points * big
        w = np.maximum(widths * big, 1.0)
        for i in range(len(xy) - 1):
            seg_w = int(round((w[i] + w[i + 1]) / 2))
            draw.line([tuple(xy[i]), tuple(xy[i + 1])], fill=ink, width=seg_w)
        for (x, y), r in zip(xy, w / 2):  # round joints and caps
            draw.ellipse([x - r, y - r, x + r, y + r], fill=ink)
    return canvas.resize((size, size), Image.Resampling.LANCZOS).convert("RGB")


def sample_labels(rng: np.random.Generator) -> Dict[str, str]:
    presence = PRESENCE[int(rng.choice(len(PRESENCE), p=PRESENCE_PROBS))]
    if presence == "none":
        return {"presence": presence, "closure": "", "circularity": ""}
    return {
        "presence": presence,
        "closure": CLOSURE[int(rng.integers(2))],
        "circularity": CIRCULARITY[int(rng.integers(2))],
    }


def make_sample(index: int, seed: int, size: int) -> Tuple[Image.Image, Dict[str, str]]:
    rng = np.random.default_rng([seed, index])
    labels = sample_labels(rng)
    strokes = draw_sample(rng, labels["presence"], labels["closure"] or "closed", labels["circularity"] or "round")
    return render(strokes, size, rng), labels


def _write_csv(path: Path, rows: List[Dict[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def make_shapes_dataset(
    output_dir: str | os.PathLike, count: int = 2000, size: int = 64, seed: int = 0, val_fraction: float = 0.2
) -> Dict[str, object]:
    """Render ``count`` drawings into ``output_dir``; returns label counts per task."""
    if count < 1 or size < 16:
        raise ValueError(f"need count >= 1 and size >= 16, got count={count}, size={size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        image, labels = make_sample(index, seed, size)
        relative = f"images/{index:05d}.png"
        tmp = out / f"images/.{index:05d}.tmp{os.getpid()}.png"
        image.save(tmp)
        os.replace(tmp, out / relative)
        rows.append({"path": relative, **labels})
    is_val = np.random.default_rng([seed, 1 << 30]).uniform(size=count) < val_fraction
    _write_csv(out / "labels.csv", rows)
    _write_csv(out / "train.csv", [r for r, v in zip(rows, is_val) if not v])
    _write_csv(out / "val.csv", [r for r, v in zip(rows, is_val) if v])
    counts: Dict[str, Dict[str, int]] = {}
    for column in COLUMNS[1:]:
        values = [r[column] or "(missing)" for r in rows]
        counts[column] = {v: values.count(v) for v in sorted(set(values))}
    return {"images": count, "train": int((~is_val).sum()), "val": int(is_val.sum()), "labels": counts}


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Render the multi-head hand-drawn shapes demo dataset.")
    parser.add_argument("output_dir")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    summary = make_shapes_dataset(args.output_dir, args.count, args.size, args.seed, args.val_fraction)
    print(json.dumps(summary, indent=2))
    return 0
