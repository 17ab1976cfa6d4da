"""Multi-crop augmentation of DINO / DINOv2: 2 global crops and N local crops per image.

:class:`DataAugmentationDINO` builds the ``torchvision.transforms.v2`` pipelines and runs them (the
reference); :class:`FastDataAugmentationDINO` computes the same crops from the same random draws
at a lower cost per crop, and is what training uses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dinov2.data.transforms import (
    DEFAULT_BLUR_SIGMA,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ToLuminance,
    ToRGB,
    make_blur,
    make_normalize_transform,
)

__all__ = [
    "AUGMENTATION_POLICIES",
    "PAPER_BLUR_PROBS",
    "DataAugmentationDINO",
    "FastDataAugmentationDINO",
    "blur_probabilities",
    "crop_size_pairs",
]

AUGMENTATION_POLICIES = ("natural", "sketch")

# Blur probabilities as the DINO / DINOv2 papers state them (global crop 1, global crop 2, local).
PAPER_BLUR_PROBS = {"global_1": 1.0, "global_2": 0.1, "local": 0.5}
# Sketch policy: strokes are thin, a strong blur erases them; blur lightly and less often.
SKETCH_BLUR_PROBS = {"global_1": 0.5, "global_2": 0.1, "local": 0.2}
SKETCH_BLUR_SIGMA = (0.1, 1.0)

SOLARIZE_THRESHOLD = 128  # on uint8 values; every input is brought to uint8 RGB first
SOLARIZE_PROB = 0.2


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2 or not 0.0 < value[0] <= value[1] <= 1.0:
        raise ValueError(f"{name} must be [min, max] with 0 < min <= max <= 1, got {list(value)}")
    return float(value[0]), float(value[1])


class DataAugmentationDINO:
    """Turn one image into the crops of a DINOv2 training sample.

    Pipeline (all ``torchvision.transforms.v2``; built as ``v2.Compose`` pipelines, see below):

    * geometry: ``RandomResizedCrop`` (bicubic, antialiased) to ``global_crops_size`` with
      ``global_crops_scale`` (twice) or to ``local_crops_size`` with ``local_crops_scale``
      (``local_crops_number`` times), then a horizontal flip with p=0.5; with ``size_pairs``
      (high-resolution adaptation) the sizes are those of the pair :meth:`select_size_pair` chose;
    * photometry, ``policy="natural"`` (photos, the DINOv2 recipe): colour jitter
      (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p=0.8, grayscale p=0.2,
      Gaussian blur (9x9, sigma 0.1-2.0) with p=1.0 on global crop 1, p=0.1 on global crop 2
      and p=0.5 on local crops, and solarisation (threshold 128) with p=0.2 on global crop 2;
    * photometry, ``policy="sketch"`` (grayscale drawings): no colour jitter, grayscale or
      solarisation (they would invert or wash out the strokes); a light blur (sigma 0.1-1.0)
      with p=0.5 / 0.1 / 0.2 (global 1 / global 2 / local). The sketch policy works on the
      luminance: a PIL input is converted to one ``L`` channel first (:class:`ToLuminance`:
      exact for gray pixels, colour is dropped), so crops and blur touch one channel instead of
      three identical ones, and the normalisation expands it back to 3 channels. Same pixels as
      the RGB pipeline for grayscale drawings; a sketch sample loads about 1.2x faster;
    * normalisation with ``mean`` / ``std`` (ImageNet by default) to a float32 tensor.

    ``upstream_blur_probs=True`` reproduces what upstream DINOv2's code actually does: its blur
    wrapper hands ``1 - p`` to ``RandomApply`` (believing RandomApply's ``p`` is the chance of
    *keeping* the image, while it is the chance of applying the transform), so the effective
    probabilities are ``1 - p``: global crop 1 is never blurred, global crop 2 is blurred
    90% of the time, local crops 50% (unchanged). The default (False) applies the papers'
    probabilities. The flag inverts the sketch policy's probabilities the same way.

    Inputs: a PIL image (any mode), or a ``(C, H, W)`` tensor / ``(H, W, C)`` array with 1 or 3
    channels (uint8 or float in [0, 1]); crops always have 3 channels.

    The steps are built as ``v2`` transforms (``prepare``, which brings the input to the policy's
    working mode, ``geometric_global`` / ``geometric_local``, then
    ``global_transform_1`` / ``global_transform_2`` / ``local_transform``), and ``__call__`` runs
    those pipelines as built: this class is the reference. Training uses
    :class:`FastDataAugmentationDINO`, which computes the same crops from the same random draws
    with less per-call overhead. Randomness comes from torch's global RNG.

    Returns a dict::

        {"global_crops": [g1, g2],            # (3, G, G) float32 each
         "global_crops_teacher": [g1, g2],    # the same tensors (teacher input)
         "local_crops": [l1, ..., lN],        # (3, L, L) float32 each
         "offsets": ()}
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        policy: str = "natural",
        upstream_blur_probs: bool = False,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        size_pairs: Sequence[Sequence[int]] = (),
    ):
        if policy not in AUGMENTATION_POLICIES:
            raise ValueError(f"crops.policy must be one of {AUGMENTATION_POLICIES}, got {policy!r}")
        if local_crops_number < 0:
            raise ValueError(f"crops.local_crops_number must be >= 0, got {local_crops_number}")
        for name, size in (("global_crops_size", global_crops_size), ("local_crops_size", local_crops_size)):
            if int(size) <= 0:
                raise ValueError(f"crops.{name} must be positive, got {size}")
        self.global_crops_scale = _check_range("crops.global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_range("crops.local_crops_scale", local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.policy = policy
        self.upstream_blur_probs = bool(upstream_blur_probs)
        self.mean = tuple(mean)
        self.std = tuple(std)

        nominal = PAPER_BLUR_PROBS if policy == "natural" else SKETCH_BLUR_PROBS
        sigma = DEFAULT_BLUR_SIGMA if policy == "natural" else SKETCH_BLUR_SIGMA
        #: Probability that each crop type is blurred, after the upstream flag is applied.
        self.blur_probs = {k: (1.0 - p if self.upstream_blur_probs else p) for k, p in nominal.items()}

        #: Input conversion: RGB (natural) or luminance for PIL inputs (sketch), see above.
        self.prepare = ToRGB() if policy == "natural" else ToLuminance()
        #: ``(global size, local size)`` pairs a batch may use (high-resolution adaptation); the
        #: first is the one in use until :meth:`select_size_pair` picks another.
        self.size_pairs = [(int(g), int(lo)) for g, lo in size_pairs] or [
            (self.global_crops_size, self.local_crops_size)
        ]
        for global_size, local_size in self.size_pairs:
            if global_size <= 0 or local_size <= 0:
                raise ValueError(f"crop sizes must be positive, got the pair ({global_size}, {local_size})")
        self._geometric_pairs = [
            (self._geometric(g, self.global_crops_scale), self._geometric(lo, self.local_crops_scale))
            for g, lo in self.size_pairs
        ]
        self.select_size_pair(0)
        normalize = make_normalize_transform(self.mean, self.std)
        colour = self._colour()
        solarize = [v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=SOLARIZE_PROB)] if policy == "natural" else []
        self.global_transform_1 = v2.Compose([*colour, make_blur(self.blur_probs["global_1"], sigma), normalize])
        self.global_transform_2 = v2.Compose(
            [*colour, make_blur(self.blur_probs["global_2"], sigma), *solarize, normalize]
        )
        self.local_transform = v2.Compose([*colour, make_blur(self.blur_probs["local"], sigma), normalize])

    def select_size_pair(self, index: int) -> None:
        """Crop the following samples at size pair ``index`` of :attr:`size_pairs` (every sample
        of a batch must use the same pair: :class:`~dinov2.train.data.CropSizeSchedule` decides)."""
        self.size_index = int(index)
        self.geometric_global, self.geometric_local = self._geometric_pairs[self.size_index]

    @classmethod
    def from_config(cls, crops_cfg: Any) -> DataAugmentationDINO:
        """Build from the ``crops:`` section of the training config (see docs/ssl_components.md;
        ``crops.global_crops_sizes`` / ``local_crops_sizes``: docs/high_resolution.md)."""
        return cls(
            global_crops_scale=tuple(crops_cfg.global_crops_scale),
            local_crops_scale=tuple(crops_cfg.local_crops_scale),
            local_crops_number=crops_cfg.local_crops_number,
            global_crops_size=crops_cfg.global_crops_size,
            local_crops_size=crops_cfg.local_crops_size,
            policy=crops_cfg.policy,
            upstream_blur_probs=crops_cfg.upstream_blur_probs,
            mean=tuple(crops_cfg.mean),
            std=tuple(crops_cfg.std),
            size_pairs=crop_size_pairs(crops_cfg),
        )

    @staticmethod
    def _geometric(size: int, scale: tuple[float, float]) -> v2.Compose:
        return v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
            ]
        )

    def _colour(self) -> list:
        if self.policy == "sketch":
            return []
        return [
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]

    def __call__(self, image) -> dict[str, Any]:
        image = self.prepare(image)
        global_1 = self.global_transform_1(self.geometric_global(image))
        global_2 = self.global_transform_2(self.geometric_global(image))
        local = [self.local_transform(self.geometric_local(image)) for _ in range(self.local_crops_number)]
        return _sample(global_1, global_2, local)

    def __repr__(self) -> str:
        sizes = f", size_pairs={self.size_pairs}" if len(self.size_pairs) > 1 else ""
        return (
            f"{type(self).__name__}(policy={self.policy!r}, global={self.global_crops_size}px "
            f"scale={self.global_crops_scale}, local={self.local_crops_number}x{self.local_crops_size}px "
            f"scale={self.local_crops_scale}, blur_probs={self.blur_probs}, "
            f"upstream_blur_probs={self.upstream_blur_probs}{sizes})"
        )


