"""The one family of evaluation / classification transforms (dinov2.data.transforms): the pixels the
evaluations, the linear probe's augmentation and classifiers see are those of the pipelines they
were written with before the family was shared (hand-built here), for a fixed image."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dinov2.classify.transforms import (
    eval_transform,
    normalise_transform,
    preprocessing_settings,
    resize_transform,
    train_transform,
)
from dinov2.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    make_classification_eval_transform,
    make_classification_train_transform,
)
from dinov2.eval.cli import EvalContext

BICUBIC = v2.InterpolationMode.BICUBIC
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _photo() -> Image.Image:
    """Smooth gradients plus noise, an odd size: resampling differences would show."""
    y, x = np.mgrid[0:37, 0:53]
    rgb = np.stack([x * 4, y * 6, (x + y) * 3], axis=-1) + np.random.default_rng(0).integers(0, 40, (37, 53, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _to_float(mean, std):
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def _seeded(transform, image, seed):
    torch.manual_seed(seed)
    return transform(image)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_eval_transforms_give_the_pixels_of_the_former_pipelines(mode):
    image = _photo().convert(mode)
    # What dinov2.eval.setup.make_eval_transform built: tensor first, then resize (18 = 16 x 256/224);
    # v2.RGB() does nothing to an RGB image and expands a grayscale one, as classify's pipeline did.
    former_eval = v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize(18, interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(16),
            *_to_float(MEAN, STD),
        ]
    )
    context = EvalContext(torch.device("cpu"), SimpleNamespace(image_size=16, mean=MEAN, std=STD), None, None)
    for transform in (context.transform(), make_classification_eval_transform(crop_size=16, mean=MEAN, std=STD)):
        out = transform(image)
        assert type(out) is torch.Tensor and out.shape == (3, 16, 16)
        assert torch.equal(out, former_eval(image))
    whole = EvalContext(torch.device("cpu"), context.backbone, None, None, resize_size=16).transform()(image)
    assert torch.equal(
        whole,
        v2.Compose(
            [
                v2.ToImage(),
                v2.RGB(),
                v2.Resize(16, interpolation=BICUBIC, antialias=True),
                v2.CenterCrop(16),
                *_to_float(MEAN, STD),
            ]
        )(image),
    )
    # The 224 px defaults: ImageNet statistics, 256 px short side.
    former_imagenet = v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize(256, interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(224),
            *_to_float(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )
    assert torch.equal(make_classification_eval_transform()(image), former_imagenet(image))
    with pytest.raises(ValueError, match="smaller than the 16 px centre crop"):
        make_classification_eval_transform(12, 16)
    # Any PIL mode is read as RGB first (an RGBA upload, a palette PNG), as by the SSL pipelines.
    rgba = _photo().convert("RGBA")
    assert torch.equal(
        make_classification_eval_transform(crop_size=16)(rgba),
        make_classification_eval_transform(crop_size=16)(rgba.convert("RGB")),
    )


def test_classifier_transforms_give_the_pixels_of_the_former_pipelines():
    image = _photo()
    settings = preprocessing_settings(crop_size=16, resize_size=20, mean=MEAN, std=STD, interpolation="bilinear")
    mode = v2.InterpolationMode.BILINEAR
    former_resize = v2.Compose([v2.ToImage(), v2.RGB(), v2.Resize(20, interpolation=mode, antialias=True)])
    former_eval = v2.Compose([former_resize, v2.CenterCrop(16), *_to_float(MEAN, STD)])
    assert torch.equal(eval_transform(settings)(image), former_eval(image))
    # Inference: resize, crop, (mirror,) normalise, as Predictor.views composes them.
    crop = v2.CenterCrop(16)(resize_transform(settings)(image))
    assert torch.equal(
        normalise_transform(settings)(v2.functional.horizontal_flip(crop)),
        v2.Compose(_to_float(MEAN, STD))(v2.functional.horizontal_flip(crop)),
    )
    for hflip in (True, False):
        flip = [v2.RandomHorizontalFlip()] if hflip else []
        former_train = v2.Compose(
            [
                v2.ToImage(),
                v2.RGB(),
                v2.RandomResizedCrop(16, scale=(0.35, 1.0), interpolation=mode, antialias=True),
                *flip,
                *_to_float(MEAN, STD),
            ]
        )
        for seed in range(4):  # the same random draws, in the same order
            assert torch.equal(
                _seeded(train_transform(settings, hflip=hflip), image, seed), _seeded(former_train, image, seed)
            )


def test_probe_augmentation_gives_the_pixels_of_the_former_pipeline():
    image = _photo()
    # What dinov2.eval.setup.make_train_transform built for linear --augment.
    former = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(16, interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_float(MEAN, STD),
        ]
    )
    outputs = set()
    for seed in range(4):
        out = _seeded(make_classification_train_transform(16, mean=MEAN, std=STD), image, seed)
        assert torch.equal(out, _seeded(former, image, seed))
        outputs.add(out.sum().item())
    assert len(outputs) > 1  # really random crops
    with pytest.raises(ValueError, match="scale"):
        make_classification_train_transform(16, scale=(0.0, 1.0))
