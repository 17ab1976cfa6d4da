"""A seeded train / validation split of a dataset's samples, by sample or by whole groups.

One rule for every place that holds out validation samples from a training set: the linear-grid
and logistic-regression evaluations (``--val-fraction``) and classifier training
(``data.val_fraction``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["split_train_val"]


def split_train_val(
    num_samples: int, fraction: float, seed: int, groups: Optional[Sequence] = None, option: str = "--val-fraction"
) -> Tuple[np.ndarray, np.ndarray]:
    """(train positions, val positions): a seeded random ``fraction`` held out.

    With ``groups`` (one id per sample, e.g. the industrial ``group_id``) whole groups are held
    out, so photos of one part never sit on both sides of the model selection. ``option`` names
    the setting in errors.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"{option} must be in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 12345])
    if groups is None:
        order = rng.permutation(num_samples)
        n_val = max(1, int(round(fraction * num_samples)))
        if n_val >= num_samples:
            raise ValueError(f"{option} {fraction} leaves no training samples out of {num_samples}")
        return np.sort(order[n_val:]), np.sort(order[:n_val])
    if len(groups) != num_samples:
        raise ValueError(f"got {len(groups)} group ids for {num_samples} samples")
    codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]
    n_groups = int(codes.max()) + 1 if num_samples else 0
    if n_groups < 2:
        raise ValueError(f"{option}: cannot hold out whole groups for validation: the train set holds a single group")
    held_groups = []
    target = max(1, int(round(fraction * num_samples)))
    sizes = np.bincount(codes, minlength=n_groups)
    for group in rng.permutation(n_groups)[: n_groups - 1]:  # at least one group stays in train
        if sizes[held_groups].sum() >= target:
            break
        held_groups.append(group)
    held = np.isin(codes, held_groups)
    return np.flatnonzero(~held), np.flatnonzero(held)