class FastDataAugmentationDINO(DataAugmentationDINO):
    """:class:`DataAugmentationDINO` computed faster: the same crops, bit for bit, from the same
    random draws. Training uses this class (``dinov2/train/data.py``).

    It builds the same ``v2`` pipelines and walks their steps, but runs the steps it knows
    without the ``v2`` Transform machinery (pytree flattening, input checks and kernel dispatch
    per call, most of the cost of a 28 px crop; see :func:`_fast_kernel`): the random resized
    crop, the horizontal flip, the blur (with a contiguous kernel, :func:`_gaussian_blur`), the
    solarisation and the normalisation of :func:`make_normalize_transform` (to float, expand to
    RGB and normalise in one step). A PIL input stays PIL through geometry and colour, as in the
    ``v2`` pipelines, and becomes a uint8 tensor at the blur (where ``v2`` converts it too).
    Each replaced step draws the same random numbers from torch's global RNG, in the same order,
    as the transform it replaces (``tests/test_augmentations_masking.py`` checks each step against
    the installed torchvision, and the crops of each configuration against
    :class:`DataAugmentationDINO`). Every other step (colour jitter, grayscale, and any step that
    was added or replaced, a subclass of a known transform included) runs as the ``v2`` transform
    itself, so the crops are the reference's for any pipeline.

    Measured with one thread: 1.5-1.9x faster than the reference on the Quick, Draw! recipe's
    sketches (2 global 28 px crops), 2.0-2.2x with 4 local crops, 1.1-1.3x on 224 px photos
    (2x224 + 8x96, where colour jitter dominates); docs/datasets.md has the figures.
    """

    def __call__(self, image) -> dict[str, Any]:
        image = self.prepare(image)
        if isinstance(image, torch.Tensor):
            image = image.as_subclass(torch.Tensor)  # tv_tensors.Image dispatch costs more than the pixel work
        global_1 = self._crop(image, self.geometric_global, self.global_transform_1)
        global_2 = self._crop(image, self.geometric_global, self.global_transform_2)
        local = [self._crop(image, self.geometric_local, self.local_transform) for _ in range(self.local_crops_number)]
        return _sample(global_1, global_2, local)

    @staticmethod
    def _crop(image, geometric: v2.Transform, photometric: v2.Transform) -> torch.Tensor:
        for step in (*_steps(geometric), *_steps(photometric)):
            kernel = _fast_kernel(step)
            image = step(image) if kernel is None else kernel(step, image)
        return image


