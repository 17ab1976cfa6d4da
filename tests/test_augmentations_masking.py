"""Multi-crop augmentation, block masking and the SSL collate function."""

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dinov2.data.augmentations import (
    DataAugmentationDINO,
    FastDataAugmentationDINO,
    _fast_kernel,
    _gaussian_blur,
    blur_probabilities,
)
from dinov2.data.collate import (
    build_collate_fn_from_config,
    collate_data_and_cast,
    mask_ratio_bins,
)
from dinov2.data.masking import MaskingGenerator
from dinov2.data.transforms import (
    make_classification_eval_transform,
    make_normalize_transform,
)
from dinov2.loss import masks_weight_from_masks


def _photo(h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _aug(n_local=2, cls=FastDataAugmentationDINO, **kwargs):
    return cls((0.32, 1.0), (0.05, 0.32), n_local, global_crops_size=32, local_crops_size=16, **kwargs)


def _has(pipeline, kind):
    return any(
        isinstance(step, kind)
        or (isinstance(step, v2.RandomApply) and any(isinstance(t, kind) for t in step.transforms))
        for step in pipeline.transforms
    )


# ---------------------------------------------------------------- augmentation


def _sketch(size=28, seed=3):
    rng = np.random.default_rng(seed)
    ink = (rng.random((size, size)) < 0.15) * rng.integers(80, 256, size=(size, size))
    return Image.fromarray((255 - ink).astype(np.uint8), mode="L").convert("RGB")


_INPUTS = {
    "pil-rgb": _photo(),
    "pil-gray": _photo().convert("L"),
    "sketch": _sketch(),
    "uint8-tensor": torch.randint(0, 256, (3, 50, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
    "float-gray-tensor": torch.rand(1, 50, 40, generator=torch.Generator().manual_seed(1)),
    "numpy": np.random.default_rng(1).integers(0, 256, size=(40, 50, 3), dtype=np.uint8),
}


@pytest.mark.parametrize("cls", [DataAugmentationDINO, FastDataAugmentationDINO])
@pytest.mark.parametrize("name", ["pil-rgb", "pil-gray", "uint8-tensor", "float-gray-tensor", "numpy"])
def test_augmentation_output_structure_for_every_input_type(name, cls):
    out = _aug(n_local=3, cls=cls)(_INPUTS[name])
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    for crop in out["global_crops"]:
        assert type(crop) is torch.Tensor and crop.shape == (3, 32, 32) and crop.dtype == torch.float32
    for crop in out["local_crops"]:
        assert type(crop) is torch.Tensor and crop.shape == (3, 16, 16)
    assert out["global_crops_teacher"][0] is out["global_crops"][0]
    assert out["offsets"] == ()
    # Normalised with ImageNet statistics: values leave [0, 1].
    assert out["global_crops"][0].min() < 0


def _reference_crops(aug, image, seed):
    """Crops of ``aug``'s own v2 pipelines (the reference ``__call__``) and the next draw of the RNG."""
    torch.manual_seed(seed)
    out = DataAugmentationDINO.__call__(aug, image)
    return out["global_crops"] + out["local_crops"], torch.rand(1)


def _set_probabilities(aug, p):
    """Set every random on/off step (flip, colour jitter, grayscale, blur, solarisation) to ``p``."""
    for pipeline in (
        aug.geometric_global,
        aug.geometric_local,
        aug.global_transform_1,
        aug.global_transform_2,
        aug.local_transform,
    ):
        for step in pipeline.transforms:
            if hasattr(step, "p"):
                step.p = p


# (policy, constructor options, probability forced on every random on/off step or None)
_CONFIGURATIONS = {
    "natural": ("natural", {}, None),
    "natural-upstream-blur": ("natural", {"upstream_blur_probs": True}, None),  # global 1: blur p=0
    "natural-all-steps-on": ("natural", {}, 1.0),  # every flip, jitter, grayscale, blur, solarisation
    "natural-all-steps-off": ("natural", {}, 0.0),
    "sketch": ("sketch", {}, None),
    "sketch-upstream-blur": ("sketch", {"upstream_blur_probs": True}, None),
    "sketch-all-steps-on": ("sketch", {"mean": (1.0,) * 3, "std": (0.3,) * 3}, 1.0),
}


@pytest.mark.parametrize("configuration", sorted(_CONFIGURATIONS))
@pytest.mark.parametrize("name", ["pil-rgb", "pil-gray", "sketch", "uint8-tensor"])
def test_fast_augmentation_gives_the_reference_crops_under_a_seed(configuration, name):
    # FastDataAugmentationDINO runs most steps without the v2 Transform classes; it must draw the
    # same random numbers and compute the same pixels as the v2 pipelines it built, bit for bit.
    policy, options, p = _CONFIGURATIONS[configuration]
    aug = _aug(n_local=2, policy=policy, **options)
    if p is not None:
        _set_probabilities(aug, p)
    image = _INPUTS[name]
    for seed in range(6):
        want, want_next = _reference_crops(aug, image, seed)
        torch.manual_seed(seed)
        out = aug(image)
        got, got_next = out["global_crops"] + out["local_crops"], torch.rand(1)
        for a, b in zip(got, want, strict=True):
            assert type(a) is torch.Tensor and torch.equal(a, b)
        assert torch.equal(got_next, want_next)  # the same number of draws
    # The comparison is not vacuous: the crop, flip, blur, solarisation and normalisation take the
    # fast path; the colour steps run as v2 transforms.
    fast = {
        type(step).__name__
        for pipeline in (aug.geometric_global, aug.global_transform_2)
        for step in pipeline.transforms
        if _fast_kernel(step) is not None
    }
    expected = {"RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "Compose"}
    if policy == "natural":
        assert fast == expected | {"RandomSolarize"}
        assert [_fast_kernel(step) for step in aug.local_transform.transforms[:2]] == [None, None]  # jitter, grayscale
    else:
        assert fast == expected


def _pixels(image):
    return F.pil_to_tensor(image) if isinstance(image, Image.Image) else image


@pytest.mark.parametrize(
    "step",
    [
        v2.RandomResizedCrop(16, scale=(0.05, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomResizedCrop(12, scale=(0.3, 0.6), ratio=(0.5, 2.0)),  # bilinear, other aspect ratios
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomHorizontalFlip(p=1.0),
        v2.RandomHorizontalFlip(p=0.0),
        v2.RandomSolarize(threshold=128, p=0.5),
        v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.5, 1.0))], p=1.0),
        v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=0.0),
        make_normalize_transform((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
    ],
    ids=lambda step: repr(step).split("(")[0] + str(getattr(step, "p", "")),
)
def test_each_fast_step_draws_and_computes_like_the_v2_transform(step):
    # Locks the fast path to the installed torchvision: for one image, each replacement must
    # consume the global RNG exactly as the transform's forward does and give the same pixels.
    kernel = _fast_kernel(step)
    assert kernel is not None
    images = [_photo(40, 30), _photo(40, 30).convert("L"), torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)]
    for image in images:
        for seed in range(12):
            torch.manual_seed(seed)
            want, want_next = step(image), torch.rand(1)
            torch.manual_seed(seed)
            got, got_next = kernel(step, image), torch.rand(1)
            assert torch.equal(_pixels(got), _pixels(want)) and torch.equal(got_next, want_next)


class _BlurSubclass(v2.GaussianBlur):
    """A subclass may compute differently: it must not be taken for the blur it derives from."""


@pytest.mark.parametrize("name", ["pil-rgb", "uint8-tensor"])
def test_fast_augmentation_runs_steps_it_does_not_know_as_v2(name):
    aug = _aug(n_local=2, policy="natural")
    added = {
        "rotation": v2.RandomRotation(20),
        "blur-and-invert": v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0)), v2.RandomInvert(p=1.0)], p=0.7),
        "blur-subclass": v2.RandomApply([_BlurSubclass(9, sigma=(0.1, 2.0))], p=0.7),
        "other-normalisation": v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.2] * 3)]
        ),
    }
    aug.geometric_global.transforms.insert(0, added["rotation"])
    aug.local_transform.transforms[2] = added["blur-and-invert"]
    aug.global_transform_2.transforms[2] = added["blur-subclass"]
    aug.global_transform_1.transforms[-1] = added["other-normalisation"]
    aug.geometric_local = v2.RandomResizedCrop(16, scale=(0.05, 0.32))  # a single step instead of a Compose
    assert all(_fast_kernel(step) is None for step in added.values())
    image = _INPUTS[name]
    for seed in range(6):
        want, want_next = _reference_crops(aug, image, seed)
        torch.manual_seed(seed)
        out = aug(image)
        for got, expected in zip(out["global_crops"] + out["local_crops"], want, strict=True):
            assert torch.equal(got, expected)
        assert torch.equal(torch.rand(1), want_next)
    assert out["local_crops"][0].shape == (3, 16, 16)


