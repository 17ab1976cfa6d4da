"""PCA of patch features shown as RGB maps beside the input images.

The patch tokens of all images are pooled and projected on their first three principal
components; each component, scaled to [0, 1] with its 1st and 99th percentiles over all images,
becomes a colour channel. Patches that look alike get alike colours, so the maps show what the
backbone groups together (object parts, background, defects). With ``foreground_threshold`` a
first one-component PCA separates foreground from background (patches whose scaled first
component exceeds the threshold; ``invert_foreground`` flips the side), the three-component PCA
is fitted on foreground patches only, and background patches are drawn black.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from .plots import save_figure

logger = logging.getLogger("dinov2.eval")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _scale(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    low, high = np.percentile(reference, [1, 99], axis=0)
    return np.clip((values - low) / np.maximum(high - low, 1e-8), 0.0, 1.0)


@torch.inference_mode()
def patch_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, h, w, D) normalised patch tokens of a batch of normalised images."""
    tokens = model.forward_features(images)["x_norm_patchtokens"]
    h, w = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    return tokens.reshape(images.shape[0], h, w, -1)


def pca_rgb_maps(
    features: torch.Tensor, foreground_threshold: Optional[float] = None, invert_foreground: bool = False
) -> np.ndarray:
    """(B, h, w, 3) colours in [0, 1] from (B, h, w, D) patch features (see the module docstring)."""
    from sklearn.decomposition import PCA

    batch, h, w, dim = features.shape
    flat = features.reshape(-1, dim).double().cpu().numpy()
    if flat.shape[0] < 3:
        raise ValueError(f"need at least 3 patches for a 3-component PCA, got {flat.shape[0]}")
    foreground = np.ones(flat.shape[0], dtype=bool)
    if foreground_threshold is not None:
        first = PCA(n_components=1, random_state=0).fit_transform(flat)[:, 0]
        first = _scale(first, first)
        foreground = first < foreground_threshold if invert_foreground else first > foreground_threshold
        if foreground.sum() < 3:
            raise ValueError(
                f"foreground threshold {foreground_threshold} leaves {int(foreground.sum())} patches: lower it or drop it"
            )
    pca = PCA(n_components=3, random_state=0).fit(flat[foreground])
    projected = pca.transform(flat)
    colours = _scale(projected, projected[foreground])
    colours[~foreground] = 0.0
    logger.info("PCA explained variance ratios: %s", np.round(pca.explained_variance_ratio_, 3).tolist())
    return colours.reshape(batch, h, w, 3)


def side_by_side(images: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """One (2H, N*W, 3) picture in [0, 1]: the N input images (N, H, W, 3) on top and their PCA
    maps (N, h, w, 3), enlarged to H x W without smoothing, below (TensorBoard / W&B images)."""
    _, height, width, _ = images.shape
    rows = np.repeat(np.repeat(maps, -(-height // maps.shape[1]), axis=1), -(-width // maps.shape[2]), axis=2)
    rows = rows[:, :height, :width]
    top = np.concatenate(list(np.clip(images, 0.0, 1.0)), axis=1)
    bottom = np.concatenate(list(rows), axis=1)
    return np.concatenate([top, bottom], axis=0)


def collect_image_paths(inputs: Sequence[str], max_images: int) -> List[Path]:
    paths: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"--images: {path} does not exist")
    if not paths:
        raise ValueError(f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) found in {list(inputs)}")
    return paths[:max_images]


def render(images: np.ndarray, maps: np.ndarray, names: Sequence[str], path, title: str = "") -> Path:
    """A figure with one row per image: the input crop, then its PCA map."""
    from matplotlib.figure import Figure

    rows = len(images)
    fig = Figure(figsize=(6, 3 * rows))
    for i in range(rows):
        for j, (picture, label) in enumerate(((images[i], names[i]), (maps[i], "patch PCA (RGB = PC1-3)"))):
            ax = fig.add_subplot(rows, 2, 2 * i + j + 1)
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def get_args_parser() -> argparse.ArgumentParser:
    """Flags and ``key=value`` options of :data:`dinov2.eval.config.FLAGS` ``["pca"]``."""
    from .config import build_parser

    parser = build_parser("pca", "dinov2 patch PCA", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: Optional[Iterable[str]] = None) -> int:
    from .cli import configure_logging
    from .config import parse_config
    from .setup import build_model_for_eval

    cfg = parse_config("pca", get_args_parser(), argv)
    b, options = cfg.backbone, cfg.pca
    configure_logging()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = build_model_for_eval(
        b.config_file, b.pretrained_weights, device, arch=b.arch, overrides=b.overrides, image_size=b.image_size
    )
    size = backbone.image_size
    crop = v2.Compose(
        [v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True)]
    )
    paths = collect_image_paths(options.images, options.max_images)
    crops = []
    for path in paths:
        try:
            with Image.open(path) as image:
                crops.append(crop(image.convert("RGB")))
        except OSError as error:
            raise SystemExit(f"cannot read image {path}: {error}") from error
    batch = torch.stack(crops)
    normalised = v2.Normalize(list(backbone.mean), list(backbone.std))(batch)
    features = patch_features(backbone.model, normalised.to(device))
    maps = pca_rgb_maps(features, options.foreground_threshold, options.invert_foreground)
    out = render(batch.permute(0, 2, 3, 1).numpy(), maps, [p.name for p in paths], options.output, backbone.description)
    print(f"wrote {out} ({len(paths)} images, {features.shape[1]}x{features.shape[2]} patches each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
