"""Building blocks shared by the SSL augmentation and the evaluation pipelines
(torchvision.transforms.v2 throughout).

All pipelines here accept a PIL image (any mode), or a ``(C, H, W)`` / ``(H, W)`` tensor or
``(H, W[, C])`` numpy array with 1 or 3 channels (uint8, or float in ``[0, 1]``), and return a
plain float32 ``(3, H, W)`` tensor normalised with ``mean`` / ``std``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "ToLuminance",
    "ToRGB",
    "default_resize_size",
    "make_blur",
    "make_normalize_transform",
    "make_resize_transform",
    "make_classification_eval_transform",
    "make_classification_train_transform",
]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# DINO's blur: 9x9 kernel, sigma drawn uniformly from this range (in pixels).
DEFAULT_BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL_SIZE = 9


class ToRGB(v2.Transform):
    """Bring any supported input to a 3-channel RGB image with uint8 values.

    PIL images stay PIL (``convert("RGB")``; the v2 transforms have fast PIL paths). Tensors
    and numpy arrays become ``tv_tensors.Image`` uint8 tensors (floats are read as ``[0, 1]``),
    grayscale expanded to 3 channels, so photometric steps such as solarisation at 128 mean the
    same thing for every input type.
    """

    def forward(self, inpt):  # one image in, one image out
        if isinstance(inpt, Image.Image):
            return inpt if inpt.mode == "RGB" else inpt.convert("RGB")
        if isinstance(inpt, np.ndarray):
            if inpt.ndim == 2:
                inpt = inpt[:, :, None]
            image = v2.functional.to_image(inpt)  # HWC -> CHW
        elif isinstance(inpt, torch.Tensor):
            image = inpt.unsqueeze(0) if inpt.ndim == 2 else inpt
            image = v2.functional.to_image(image)
        else:
            raise TypeError(f"expected a PIL image, tensor or numpy array, got {type(inpt).__name__}")
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected an image with 1 or 3 channels (C, H, W), got shape {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            if not image.is_floating_point():
                raise ValueError(f"expected uint8 or float image values, got dtype {image.dtype}")
            image = v2.functional.to_dtype(image.clamp(0.0, 1.0), torch.uint8, scale=True)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1).clone()
        return image


class ToLuminance(v2.Transform):
    """Bring an input to the working mode of grayscale pipelines (the ``sketch`` augmentation).

    PIL images become single-channel ``L`` images (PIL's integer luma formula, which maps a gray
    pixel ``(v, v, v)`` to exactly ``v``), so every later step touches one channel instead of
    three identical ones; the normalisation step expands the channel back to RGB. Tensors and
    arrays go through :class:`ToRGB` unchanged in content (3-channel uint8): the later steps
    work on 1 or 3 channels alike.
    """

    def __init__(self):
        super().__init__()
        self._to_rgb = ToRGB()

    def forward(self, inpt):  # one image in, one image out
        if isinstance(inpt, Image.Image):
            return inpt if inpt.mode == "L" else inpt.convert("L")
        return self._to_rgb(inpt)


def make_normalize_transform(
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
) -> v2.Compose:
    """uint8 / PIL image -> plain float32 tensor in ``[0, 1]`` -> ``(x - mean) / std``.

    Single-channel inputs (e.g. from :class:`ToLuminance`) are expanded to 3 channels first."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={list(mean)} std={list(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {list(std)}")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor(),
        ]
    )


def make_blur(p: float, sigma: Sequence[float] = DEFAULT_BLUR_SIGMA) -> v2.RandomApply:
    """Gaussian blur (9x9 kernel, sigma uniform in ``sigma``) applied with probability ``p``.

    Always a ``RandomApply`` (even for ``p`` 0 or 1) so the probability can be read back from
    ``.p``, which the tests and :meth:`DataAugmentationDINO.describe` rely on.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"blur probability must be in [0, 1], got {p}")
    return v2.RandomApply([v2.GaussianBlur(kernel_size=BLUR_KERNEL_SIZE, sigma=tuple(sigma))], p=p)


def default_resize_size(crop_size: int) -> int:
    """Short side before a ``crop_size`` centre crop: ``crop_size * 256 / 224``, the ImageNet ratio."""
    return int(round(crop_size * 256 / 224))


def make_resize_transform(
    resize_size: int, interpolation: str | v2.InterpolationMode = v2.InterpolationMode.BICUBIC
) -> v2.Compose:
    """Image -> uint8 RGB tensor whose short side is ``resize_size`` (nothing cropped yet).

    The image becomes a tensor *before* resizing, on purpose: torchvision's tensor resampling
    and PIL's differ by one grey level on some pixels, and evaluation, classifier training and
    inference must all see exactly the pixels the published figures and stored classifiers were
    made with (this tensor path)."""
    return v2.Compose(
        [
            ToRGB(),
            v2.ToImage(),
            v2.Resize(resize_size, interpolation=v2.InterpolationMode(interpolation), antialias=True),
        ]
    )


def make_classification_train_transform(
    crop_size: int = 224,
    interpolation: str | v2.InterpolationMode = v2.InterpolationMode.BICUBIC,
    hflip_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    scale: Sequence[float] = (0.08, 1.0),
) -> v2.Compose:
    """Random-resized crop (area fraction in ``scale``) + horizontal flip + normalisation: the
    augmentation of the online linear probe and of classifier training."""
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"random-resized-crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    steps = [
        ToRGB(),
        v2.ToImage(),  # crop and resample the tensor, as make_resize_transform does
        v2.RandomResizedCrop(
            crop_size, scale=tuple(scale), interpolation=v2.InterpolationMode(interpolation), antialias=True
        ),
    ]
    if hflip_prob > 0.0:
        steps.append(v2.RandomHorizontalFlip(p=hflip_prob))
    steps.append(make_normalize_transform(mean, std))
    return v2.Compose(steps)


def make_classification_eval_transform(
    resize_size: int | None = None,
    crop_size: int = 224,
    interpolation: str | v2.InterpolationMode = v2.InterpolationMode.BICUBIC,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """Resize the short side to ``resize_size`` (default :func:`default_resize_size`, 256 for a
    224 crop), centre-crop ``crop_size``, normalise: the transform of the k-NN, linear and
    logistic-regression evaluations, the training k-NN monitor and classifier validation."""
    resize_size = default_resize_size(crop_size) if resize_size is None else resize_size
    if resize_size < crop_size:
        raise ValueError(f"resize size {resize_size} is smaller than the {crop_size} px centre crop")
    return v2.Compose(
        [
            make_resize_transform(resize_size, interpolation),
            v2.CenterCrop(crop_size),
            make_normalize_transform(mean, std),
        ]
    )
