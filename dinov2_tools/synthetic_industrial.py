"""Write a small synthetic dataset in the industrial inspection layout (for tests and demos).

Each group is one part photographed ``images_per_group`` times (small shifts, rotation, lighting);
a part is ``good`` or ``defect``, and every photo of a defective part shows the defect: a dark
scratch or a dark spot on the part. Groups, not images, are dealt to train / val / test, so no part
appears in two splits. The same seed writes the same files.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dinov2.data.datasets.base import write_bytes_atomic

CLASSES = ["good", "defect"]
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def _render_part(rng: np.random.Generator, size: int, base_colour, shape: str, defect: str | None) -> Image.Image:
    background = np.linspace(85, 125, size, dtype=np.float32)[None, :, None] * np.ones((size, 1, 3), np.float32)
    background += rng.normal(0, 6, (size, size, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    shift = rng.integers(-size // 16, size // 16 + 1, size=2)
    lo, hi = size * 0.2 + shift, size * 0.8 + shift
    light = rng.uniform(0.85, 1.15)
    colour = tuple(int(min(255, c * light)) for c in base_colour)
    box = [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    else:
        draw.rounded_rectangle(box, radius=size // 10, fill=colour)
    if defect == "scratch":
        a = lo + (hi - lo) * rng.uniform(0.15, 0.4, size=2)
        b = lo + (hi - lo) * rng.uniform(0.6, 0.85, size=2)
        draw.line([tuple(a), tuple(b)], fill=(25, 20, 20), width=max(2, size // 24))
    elif defect == "spot":
        centre = lo + (hi - lo) * rng.uniform(0.3, 0.7, size=2)
        r = size * rng.uniform(0.06, 0.1)
        draw.ellipse([centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r], fill=(35, 25, 20))
    return image.rotate(float(rng.uniform(-8, 8)), resample=Image.BILINEAR, fillcolor=(100, 100, 100)).filter(
        ImageFilter.GaussianBlur(0.6)
    )


def _assign_splits(n_groups: int, rng: np.random.Generator) -> list[str]:
    """Deal groups to splits by fraction; each split gets at least one group when there are 3+."""
    order = rng.permutation(n_groups)
    n_val = max(1, round(n_groups * SPLIT_FRACTIONS["val"])) if n_groups >= 3 else 0
    n_test = max(1, round(n_groups * SPLIT_FRACTIONS["test"])) if n_groups >= 3 else 0
    splits = ["train"] * n_groups
    for i in order[:n_val]:
        splits[i] = "val"
    for i in order[n_val : n_val + n_test]:
        splits[i] = "test"
    return splits


def make_industrial_dataset(
    out: str, groups: int = 12, images_per_group: int = 3, size: int = 64, seed: int = 0, quality: int = 92
) -> dict[str, int]:
    """Write the dataset under ``out``; returns the number of images per split."""
    if groups < 1 or images_per_group < 1:
        raise ValueError(f"need groups >= 1 and images_per_group >= 1, got {groups}, {images_per_group}")
    rng = np.random.default_rng(seed)
    splits = _assign_splits(groups, rng)
    lists: dict[str, list] = {s: [] for s in SPLIT_FRACTIONS}
    groups_in_split = {s: 0 for s in SPLIT_FRACTIONS}
    for g in range(groups):
        group_id = f"part{g:04d}"
        # Alternate within each split so that every split with two groups holds both classes.
        label = groups_in_split[splits[g]] % 2
        groups_in_split[splits[g]] += 1
        defect = str(rng.choice(["scratch", "spot"])) if label == 1 else None
        base_colour = tuple(int(c) for c in rng.integers(150, 230, size=3))
        shape = str(rng.choice(["disc", "plate"]))
        split = splits[g]
        folder = os.path.join(out, split, group_id)
        os.makedirs(folder, exist_ok=True)
        for k in range(images_per_group):
            relative = f"{split}/{group_id}/{group_id}-{k}.jpeg"
            image = _render_part(rng, size, base_colour, shape, defect)
            tmp = os.path.join(out, relative + ".tmp")
            image.save(tmp, format="JPEG", quality=quality)
            os.replace(tmp, os.path.join(out, relative))
            lists[split].append({"img_path": relative, "gt_label": label, "group_id": group_id})
    for split, data_list in lists.items():
        content = {"metainfo": {"classes": CLASSES}, "data_list": data_list}
        write_bytes_atomic(os.path.join(out, "annotations", f"{split}.json"), json.dumps(content, indent=1).encode())
    return {split: len(items) for split, items in lists.items()}
