import json

import numpy as np
import pytest

from dinov2.eval.metrics import (
    MetricsError,
    aggregate_by_group,
    classification_metrics,
    evaluation_report,
    rank_classes,
    youden_thresholds_of,
)
from dinov2.eval.plots import plot_confusion_matrix
from dinov2.eval.results import write_results

# Four parts photographed 1-2 times each; P(positive) per image.
GROUPS = ["A", "A", "B", "B", "C", "C", "D"]
LABELS = np.array([1, 1, 0, 0, 0, 1, 0])  # part C: one view defective -> the part is defective
P_POS = np.array([0.2, 0.9, 0.1, 0.3, 0.65, 0.4, 0.7])
SCORES = np.stack([1 - P_POS, P_POS], axis=1)


def test_group_aggregation_mean_and_max():
    labels, scores, ids = aggregate_by_group(LABELS, SCORES, GROUPS, "mean")
    assert ids == ["A", "B", "C", "D"]
    assert labels.tolist() == [1, 0, 1, 0]
    np.testing.assert_allclose(scores[:, 1], [0.55, 0.2, 0.525, 0.7])
    _, scores, _ = aggregate_by_group(LABELS, SCORES, GROUPS, "max")
    np.testing.assert_allclose(scores, [[0.8, 0.9], [0.9, 0.3], [0.6, 0.65], [0.3, 0.7]])


def test_group_metrics_known_answers():
    report = evaluation_report(LABELS, SCORES, ["good", "defect"], group_ids=GROUPS)
    mean, maxed = report["groups"]["mean"], report["groups"]["max"]
    assert mean["num_samples"] == 4
    assert mean["top1"] == pytest.approx(0.75)
    assert mean["balanced_accuracy"] == pytest.approx(0.75)
    assert mean["confusion_matrix"] == [[1, 1], [0, 2]]
    assert mean["binary"]["roc_auc"] == pytest.approx(0.5)
    assert maxed["binary"]["roc_auc"] == pytest.approx(0.75)
    point = mean["binary"]["operating_points"]["default"]
    assert (point["tp"], point["fp"], point["tn"], point["fn"]) == (2, 1, 1, 0)
    assert point["precision"] == pytest.approx(2 / 3) and point["recall"] == 1.0 and point["f1"] == pytest.approx(0.8)
    assert mean["binary"]["youden_threshold"] == pytest.approx(0.525)
    assert maxed["top1"] == pytest.approx(0.75)


def test_image_metrics_and_val_threshold_transfer():
    report = evaluation_report(LABELS, SCORES, ["good", "defect"], group_ids=GROUPS)
    # image level: predictions 0,1,0,0,1,0,1 against labels 1,1,0,0,0,1,0
    assert report["top1"] == pytest.approx(3 / 7)
    assert report["top5"] is None
    assert report["per_class"][1] == {"class": 1, "name": "defect", "support": 3, "accuracy": pytest.approx(1 / 3)}
    assert report["balanced_accuracy"] == pytest.approx((2 / 4 + 1 / 3) / 2)
    thresholds = youden_thresholds_of(report)
    assert set(thresholds) == {"image", "group_mean", "group_max"}
    test = evaluation_report(LABELS, SCORES, None, GROUPS, val_thresholds={"group_mean": 0.525})
    assert test["groups"]["mean"]["binary"]["operating_points"]["val_youden"]["threshold"] == 0.525
    assert "val_youden" not in test["binary"]["operating_points"]
    json.dumps(test)  # the report is plain JSON


def test_multiclass_top5_ties_and_errors():
    scores = np.array([[0.1, 0.3, 0.3, 0.1, 0.1, 0.1], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]])
    assert rank_classes(scores, 2).tolist() == [[1, 2], [0, 1]]  # tie -> lower class index
    report = classification_metrics(np.array([2, 5]), scores)
    assert report["top1"] == 0.0 and report["top5"] == 0.5
    assert "binary" not in report
    assert report["per_class"][3]["accuracy"] is None  # no samples of class 3
    assert report["balanced_accuracy"] == 0.0
    with pytest.raises(MetricsError, match="mixes labels"):
        aggregate_by_group(np.array([0, 2]), scores, ["g", "g"], "mean")
    with pytest.raises(MetricsError, match=r"labels must lie in \[0, 6\)"):
        classification_metrics(np.array([0, 6]), scores)


def test_confusion_png_and_results_files(tmp_path):
    png = plot_confusion_matrix([[5, 1], [2, 7]], tmp_path / "cm.png", ["good", "defect"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    big = plot_confusion_matrix(np.eye(120, dtype=int), tmp_path / "big.png")
    assert big.stat().st_size > 0
    write_results(tmp_path, {"top1": np.float32(0.5), "auc": float("nan")}, ["line"])
    assert json.loads((tmp_path / "results.json").read_text()) == {"top1": 0.5, "auc": None}
    assert (tmp_path / "summary.txt").read_text() == "line\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
