"""Logistic regression (scikit-learn, L-BFGS) on frozen features.

Protocol: features are optionally L2-normalised, then standardised (mean 0, variance 1 per
dimension, statistics from the data the model is fitted on). The inverse regularisation strength
C is swept over a log grid, fitting on train and scoring top-1 on val; the best C (the smallest
one among equal scores) is refitted on train + val and reported on test. Without a validation
set a seeded share of train is held out for the sweep. The val report (used for the binary
``val_youden`` threshold) comes from the train-only model at the chosen C.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from dinov2.data.splits import split_train_val

from . import _dist
from .features import (
    BlockFeatures,
    FeatureSet,
    as_numpy,
    class_names_of,
    cls_features,
    extract_features,
    gather_feature_set,
    group_ids_for,
)
from .linear import linear_input
from .metrics import evaluation_report, summary_lines, youden_thresholds_of
from .plots import plot_confusion_matrix
from .results import track_results, write_results

logger = logging.getLogger("dinov2.eval")

DEFAULT_C_VALUES = tuple(float(c) for c in 10.0 ** np.arange(-4, 5))  # 1e-4 ... 1e4
DEFAULT_MAX_ITER = 1000


def make_classifier(
    c: float, max_iter: int = DEFAULT_MAX_ITER, standardize: bool = True, l2_normalize: bool = False, seed: int = 0
):
    """The scikit-learn pipeline used for every fit."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    steps = []
    if l2_normalize:
        steps.append(Normalizer(norm="l2"))
    if standardize:
        steps.append(StandardScaler())
    steps.append(LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed))
    return make_pipeline(*steps)


def class_probabilities(classifier, x: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities, zero for classes absent from the fitting data."""
    probs = np.zeros((x.shape[0], num_classes))
    probs[:, classifier.classes_] = classifier.predict_proba(x)
    return probs


@dataclass
class LogRegResult:
    best_c: float
    sweep: List[dict]  # {"C", "val_top1", "converged"}
    val_probs: np.ndarray  # from the train-only model at best C
    test_probs: Optional[np.ndarray]  # from the train+val model
    converged: bool
    seconds: float
    classifier: object = field(repr=False, default=None)


def _fit(classifier, x, y) -> bool:
    """Fit; returns False when L-BFGS stopped at max_iter (scikit-learn's ConvergenceWarning)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        classifier.fit(x, y)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def fit_log_regression(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    test_x: Optional[np.ndarray] = None,
    num_classes: Optional[int] = None,
    c_values: Sequence[float] = DEFAULT_C_VALUES,
    max_iter: int = DEFAULT_MAX_ITER,
    standardize: bool = True,
    l2_normalize: bool = False,
    seed: int = 0,
) -> LogRegResult:
    """Sweep C on val, refit on train + val, predict test (see the module docstring)."""
    if not c_values:
        raise ValueError("c_values is empty")
    c_values = sorted(float(c) for c in c_values)
    num_classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
    start = time.perf_counter()
    sweep, best, best_probs = [], None, None
    for c in c_values:
        classifier = make_classifier(c, max_iter, standardize, l2_normalize, seed)
        converged = _fit(classifier, train_x, train_y)
        probs = class_probabilities(classifier, val_x, num_classes)
        accuracy = float(np.mean(np.argmax(probs, axis=1) == val_y))
        sweep.append({"C": c, "val_top1": accuracy, "converged": converged})
        logger.info("C=%g: val top-1 %.2f%%%s", c, 100 * accuracy, "" if converged else " (did not converge)")
        if best is None or accuracy > best["val_top1"]:
            best, best_probs = sweep[-1], probs
    final = make_classifier(best["C"], max_iter, standardize, l2_normalize, seed)
    converged = _fit(final, np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]))
    test_probs = class_probabilities(final, test_x, num_classes) if test_x is not None else None
    return LogRegResult(
        best["C"], sweep, best_probs, test_probs, converged and best["converged"], time.perf_counter() - start, final
    )


def fit_with_options(options: DictConfig, train_x, train_y, val_x, val_y, test_x, num_classes) -> LogRegResult:
    """:func:`fit_log_regression` with the settings of a ``log_regression`` config section."""
    return fit_log_regression(
        train_x,
        train_y,
        val_x,
        val_y,
        test_x,
        num_classes,
        options.c_values,
        options.max_iter,
        options.standardize,
        options.l2_normalize,
        options.seed,
    )


