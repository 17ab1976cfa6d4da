"""Rasterise Quick, Draw! stroke drawings.

A drawing is a list of strokes, each an ``(n, 2)`` array of x, y points (raw files also carry
timestamps, which are ignored). As in Google's simplified format, the drawing's bounding box is
scaled uniformly (aspect ratio kept) to fit the canvas, here inside ``padding`` pixels of margin
and centred along its shorter side, so raw and simplified strokes of the same drawing give the
same picture. Lines are drawn with PIL; antialiasing draws at ``supersample`` times the size and
box-filters down
(4x up to 64 px, 2x above).

Coordinates are pixel centres: with ``padding=p`` the extreme points land on pixels ``p`` and
``size - 1 - p``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def default_line_width(size: int) -> float:
    """2 px at 224, 1 px at 28 and below."""
    return max(1.0, size / 112.0)


def default_padding(size: int) -> float:
    return float(round(size / 14.0))


def rasterize_strokes(
    strokes: Sequence[np.ndarray],
    size: int,
    line_width: float | None = None,
    antialias: bool = True,
    padding: float | None = None,
    supersample: int | None = None,
) -> np.ndarray:
    """Return a ``(size, size)`` uint8 ink map: 0 is empty paper, 255 full ink."""
    if size < 2:
        raise ValueError(f"size must be at least 2, got {size}")
    line_width = default_line_width(size) if line_width is None else float(line_width)
    padding = default_padding(size) if padding is None else float(padding)
    if supersample is None:  # 4x for small sketches, 2x is already smooth at large sizes and 4x as fast
        supersample = 4 if size <= 64 else 2
    scale_up = max(1, int(supersample)) if antialias else 1
    canvas = Image.new("L", (size * scale_up, size * scale_up), 0)
    strokes = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in strokes if len(s)]
    if not strokes:
        return np.zeros((size, size), dtype=np.uint8)
    points = np.concatenate(strokes)
    low = points.min(axis=0)
    extent = points.max(axis=0) - low
    available = size - 1 - 2 * padding
    if available <= 0:
        raise ValueError(f"padding {padding} leaves no room on a {size} px canvas")
    scale = available / max(float(extent.max()), 1e-9)
    # Centre along the shorter side; then map pixel-centre coordinates onto the supersampled canvas.
    offset = padding + (available - extent * scale) / 2.0
    width = max(1, int(round(line_width * scale_up)))
    draw = ImageDraw.Draw(canvas)
    for stroke in strokes:
        xy = ((stroke - low) * scale + offset + 0.5) * scale_up - 0.5
        if scale_up == 1:
            xy = np.round(xy)
        coords = [tuple(p) for p in xy.tolist()]
        if len(coords) == 1 or np.all(xy == xy[0]):
            x, y = coords[0]
            r = (width - 1) / 2.0
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        else:
            draw.line(coords, fill=255, width=width, joint="curve" if width > 2 else None)
    if scale_up > 1:
        canvas = canvas.reduce(scale_up)
    return np.asarray(canvas, dtype=np.uint8)


def ink_to_rgb(ink: np.ndarray) -> Image.Image:
    """Dataset convention for sketches: black strokes on white paper, RGB."""
    return Image.fromarray(255 - ink, mode="L").convert("RGB")