def test_sketch_policy_works_on_one_channel_with_the_pixels_of_the_rgb_path():
    # The sketch policy converts PIL inputs to luminance ("L") and expands to RGB only when it
    # normalises; for a gray drawing stored as RGB the crops equal those of 3-channel processing.
    from dinov2.data.transforms import ToLuminance, ToRGB

    rng = np.random.default_rng(3)
    ink = (rng.random((28, 28)) < 0.15) * rng.integers(80, 256, size=(28, 28))
    drawing = Image.fromarray((255 - ink).astype(np.uint8), mode="L").convert("RGB")
    aug = _aug(n_local=2, policy="sketch")
    assert isinstance(aug.prepare, ToLuminance) and aug.prepare(drawing).mode == "L"
    rgb_path = _aug(n_local=2, policy="sketch")
    rgb_path.prepare = ToRGB()
    for seed in range(12):
        torch.manual_seed(seed)
        fast = aug(drawing)
        torch.manual_seed(seed)
        reference = rgb_path(drawing)
        for got, want in zip(
            fast["global_crops"] + fast["local_crops"],
            reference["global_crops"] + reference["local_crops"],
            strict=True,
        ):
            assert got.shape[0] == 3 and torch.equal(got, want)
    # Colour is dropped by the sketch policy (luminance), kept by the natural one.
    red = Image.new("RGB", (32, 32), (255, 0, 0))

    def raw(augmentation):
        crop = augmentation(red)["global_crops"][0]
        return crop * torch.tensor(augmentation.std).view(3, 1, 1) + torch.tensor(augmentation.mean).view(3, 1, 1)

    gray = raw(aug)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    torch.testing.assert_close(gray[0], torch.full((32, 32), 76 / 255))  # PIL luma of pure red
    assert _aug(policy="natural").prepare(red).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_fast_gaussian_blur_equals_torchvision(dtype):
    generator = torch.Generator().manual_seed(0)
    for kernel_size, sigma in (([9, 9], [0.1, 0.1]), ([9, 9], [1.7, 1.7]), ([5, 3], [0.8, 1.3])):
        image = torch.randint(0, 256, (3, 28, 21), generator=generator, dtype=torch.uint8)
        image = image if dtype == torch.uint8 else image / 255.0
        got = _gaussian_blur(image, kernel_size, sigma)
        assert got.dtype == dtype and torch.equal(got, F.gaussian_blur(image, kernel_size, sigma))
        assert sigma[0] < 0.5 or not torch.equal(got, image)  # sigma 0.1 leaves integer pixels as they were


