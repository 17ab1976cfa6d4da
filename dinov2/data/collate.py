"""Batch the multi-crop samples of :class:`~dinov2.data.augmentations.DataAugmentationDINO` and
draw the iBOT masks of the global crops."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from dinov2.data.masking import MaskingGenerator

__all__ = ["CollateBySize", "build_collate_fn_from_config", "collate_data_and_cast", "mask_ratio_bins"]


def _as_random(generator: random.Random | torch.Generator | None):
    """The ``random.Random``-like source of randomness for one collate call."""
    if generator is None:
        return random  # the module: seeded per DataLoader worker by PyTorch
    if isinstance(generator, random.Random):
        return generator
    if isinstance(generator, torch.Generator):
        # Advance the torch generator once and derive a Python RNG from it: deterministic given
        # the generator's state, which is what a resumed run restores.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return random.Random(seed)
    raise TypeError(f"generator must be random.Random, torch.Generator or None, got {type(generator).__name__}")


def mask_ratio_bins(n_masked: int, mask_ratio_tuple: Sequence[float]) -> list[tuple[float, float]]:
    """Split ``[min, max]`` into ``n_masked`` equal consecutive bins: the ``i``-th masked crop
    draws its ratio uniformly from bin ``i``, so ratios are spread over the whole range."""
    low, high = float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1])
    edges = torch.linspace(low, high, n_masked + 1).tolist()
    return list(zip(edges[:-1], edges[1:]))


def _stack(crops: list[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(c.shape) for c in crops}
    if len(shapes) != 1:
        raise ValueError(f"collate: {what} have different shapes {sorted(shapes)}; crops of one resolution must match")
    return torch.stack(crops)


def collate_data_and_cast(
    samples_list: Sequence[Any],
    mask_ratio_tuple: Sequence[float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype = torch.float32,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    generator: random.Random | torch.Generator | None = None,
) -> dict[str, Any]:
    """Collate ``(crops_dict, target)`` samples into the tensors SSLMetaArch consumes.

    Args:
        samples_list: samples from a dataset whose transform is ``DataAugmentationDINO``.
            ``None`` entries (images skipped as unreadable) are dropped and counted.
        mask_ratio_tuple: ``(min, max)`` share of patches masked in a masked crop.
        mask_probability: share of the ``2B`` global crops that are masked
            (``int(2B * mask_probability)`` crops).
        dtype: dtype of the returned crops (e.g. ``torch.bfloat16``).
        n_tokens: patches per global crop; must equal ``mask_generator``'s grid size.
        mask_generator: a :class:`MaskingGenerator` over the global crop's patch grid.
        generator: source of randomness for the masks: ``None`` uses Python's ``random``
            module (seeded per DataLoader worker by PyTorch); a ``random.Random`` or
            ``torch.Generator`` makes a single-process collate reproducible. Do not pass a
            ``random.Random`` through ``functools.partial`` into multi-worker DataLoaders:
            each worker would get a copy in the same state and draw identical masks.

    Returns:
        dict with

        * ``collated_global_crops``: ``(n_global * B, C, H, W)``, all first views, then all
          second views (crop-major, ``chunk(n_global)`` gives one view per chunk);
        * ``collated_local_crops``: ``(n_local * B, C, h, w)``, crop-major; shape
          ``(0, C, H, W)`` with the global crop size when there are no local crops;
        * ``collated_masks``: ``(n_global * B, n_tokens)`` bool, True = masked, rows in the
          same order as the global crops (masked crops are shuffled among them);
        * ``mask_indices_list``: ``(M,)`` long, flat indices of the masked tokens into
          ``collated_masks.flatten()``;
        * ``masks_weight``: ``(M,)`` float32, ``1 / (masked tokens of that token's crop)``;
        * ``n_masked_patches``: ``(1,)`` long tensor holding ``M``;
        * ``upperbound``: int, an upper bound on ``M`` for this ``B`` and mask setting (for
          static-shape buffers);
        * ``n_global_crops``, ``n_local_crops``: crops per image;
        * ``batch_size``: images kept (``B``); ``n_skipped``: ``None`` samples dropped;
        * ``targets``: collated targets (``default_collate``), present when the samples carry
          targets (not ``None``).
    """
    if mask_generator is None:
        raise ValueError("collate_data_and_cast needs a mask_generator")
    grid_tokens = mask_generator.num_patches
    if n_tokens is None:
        n_tokens = grid_tokens
    if n_tokens != grid_tokens:
        raise ValueError(f"n_tokens={n_tokens} but the mask generator covers {grid_tokens} patches")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    if not 0.0 <= mask_ratio_tuple[0] <= mask_ratio_tuple[1] <= 1.0:
        raise ValueError(f"mask_ratio_tuple must be (min, max) within [0, 1], got {tuple(mask_ratio_tuple)}")

    kept = [s for s in samples_list if s is not None]
    n_skipped = len(samples_list) - len(kept)
    if not kept:
        raise ValueError(f"collate: all {len(samples_list)} samples of the batch were skipped (None)")
    crops_dicts = [s[0] if isinstance(s, (tuple, list)) else s for s in kept]
    targets = [s[1] if isinstance(s, (tuple, list)) and len(s) > 1 else None for s in kept]
    batch_size = len(kept)

    n_global = len(crops_dicts[0]["global_crops"])
    n_local = len(crops_dicts[0]["local_crops"])
    for d in crops_dicts:
        if len(d["global_crops"]) != n_global or len(d["local_crops"]) != n_local:
            raise ValueError("collate: samples of one batch have different numbers of crops")
    global_crops = _stack([d["global_crops"][i] for i in range(n_global) for d in crops_dicts], "global crops")
    if n_local > 0:
        local_crops = _stack([d["local_crops"][i] for i in range(n_local) for d in crops_dicts], "local crops")
    else:
        local_crops = global_crops.new_empty((0, *global_crops.shape[1:]))

    rng = _as_random(generator)
    n_crops = global_crops.shape[0]
    n_masked_crops = int(n_crops * mask_probability)
    masks = []
    upperbound = 0
    for low, high in mask_ratio_bins(n_masked_crops, mask_ratio_tuple):
        masks.append(mask_generator(int(n_tokens * rng.uniform(low, high)), rng=rng).flatten())
        upperbound += int(n_tokens * high)
    masks.extend(torch.zeros(n_tokens, dtype=torch.bool) for _ in range(n_crops - n_masked_crops))
    rng.shuffle(masks)
    collated_masks = torch.stack(masks)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_crop_weight = 1.0 / collated_masks.sum(dim=-1).clamp(min=1).float()
    masks_weight = per_crop_weight.unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    out = {
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": local_crops.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.tensor([mask_indices_list.numel()], dtype=torch.long),
        "upperbound": upperbound,
        "n_global_crops": n_global,
        "n_local_crops": n_local,
        "batch_size": batch_size,
        "n_skipped": n_skipped,
    }
    if all(t is not None for t in targets):
        out["targets"] = default_collate(targets)
    return out


class CollateBySize:
    """The collate function of a batch's global crop size (high-resolution adaptation: every
    batch uses one ``(global, local)`` size pair, and its iBOT masks cover that patch grid)."""

    def __init__(self, collates: dict):
        self.collates = dict(collates)

    def __call__(self, samples_list, generator=None):
        kept = [s for s in samples_list if s is not None]
        if not kept:
            raise ValueError(f"collate: all {len(samples_list)} samples of the batch were skipped (None)")
        first = kept[0][0] if isinstance(kept[0], (tuple, list)) else kept[0]
        size = int(first["global_crops"][0].shape[-1])
        if size not in self.collates:
            raise ValueError(
                f"collate: global crops of {size} px, but the configured sizes are {sorted(self.collates)}"
            )
        return self.collates[size](samples_list, generator=generator)


def build_collate_fn_from_config(cfg: Any, patch_size: int, dtype: torch.dtype = torch.float32):
    """``functools.partial`` of :func:`collate_data_and_cast` set up from the training config.

    Reads ``crops.global_crops_size``, ``ibot.mask_ratio_min_max`` and
    ``ibot.mask_sample_probability``; blocks are at most half the patch grid (as in DINOv2).
    With ``ibot.loss_weight`` 0 nothing is masked (no mask would be used, and drawing the blocks
    cost a tenth of the main-process loading time of the Quick, Draw! recipe). With several
    ``crops.global_crops_sizes`` (high-resolution adaptation), a :class:`CollateBySize` over one
    such function per size.
    """
    sizes = [int(size) for size in (cfg.crops.get("global_crops_sizes", None) or [])]
    if len(set(sizes)) > 1:
        return CollateBySize({size: _collate_for_size(cfg, size, patch_size, dtype) for size in sorted(set(sizes))})
    size = sizes[0] if sizes else int(cfg.crops.global_crops_size)
    return _collate_for_size(cfg, size, patch_size, dtype)


def _collate_for_size(cfg: Any, size: int, patch_size: int, dtype: torch.dtype):
    from functools import partial

    if size % patch_size != 0:
        key = "crops.global_crops_sizes" if cfg.crops.get("global_crops_sizes", None) else "crops.global_crops_size"
        raise ValueError(f"{key}: {size} is not a multiple of the patch size {patch_size}")
    grid = size // patch_size
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=max(4, int(0.5 * grid * grid)))
    return partial(
        collate_data_and_cast,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=float(cfg.ibot.mask_sample_probability) if float(cfg.ibot.loss_weight) > 0 else 0.0,
        dtype=dtype,
        n_tokens=grid * grid,
        mask_generator=mask_generator,
    )