def crop_size_pairs(crops_cfg: Any) -> list[tuple[int, int]]:
    """The ``(global, local)`` crop size pairs of a ``crops:`` config section:
    ``zip(global_crops_sizes, local_crops_sizes)`` when set (high-resolution adaptation), else
    the one pair ``(global_crops_size, local_crops_size)``."""
    global_sizes = list(crops_cfg.get("global_crops_sizes", None) or [])
    local_sizes = list(crops_cfg.get("local_crops_sizes", None) or [])
    if len(global_sizes) != len(local_sizes):
        raise ValueError(
            f"crops.global_crops_sizes ({global_sizes}) and crops.local_crops_sizes ({local_sizes}) must have "
            "the same length: one (global, local) pair each"
        )
    if not global_sizes:
        return [(int(crops_cfg.global_crops_size), int(crops_cfg.local_crops_size))]
    return [(int(g), int(lo)) for g, lo in zip(global_sizes, local_sizes)]


def _sample(global_1: torch.Tensor, global_2: torch.Tensor, local: list[torch.Tensor]) -> dict[str, Any]:
    return {
        "global_crops": [global_1, global_2],
        "global_crops_teacher": [global_1, global_2],
        "local_crops": local,
        "offsets": (),
    }


def _steps(pipeline: v2.Transform) -> Sequence[v2.Transform]:
    """The steps of a ``Compose`` pipeline (what ``Compose.forward`` runs in turn), else the step itself."""
    return pipeline.transforms if type(pipeline) is v2.Compose else (pipeline,)