@pytest.mark.parametrize("cls", [DataAugmentationDINO, FastDataAugmentationDINO])
def test_augmentation_normalisation_uses_configured_mean_std(cls):
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    aug = cls((0.5, 1.0), (0.2, 0.5), 0, 16, 8, policy="sketch", mean=(0.5,) * 3, std=(0.25,) * 3)
    # A white image stays white under crops, flips and blur: (1 - 0.5) / 0.25 = 2.
    torch.testing.assert_close(aug(white)["global_crops"][0], torch.full((3, 16, 16), 2.0))


def test_blur_probabilities_paper_default_and_upstream_flag():
    assert blur_probabilities(_aug()) == {"global_1": 1.0, "global_2": 0.1, "local": 0.5}
    # Upstream's wrapper passes 1 - p to RandomApply: global 1 never blurred, global 2 at 0.9.
    upstream = blur_probabilities(_aug(upstream_blur_probs=True))
    assert upstream == pytest.approx({"global_1": 0.0, "global_2": 0.9, "local": 0.5})
    assert _aug().blur_probs == blur_probabilities(_aug())


def _blur_step(pipeline):
    return next(
        step
        for step in pipeline.transforms
        if isinstance(step, v2.RandomApply) and isinstance(step.transforms[0], v2.GaussianBlur)
    )


