"""The linear probes of ``eval/log_regression.py`` and ``eval/linear.py`` on features given as arrays.

A backbone is judged by those two scripts, which extract its features themselves. Features that
come from no backbone (the pixel baselines of :mod:`dinov2_tools.trivial_baselines`) need the same
two probes with the same settings to stand beside it, so this module runs them on arrays:

- ``held_out_probe_top1("log_regression", ...)``:
  :func:`dinov2.eval.log_regression.fit_log_regression`, its C swept on a held-out share of the
  train set, then refit on all of it;
- ``held_out_probe_top1("linear", ...)``: :func:`dinov2.eval.linear.train_linear_grid`, the grid
  of SGD-trained linear heads over the learning rates, the best head chosen on the same share.

Both hold out the share ``split_train_val`` gives for the options' ``val_fraction`` and ``seed``,
the split the scripts make of a train set without groups, and both take their options from the
scripts' own defaults (``configs/eval/log_regression.yaml``, ``configs/eval/linear.yaml``) with
any override on top. Test top-1 is the fraction of test samples whose most probable class is
their label, as in the scripts' reports. (``dinov2_tools.label_efficiency.probe_top1`` differs: with
one label per class nothing can be held out, so it reports the best test top-1 over its C values.)
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dinov2.data.splits import split_train_val
from dinov2.eval.config import SCHEMAS
from dinov2.eval.features import FeatureSet
from dinov2.eval.linear import CachedTrainSource, make_head_grid, train_linear_grid
from dinov2.eval.log_regression import fit_with_options


def probe_options(method: str, **overrides) -> DictConfig:
    """The ``method`` section (``log_regression`` or ``linear``) of the script's defaults, overridden."""
    options = SCHEMAS[method].default_config()[method]
    unknown = sorted(set(overrides) - set(options))
    if unknown:
        raise ValueError(f"unknown {method} option(s) {unknown}; known: {sorted(options)}")
    return OmegaConf.merge(options, {k: v for k, v in overrides.items() if v is not None})


def held_out_probe_top1(
    method: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    options: Optional[DictConfig] = None,
) -> Dict[str, object]:
    """Test top-1 of ``method`` (``log_regression`` or ``linear``) on (N, D) train and test features.

    The options' ``val_fraction`` of the train set is held out (seeded by ``options.seed``) to
    choose C or the head; ``options`` defaults to the script's defaults (:func:`probe_options`).
    """
    fit = {"log_regression": _log_regression, "linear": _linear_grid}.get(method)
    if fit is None:
        raise ValueError(f"unknown probe {method!r}: log_regression or linear")
    options = options or probe_options(method)
    keep, held = split_train_val(len(train_x), options.val_fraction, options.seed)
    return fit(options, (train_x[keep], train_y[keep]), (train_x[held], train_y[held]), (test_x, test_y), num_classes)


def _log_regression(options: DictConfig, train, val, test, num_classes: int) -> Dict[str, object]:
    fit = fit_with_options(options, *train, *val, test[0], num_classes)
    top1 = float(np.mean(np.argmax(fit.test_probs, axis=1) == test[1]))
    return {"top1": top1, "best_c": fit.best_c, "converged": fit.converged, "seconds": fit.seconds}


def _one_block(x: np.ndarray, labels: np.ndarray) -> FeatureSet:
    """A :class:`FeatureSet` in the grid's (N, blocks + 1, D) layout: one block, no patch average.

    The heads read ``features[:, :1]`` (``n_last_blocks=1``, ``avgpool=False``); the second row,
    where a backbone's average patch token would be, is never read.
    """
    x = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    blocks = torch.stack([x, torch.zeros_like(x)], dim=1)
    return FeatureSet(blocks, torch.as_tensor(labels, dtype=torch.long), torch.arange(len(x)))


def _linear_grid(options: DictConfig, train, val, test, num_classes: int) -> Dict[str, object]:
    configs = make_head_grid(options.learning_rates, (1,), (False,))
    result = train_linear_grid(
        CachedTrainSource(_one_block(*train)),
        _one_block(*val),
        num_classes,
        configs,
        train[0].shape[1],
        epochs=options.epochs,
        batch_size=options.train_batch_size,
        seed=options.seed,
        eval_period_iterations=options.eval_period_iterations,
        progress=False,
    )
    probs = result.grid.probabilities(result.best_head, _one_block(*test))
    top1 = float((probs.argmax(dim=1) == torch.as_tensor(test[1])).double().mean())
    best = configs[result.best_head]
    return {"top1": top1, "best_lr": best.lr, "val_top1": result.val_accuracy[result.best_head]}