# The fast path: one function per replaced step, taking (step, image) and doing for one image what
# the step's forward does, through the step's own make_params / transform where it can. The types
# are matched exactly, not with isinstance: a subclass may draw or compute differently.


def _transform_one(step: v2.Transform, image):
    """``Transform.forward`` for one image: the step's own parameters and kernel."""
    return step.transform(image, step.make_params([image]))


def _random_apply_transform(step: v2.Transform, image):
    """``_RandomApplyTransform.forward`` (flip, solarisation) for one image: one draw decides,
    even when ``p`` is 0 or 1, then the step's own parameters and kernel."""
    if torch.rand(1) >= step.p:
        return image
    return step.transform(image, step.make_params([image]))


def _random_blur(step: v2.RandomApply, image) -> torch.Tensor:
    """``RandomApply([GaussianBlur])`` for one image: RandomApply's draw (made even when ``p`` is
    0 or 1), then the blur's own sigma draw, computed with a contiguous kernel."""
    if torch.rand(1) >= step.p:
        return image
    blur = step.transforms[0]
    return _gaussian_blur(_as_tensor(image), blur.kernel_size, **blur.make_params([image]))


def _normalize(mean: torch.Tensor, std: torch.Tensor, step: v2.Compose, image) -> torch.Tensor:
    """The steps of :func:`make_normalize_transform` (ToImage, RGB, ToDtype, Normalize, ToPureTensor)
    in one, with ``mean`` / ``std`` as prebuilt tensors (normalize would rebuild them per crop)."""
    tensor = _as_tensor(image)
    converted = F.to_dtype(tensor, torch.float32, scale=True)
    if converted.shape[-3] == 1:  # what v2.RGB does to one channel (the sketch policy's luminance)
        return F.normalize(converted.expand(3, -1, -1), mean, std)
    # In place only on a tensor made here (to_dtype returns a float32 input itself).
    return F.normalize(converted, mean, std, inplace=converted is not tensor)


_NORMALIZE_STEPS = [v2.ToImage, v2.RGB, v2.ToDtype, v2.Normalize, v2.ToPureTensor]