@pytest.mark.parametrize("upstream", [False, True])
def test_blur_is_applied_at_the_stated_frequency(upstream):
    # RandomApply's p is the chance of *applying* the blur; measure it on a checkerboard, with
    # sigma pinned to 2 so every application visibly changes the image.
    board = torch.zeros(3, 12, 12, dtype=torch.uint8)
    board[:, ::2, ::2] = 255
    board[:, 1::2, 1::2] = 255
    aug = _aug(upstream_blur_probs=upstream)
    pipelines = {"global_1": aug.global_transform_1, "global_2": aug.global_transform_2, "local": aug.local_transform}
    for name, pipeline in pipelines.items():
        step = _blur_step(pipeline)
        step.transforms[0].sigma = [2.0, 2.0]
        trials = 300
        blurred = sum(not torch.equal(step(board), board) for _ in range(trials)) / trials
        assert blurred == pytest.approx(aug.blur_probs[name], abs=0.08), name


def test_policies_differ_in_photometric_steps():
    natural, sketch = _aug(policy="natural"), _aug(policy="sketch")
    assert _has(natural.global_transform_1, v2.ColorJitter) and _has(natural.global_transform_2, v2.RandomSolarize)
    assert _has(natural.local_transform, v2.RandomGrayscale)
    for pipeline in (sketch.global_transform_1, sketch.global_transform_2, sketch.local_transform):
        assert not _has(pipeline, v2.ColorJitter)
        assert not _has(pipeline, v2.RandomSolarize)
        assert not _has(pipeline, v2.RandomGrayscale)
        assert _has(pipeline, v2.GaussianBlur)
    assert blur_probabilities(sketch) == {"global_1": 0.5, "global_2": 0.1, "local": 0.2}
    # A grayscale sketch stays gray: all three channels identical after the sketch policy.
    gray = _photo().convert("L")
    crop = sketch(gray)["global_crops"][1]
    raw = crop * torch.tensor(sketch.std).view(3, 1, 1) + torch.tensor(sketch.mean).view(3, 1, 1)
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[0], raw[2], atol=1e-5, rtol=0)


def test_augmentation_config_and_input_errors():
    cfg = OmegaConf.create(
        {
            "global_crops_scale": [0.32, 1.0],
            "local_crops_number": 4,
            "local_crops_scale": [0.05, 0.32],
            "global_crops_size": 32,
            "local_crops_size": 16,
            "policy": "sketch",
            "upstream_blur_probs": True,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.2, 0.2, 0.2],
        }
    )
    aug = DataAugmentationDINO.from_config(cfg)
    assert aug.policy == "sketch" and aug.local_crops_number == 4 and aug.upstream_blur_probs
    with pytest.raises(ValueError, match="crops.policy"):
        _aug(policy="cartoon")
    with pytest.raises(ValueError, match="crops.local_crops_scale"):
        DataAugmentationDINO((0.32, 1.0), (0.5, 0.1), 2)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        _aug()(torch.zeros(4, 10, 10, dtype=torch.uint8))
    with pytest.raises(TypeError, match="PIL image"):
        _aug()("not an image")


def test_eval_transform_shape():
    out = make_classification_eval_transform(resize_size=40, crop_size=32)(_photo())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("grid", [(4, 4), (14, 14), (7, 10)])
