"""Classification metrics on per-image class scores, image-level and group-level.

Inputs everywhere are ``labels`` (N ints in ``[0, C)``) and ``scores`` (N x C, larger = more
likely; probabilities for the binary operating points). Conventions:

- Class ranking uses (-score, class index): on equal scores the lower class index wins, so
  results never depend on sort implementation details.
- ``balanced_accuracy`` is the mean per-class accuracy (recall) over the classes that occur in
  ``labels``; classes without samples are listed with ``accuracy: null``.
- Binary tasks (C == 2) also get precision, recall, F1 and ROC-AUC of the positive class
  (class index 1 unless told otherwise). A sample is called positive when its positive-class
  score is >= the threshold. Two operating points are reported: ``default`` (0.5) and, on the
  set where it is computed, ``youden`` (the ROC point maximising TPR - FPR on that same set, an
  optimistic in-sample choice). Callers that have a validation set pass the validation set's
  Youden threshold for the test set (``val_youden``), the honest choice.
- Groups (``group_id``: one physical part photographed several times): image scores are
  aggregated per group by their mean or their per-class max, and every metric above is reported
  for the groups. A group's label is the label its images share; in a binary task a group with
  mixed labels counts as positive (one defective view makes the part defective); in a
  multi-class task mixed labels are an error.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

GROUP_AGGREGATIONS = ("mean", "max")
DEFAULT_THRESHOLD = 0.5


class MetricsError(ValueError):
    pass


def _check(labels: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise MetricsError(f"scores must be (N, num_classes), got shape {scores.shape}")
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise MetricsError(f"labels must be ({scores.shape[0]},), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise MetricsError(f"labels must lie in [0, {scores.shape[1]}), got range [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64), scores


def rank_classes(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, k) class indices by decreasing score, lower class index first on ties."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :k]


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predictions, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def roc_auc(labels01: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Area under the ROC curve; None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels01)) < 2:
        return None
    return float(roc_auc_score(labels01, scores))


def youden_threshold(labels01: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Threshold maximising TPR - FPR (highest such threshold on ties); None with one class."""
    from sklearn.metrics import roc_curve

    if len(np.unique(labels01)) < 2:
        return None
    fpr, tpr, thresholds = roc_curve(labels01, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # sklearn puts +inf first ("nothing positive")
    j = np.where(finite, tpr - fpr, -np.inf)
    return float(thresholds[int(np.argmax(j))])


def operating_point(labels01: np.ndarray, scores: np.ndarray, threshold: float) -> Dict:
    predicted = scores >= threshold
    actual = labels01.astype(bool)
    tp = int(np.sum(predicted & actual))
    fp = int(np.sum(predicted & ~actual))
    fn = int(np.sum(~predicted & actual))
    tn = int(np.sum(~predicted & ~actual))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    total = tp + fp + fn + tn
    return {
        "threshold": float(threshold),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": (tp + tn) / total if total else None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def binary_metrics(
    labels: np.ndarray, scores: np.ndarray, positive_class: int = 1, thresholds: Optional[Mapping[str, float]] = None
) -> Dict:
    """ROC-AUC and operating points of the positive class; ``thresholds`` adds named points."""
    labels01 = (np.asarray(labels) == positive_class).astype(np.int64)
    pos_scores = np.asarray(scores, dtype=np.float64)[:, positive_class]
    youden = youden_threshold(labels01, pos_scores)
    points = {"default": operating_point(labels01, pos_scores, DEFAULT_THRESHOLD)}
    if youden is not None:
        points["youden"] = operating_point(labels01, pos_scores, youden)
    for name, value in (thresholds or {}).items():
        if value is not None:
            points[name] = operating_point(labels01, pos_scores, value)
    return {
        "positive_class": int(positive_class),
        "roc_auc": roc_auc(labels01, pos_scores),
        "youden_threshold": youden,
        "operating_points": points,
    }


def classification_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Optional[Sequence[str]] = None,
    positive_class: int = 1,
    thresholds: Optional[Mapping[str, float]] = None,
) -> Dict:
    """Top-1/top-5, balanced accuracy, per-class accuracy, confusion matrix (+ binary block)."""
    labels, scores = _check(labels, scores)
    num_samples, num_classes = scores.shape
    if class_names is not None and len(class_names) != num_classes:
        raise MetricsError(f"{len(class_names)} class names for {num_classes} score columns")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    ranked = rank_classes(scores, min(5, num_classes))
    top1 = ranked[:, 0] if num_samples else np.zeros(0, dtype=np.int64)
    cm = confusion_matrix(labels, top1, num_classes)
    support = cm.sum(axis=1)
    correct = np.diag(cm)
    per_class = [
        {
            "class": c,
            "name": names[c],
            "support": int(support[c]),
            "accuracy": float(correct[c] / support[c]) if support[c] else None,
        }
        for c in range(num_classes)
    ]
    present = support > 0
    result = {
        "num_samples": int(num_samples),
        "num_classes": int(num_classes),
        "top1": float(np.mean(top1 == labels)) if num_samples else None,
        "top5": (
            float(np.mean(np.any(ranked == labels[:, None], axis=1))) if num_samples and num_classes >= 5 else None
        ),
        "balanced_accuracy": float(np.mean(correct[present] / support[present])) if present.any() else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }
    if num_classes == 2:
        if not 0 <= positive_class < 2:
            raise MetricsError(f"positive_class must be 0 or 1 for a binary task, got {positive_class}")
        result["binary"] = binary_metrics(labels, scores, positive_class, thresholds)
    return result