# ----------------------------------------------------------------------------------- CLI
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Flags and ``key=value`` options of :data:`dinov2.eval.config.FLAGS` ``["log_regression"]``."""
    from .config import build_parser

    return build_parser(
        "log_regression",
        "dinov2 logistic regression",
        description="logistic regression on frozen features",
        add_help=add_help,
    )


def _features(model, dataset, feature_kind: str, desc: str, **common) -> FeatureSet:
    if feature_kind == "cls":
        local = extract_features(model, dataset, feature_fn=cls_features, desc=desc, **common)
    else:
        local = extract_features(model, dataset, feature_fn=BlockFeatures(1), desc=desc, **common)
        local = FeatureSet(linear_input(local.features, 1, True), local.labels, local.indices)
    return gather_feature_set(local).labelled()


def run_log_regression(cfg: DictConfig) -> Optional[dict]:
    """The evaluation of a loaded config (:func:`dinov2.eval.config.parse_config`)."""
    from .cli import check_same_classes, load_dataset, resolve_positive_class, setup_eval

    ctx = setup_eval(cfg, "log_regression")
    data, options = cfg.data, cfg.log_regression
    transform = ctx.transform()
    model = ctx.backbone.model
    common = ctx.extraction_options(data)
    train_dataset = load_dataset(data.train, transform, "train")
    class_names = class_names_of(train_dataset, data.task)
    train = _features(model, train_dataset, options.features, "train features", **common)
    if data.val:
        val_dataset = load_dataset(data.val, transform, "val")
        check_same_classes(class_names, class_names_of(val_dataset, data.task), "val")
        val = _features(model, val_dataset, options.features, "val features", **common)
    else:
        groups = group_ids_for(train_dataset, train.indices)
        keep, held = split_train_val(len(train), options.val_fraction, options.seed, groups)
        val_dataset, val = train_dataset, train.select(torch.as_tensor(held))
        train = train.select(torch.as_tensor(keep))
    test_dataset, test = None, None
    if data.test:
        test_dataset = load_dataset(data.test, transform, "test")
        check_same_classes(class_names, class_names_of(test_dataset, data.task), "test")
        test = _features(model, test_dataset, options.features, "test features", **common)
    results = None
    if _dist.is_main_process():  # scikit-learn runs in one process; the others only extracted
        num_classes = (
            len(class_names)
            if class_names
            else int(max(int(f.labels.max()) for f in (train, val, test) if f is not None)) + 1
        )
        positive = resolve_positive_class(data.positive_class, class_names)
        fit = fit_with_options(
            options,
            as_numpy(train.features),
            as_numpy(train.labels),
            as_numpy(val.features),
            as_numpy(val.labels),
            as_numpy(test.features) if test is not None else None,
            num_classes,
        )
        val_report = evaluation_report(
            as_numpy(val.labels), fit.val_probs, class_names, group_ids_for(val_dataset, val.indices), positive
        )
        results = {
            "method": "log_regression",
            "backbone": {
                "description": ctx.backbone.description,
                "weights": str(ctx.backbone.weights_path),
                "image_size": ctx.backbone.image_size,
            },
            "datasets": {
                "train": data.train,
                "val": data.val or f"{options.val_fraction:g} of train",
                "test": data.test,
                "task": data.task,
            },
            "settings": {
                "features": options.features,
                "standardize": options.standardize,
                "l2_normalize": options.l2_normalize,
                "max_iter": options.max_iter,
                "c_values": sorted(options.c_values),
                "seconds": fit.seconds,
                "train_samples": len(train),
                "val_samples": len(val),
            },
            "class_names": class_names,
            "best_c": fit.best_c,
            "converged": fit.converged,
            "sweep": fit.sweep,
            "val": val_report,
        }
        if test is not None:
            results["test"] = evaluation_report(
                as_numpy(test.labels),
                fit.test_probs,
                class_names,
                group_ids_for(test_dataset, test.indices),
                positive,
                youden_thresholds_of(val_report),
            )
        _write(ctx.output_dir, results, class_names)
        track_results(ctx.output_dir, cfg, results, "log_regression")  # logging.tensorboard / logging.wandb
    _dist.barrier()
    return results


def _write(output_dir, results: dict, class_names) -> None:
    lines = [
        f"logistic regression on {results['settings']['features']} features of {results['backbone']['description']} ({results['backbone']['weights']})",
        f"best C = {results['best_c']:g} (val top-1 {100 * max(s['val_top1'] for s in results['sweep']):.2f}%), "
        f"refitted on train + val{'' if results['converged'] else ' -- L-BFGS hit --max-iter, consider raising it'}",
    ]
    for role in ("val", "test"):
        if role in results:
            lines.extend(summary_lines(role, results[role]))
    path = write_results(output_dir, results, lines)
    role = "test" if "test" in results else "val"
    plot_confusion_matrix(
        results[role]["confusion_matrix"],
        output_dir / f"confusion_matrix_{role}.png",
        class_names,
        title=f"logistic regression on {role}",
    )
    print("\n".join(lines))
    print(f"results written to {path}")


def main(argv: Optional[Iterable[str]] = None) -> int:
    from .config import parse_config

    cfg = parse_config("log_regression", get_args_parser(), argv)
    return _dist.run_then_destroy(run_log_regression, cfg)


if __name__ == "__main__":
    raise SystemExit(main())