def test_masking_generator_exact_counts_within_bounds(grid):
    n = grid[0] * grid[1]
    gen = MaskingGenerator(grid, max_num_patches=max(4, n // 2))
    rng = random.Random(0)
    for _ in range(200):
        request = rng.randint(0, n // 2)
        mask = gen(request, rng=rng)
        assert mask.shape == grid and mask.dtype == torch.bool
        assert int(mask.sum()) == request


def test_masking_without_fill_never_exceeds_request_and_is_blocky():
    gen = MaskingGenerator((14, 14), max_num_patches=98, fill_remainder=False)
    rng = random.Random(1)
    for _ in range(200):
        request = rng.randint(0, 98)
        assert int(gen(request, rng=rng).sum()) <= request
    # Blocks, not salt-and-pepper: most masked patches have a masked 4-neighbour.
    mask = MaskingGenerator((14, 14), max_num_patches=98)(60, rng=random.Random(2))
    padded = torch.nn.functional.pad(mask.float()[None, None], (1, 1, 1, 1))[0, 0]
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    assert (neighbours[mask] > 0).float().mean() > 0.9


def test_masking_is_reproducible_with_a_seeded_rng_and_validates_input():
    gen = MaskingGenerator((14, 14), max_num_patches=98)
    assert torch.equal(gen(50, rng=random.Random(7)), gen(50, rng=random.Random(7)))
    with pytest.raises(ValueError, match="cannot mask"):
        gen(197)
    with pytest.raises(ValueError, match="max_num_patches"):
        MaskingGenerator((4, 4), min_num_patches=8, max_num_patches=4)


# ---------------------------------------------------------------- collate


def _fake_sample(n_local, global_size=32, local_size=16, target=0):
    return (
        {
            "global_crops": [torch.rand(3, global_size, global_size) for _ in range(2)],
            "global_crops_teacher": [],
            "local_crops": [torch.rand(3, local_size, local_size) for _ in range(n_local)],
            "offsets": (),
        },
        target,
    )


@pytest.mark.parametrize("n_local", [0, 2, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_collate_shapes_for_several_crop_settings(n_local, batch):
    samples = [_fake_sample(n_local, target=i) for i in range(batch)]
    gen = MaskingGenerator((4, 4), max_num_patches=8)
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.bfloat16, 16, gen, generator=random.Random(0))
    assert out["collated_global_crops"].shape == (2 * batch, 3, 32, 32)
    assert out["collated_global_crops"].dtype == torch.bfloat16
    assert out["collated_local_crops"].shape == (n_local * batch, 3, *((16, 16) if n_local else (32, 32)))
    assert out["collated_masks"].shape == (2 * batch, 16) and out["collated_masks"].dtype == torch.bool
    m = int(out["collated_masks"].sum())
    assert out["mask_indices_list"].shape == (m,) and out["masks_weight"].shape == (m,)
    assert out["n_masked_patches"].tolist() == [m] and m <= out["upperbound"]
    assert (out["n_global_crops"], out["n_local_crops"], out["batch_size"], out["n_skipped"]) == (2, n_local, batch, 0)
    assert out["targets"].tolist() == list(range(batch))
    # Exactly int(2B * p) crops are masked.
    assert int(out["collated_masks"].any(dim=1).sum()) == int(2 * batch * 0.5)
    torch.testing.assert_close(out["masks_weight"], masks_weight_from_masks(out["collated_masks"]))


def test_collate_crop_order_is_view_major():
    samples = [_fake_sample(2) for _ in range(3)]
    gen = MaskingGenerator((4, 4))
    out = collate_data_and_cast(samples, mask_generator=gen, n_tokens=16)
    g, loc = out["collated_global_crops"], out["collated_local_crops"]
    for b, (crops, _) in enumerate(samples):
        assert torch.equal(g[b], crops["global_crops"][0]) and torch.equal(g[3 + b], crops["global_crops"][1])
        assert torch.equal(loc[b], crops["local_crops"][0]) and torch.equal(loc[3 + b], crops["local_crops"][1])


def test_collate_mask_ratios_spread_over_range():
    batch, n_tokens = 16, 196
    samples = [_fake_sample(0) for _ in range(batch)]
    gen = MaskingGenerator((14, 14), max_num_patches=98)
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, n_tokens, gen, generator=random.Random(3))
    counts = sorted(int(c) for c in out["collated_masks"].sum(dim=1) if c > 0)
    assert len(counts) == 16
    # One masked crop per ratio bin of [0.1, 0.5]: the i-th smallest lies in the i-th bin.
    for count, (low, high) in zip(counts, mask_ratio_bins(16, (0.1, 0.5))):
        assert int(n_tokens * low) - 1 <= count <= int(n_tokens * high)
    # Each masked crop's weights sum to 1.
    per_crop = torch.zeros(2 * batch).index_add_(0, out["mask_indices_list"] // n_tokens, out["masks_weight"])
    torch.testing.assert_close(per_crop[per_crop > 0], torch.ones(16))


def test_collate_reproducible_with_generators_and_skips_none():
    samples = [_fake_sample(1) for _ in range(4)]
    gen = MaskingGenerator((4, 4), max_num_patches=8)
    a = collate_data_and_cast(samples, mask_generator=gen, generator=torch.Generator().manual_seed(5))
    b = collate_data_and_cast(samples, mask_generator=gen, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    out = collate_data_and_cast([None, samples[0], None, samples[1]], mask_generator=gen)
    assert out["n_skipped"] == 2 and out["batch_size"] == 2 and out["collated_global_crops"].shape[0] == 4
    with pytest.raises(ValueError, match="all 2 samples"):
        collate_data_and_cast([None, None], mask_generator=gen)
    with pytest.raises(ValueError, match="n_tokens"):
        collate_data_and_cast(samples, n_tokens=20, mask_generator=gen)
    no_targets = collate_data_and_cast([(s[0], None) for s in samples], mask_generator=gen)
    assert "targets" not in no_targets


def test_collate_from_config_with_real_augmentation():
    cfg = OmegaConf.create(
        {
            "crops": {"global_crops_size": 28},
            "ibot": {"loss_weight": 1.0, "mask_ratio_min_max": [0.1, 0.5], "mask_sample_probability": 0.5},
        }
    )
    collate = build_collate_fn_from_config(cfg, patch_size=7)
    aug = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, global_crops_size=28, local_crops_size=14)
    out = collate([(aug(_photo(seed=i)), i) for i in range(2)])
    assert out["collated_global_crops"].shape == (4, 3, 28, 28)
    assert out["collated_local_crops"].shape == (4, 3, 14, 14)
    assert out["collated_masks"].shape == (4, 16)
    assert out["collated_masks"].any()  # half of the global crops are masked
    cfg.ibot.loss_weight = 0.0  # no iBOT term: nothing to mask
    unmasked = build_collate_fn_from_config(cfg, patch_size=7)([(aug(_photo(seed=i)), i) for i in range(2)])
    assert not unmasked["collated_masks"].any() and int(unmasked["n_masked_patches"]) == 0
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build_collate_fn_from_config(cfg, patch_size=5)


def test_training_loader_installs_the_fast_augmentation():
    from dinov2.train.data import build_train_data_loader
    from dinov2.utils.config import load_config

    class Photos(torch.utils.data.Dataset):
        transform = None

        def __len__(self):
            return 8

        def __getitem__(self, index):
            return self.transform(_photo(seed=index)), 0

    cfg = load_config(
        overrides=[
            "train.batch_size_per_gpu=4",
            "train.num_workers=0",
            "crops.global_crops_size=28",
            "crops.local_crops_size=14",
            "crops.local_crops_number=1",
        ]
    )
    loader, dataset = build_train_data_loader(cfg, patch_size=7, rank=0, world_size=1, dataset=Photos())
    assert type(dataset.transform) is FastDataAugmentationDINO
    assert next(iter(loader))["collated_global_crops"].shape == (8, 3, 28, 28)