def aggregate_by_group(
    labels: np.ndarray, scores: np.ndarray, group_ids: Sequence, how: str, positive_class: int = 1
) -> Tuple[np.ndarray, np.ndarray, list]:
    """(group labels, group scores, group ids) with scores averaged (``mean``) or per-class maxed."""
    labels, scores = _check(labels, scores)
    if how not in GROUP_AGGREGATIONS:
        raise MetricsError(f"group aggregation must be one of {GROUP_AGGREGATIONS}, got {how!r}")
    if len(group_ids) != labels.shape[0]:
        raise MetricsError(f"{len(group_ids)} group ids for {labels.shape[0]} samples")
    keys = np.asarray([str(g) for g in group_ids])
    unique, inverse = np.unique(keys, return_inverse=True)
    num_groups, num_classes = len(unique), scores.shape[1]
    if how == "mean":
        sums = np.zeros((num_groups, num_classes))
        np.add.at(sums, inverse, scores)
        group_scores = sums / np.bincount(inverse, minlength=num_groups)[:, None]
    else:
        group_scores = np.full((num_groups, num_classes), -np.inf)
        np.maximum.at(group_scores, inverse, scores)
    group_labels = np.empty(num_groups, dtype=np.int64)
    for g in range(num_groups):
        members = np.unique(labels[inverse == g])
        if len(members) == 1:
            group_labels[g] = members[0]
        elif num_classes == 2:
            group_labels[g] = positive_class
        else:
            raise MetricsError(f"group {unique[g]!r} mixes labels {members.tolist()} in a multi-class task")
    return group_labels, group_scores, unique.tolist()


def evaluation_report(
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Optional[Sequence[str]] = None,
    group_ids: Optional[Sequence] = None,
    positive_class: int = 1,
    val_thresholds: Optional[Mapping[str, float]] = None,
) -> Dict:
    """Image-level metrics plus, with ``group_ids``, the same per group for each aggregation.

    ``val_thresholds`` ({"image": t, "group_mean": t, "group_max": t}, from
    :func:`youden_thresholds_of`) adds a ``val_youden`` operating point to binary reports.
    """
    val_thresholds = val_thresholds or {}

    def extra(level):
        value = val_thresholds.get(level)
        return {"val_youden": value} if value is not None else None

    report = classification_metrics(labels, scores, class_names, positive_class, extra("image"))
    if group_ids is not None:
        report["groups"] = {}
        for how in GROUP_AGGREGATIONS:
            g_labels, g_scores, _ = aggregate_by_group(labels, scores, group_ids, how, positive_class)
            report["groups"][how] = classification_metrics(
                g_labels, g_scores, class_names, positive_class, extra(f"group_{how}")
            )
    return report


def youden_thresholds_of(report: Mapping) -> Dict[str, float]:
    """The Youden thresholds a (validation) report computed, keyed as ``evaluation_report`` wants."""
    found = {}
    if "binary" in report and report["binary"]["youden_threshold"] is not None:
        found["image"] = report["binary"]["youden_threshold"]
    for how, sub in report.get("groups", {}).items():
        if "binary" in sub and sub["binary"]["youden_threshold"] is not None:
            found[f"group_{how}"] = sub["binary"]["youden_threshold"]
    return found


def summary_lines(title: str, report: Mapping) -> list:
    """A few human-readable lines for ``summary.txt``."""

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    lines = [
        f"{title}: top-1 {pct(report['top1'])}, top-5 {pct(report['top5'])}, "
        f"balanced {pct(report['balanced_accuracy'])} ({report['num_samples']} samples, {report['num_classes']} classes)"
    ]
    binary = report.get("binary")
    if binary:
        auc = binary["roc_auc"]
        lines.append(f"  ROC-AUC {'n/a' if auc is None else f'{auc:.4f}'}")
        for name, point in binary["operating_points"].items():
            lines.append(
                f"  @{name} threshold {point['threshold']:.4f}: precision {pct(point['precision'])}, "
                f"recall {pct(point['recall'])}, F1 {pct(point['f1'])}"
            )
    for how, sub in report.get("groups", {}).items():
        lines.extend("  " + line for line in summary_lines(f"groups ({how} of image scores)", sub))
    return lines