def _fast_normalize(step: v2.Compose) -> Callable[[Any, Any], torch.Tensor] | None:
    """:func:`_normalize` for a ``Compose`` with the steps and settings of
    :func:`make_normalize_transform`, else None."""
    steps = step.transforms
    if list(map(type, steps)) != _NORMALIZE_STEPS:
        return None
    to_dtype, normalize = steps[2], steps[3]
    if to_dtype.dtype is not torch.float32 or not to_dtype.scale:
        return None
    return functools.partial(_normalize, *_mean_std_tensors(tuple(normalize.mean), tuple(normalize.std)))


@functools.lru_cache(maxsize=16)
def _mean_std_tensors(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
        torch.tensor(std, dtype=torch.float32).view(-1, 1, 1),
    )


_FAST_STEPS = {
    v2.RandomResizedCrop: _transform_one,
    v2.RandomHorizontalFlip: _random_apply_transform,
    v2.RandomSolarize: _random_apply_transform,
}


def _fast_kernel(step: Any) -> Callable[[Any, Any], Any] | None:
    """The fast-path function for ``step``, or None where the step runs as the ``v2`` transform.

    Colour jitter and grayscale are not replaced: on a 28 px crop the transform overhead is most
    of the cost, on a 224 px one the pixel work is, and the sketch policy has no colour steps."""
    kind = type(step)
    if kind is v2.RandomApply:
        return _random_blur if _blur_of(step) is not None else None
    if kind is v2.Compose:
        return _fast_normalize(step)
    return _FAST_STEPS.get(kind)


def _as_tensor(image) -> torch.Tensor:
    return F.pil_to_tensor(image) if isinstance(image, Image.Image) else image


def _gaussian_blur(image: torch.Tensor, kernel_size: Sequence[int], sigma: Sequence[float]) -> torch.Tensor:
    """``F.gaussian_blur`` of a ``(C, H, W)`` tensor with the same arithmetic (kernel, reflect
    padding, grouped conv2d, rounding back to integers), but with a contiguous kernel: conv2d on
    torchvision's expanded (stride-0) kernel takes a slower path, 236 vs 152 us for a 28 px crop,
    and the blur was the largest single cost of a sketch crop."""
    floating = image.is_floating_point()
    dtype = image.dtype if floating else torch.float32
    kernel_x, kernel_y = (_gaussian_kernel_1d(size, s, dtype) for size, s in zip(kernel_size, sigma))
    kernel = kernel_y.unsqueeze(-1) * kernel_x
    channels = image.shape[-3]
    kernel = kernel.expand(channels, 1, *kernel.shape).contiguous()
    pad_x, pad_y = kernel_size[0] // 2, kernel_size[1] // 2
    output = torch.nn.functional.pad(image.to(dtype).unsqueeze(0), [pad_x, pad_x, pad_y, pad_y], mode="reflect")
    output = torch.nn.functional.conv2d(output, kernel, groups=channels).squeeze(0)
    return output if floating else output.round_().to(image.dtype)


def _gaussian_kernel_1d(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    # torchvision's kernel: samples of exp(-(x / sigma)^2) on a fixed grid, normalised by softmax
    limit = (size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-limit, limit, steps=size, dtype=dtype)
    return torch.softmax(x.div(sigma).pow(2).neg(), dim=0)


def _blur_of(step: v2.Transform) -> v2.GaussianBlur | None:
    """The ``GaussianBlur`` of a ``RandomApply([GaussianBlur])`` step (see ``make_blur``), else None."""
    if type(step) is v2.RandomApply and len(step.transforms) == 1 and type(step.transforms[0]) is v2.GaussianBlur:
        return step.transforms[0]
    return None


def _first_blur_probability(pipeline: v2.Compose) -> float | None:
    """Probability of the blur step of a built pipeline (for inspection and tests)."""
    for step in pipeline.transforms:
        if isinstance(step, v2.RandomApply) and any(isinstance(t, v2.GaussianBlur) for t in step.transforms):
            return float(step.p)
    return None


def blur_probabilities(augmentation: DataAugmentationDINO) -> dict[str, float | None]:
    """Read the blur probabilities back from the built transforms of ``augmentation``."""
    return {
        "global_1": _first_blur_probability(augmentation.global_transform_1),
        "global_2": _first_blur_probability(augmentation.global_transform_2),
        "local": _first_blur_probability(augmentation.local_transform),
    }
