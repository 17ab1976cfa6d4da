"""Zero-shot protocol of the sketch users: k-NN on Quick, Draw! categories held out of pretraining."""

import json

import numpy as np
import pytest
import torch
from train_helpers import TINY_BACKBONE

from dinov2.data.loaders import make_dataset
from dinov2.eval import knn
from dinov2.hub.weights import save_state_dict
from dinov2.models import build_model_from_cfg
from dinov2.utils.config import load_config, save_config

TINY = [*TINY_BACKBONE, "student.layerscale=1.0"]
CATEGORIES = ["apple", "bird", "car", "dog"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    run = root / "run"
    cfg = load_config(None, TINY)
    save_config(cfg, run)
    torch.manual_seed(0)
    teacher, _ = build_model_from_cfg(cfg, only_teacher=True)
    save_state_dict(teacher.state_dict(), run / "exports" / "teacher_backbone_latest.pth")
    data = root / "qd"
    data.mkdir()
    rng = np.random.default_rng(0)
    for c, name in enumerate(CATEGORIES):
        ink = np.full((10, 28, 28), 80 * c, dtype=np.uint8)  # one grey level per category
        ink[rng.random(ink.shape) < 0.05] = 40  # a little noise so drawings differ
        np.save(data / f"{name}.npy", ink.reshape(10, 784))
    return root, run, data


def test_knn_on_held_out_categories(setup):
    root, run, data = setup
    base = f"QuickDraw:root={data}:train_per_class=8:holdout=bird,dog"
    out = root / "knn_holdout"
    knn.main(
        [
            "--pretrained-weights",
            str(run),
            "--train-dataset",
            f"{base}:split=holdout_train",
            "--test-dataset",
            f"{base}:split=holdout_test",
            "--output-dir",
            str(out),
            "--num-workers",
            "0",
            "--nb-knn",
            "1",
            "3",
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["class_names"] == ["bird", "dog"]  # only the held-out categories, labelled 0..1
    run0 = results["runs"][0]
    assert run0["bank_size"] == 16  # 8 train drawings of each held-out category
    test = run0["splits"]["test"]["k=3"]
    assert test["num_samples"] == 4 and test["num_classes"] == 2
    assert test["top1"] == 1.0  # one grey level per category: trivially separable
    # pretraining categories never enter the held-out bank
    assert make_dataset(f"{base}:split=train").classes == ["apple", "car"]


def test_held_out_queries_against_a_pretraining_bank_are_refused(setup):
    root, run, data = setup
    base = f"QuickDraw:root={data}:train_per_class=8:holdout=bird,dog"
    with pytest.raises(SystemExit, match="labels would not match"):
        knn.main(
            [
                "--pretrained-weights",
                str(run),
                "--train-dataset",
                f"{base}:split=train",
                "--test-dataset",
                f"{base}:split=holdout_test",
                "--output-dir",
                str(root / "bad"),
                "--num-workers",
                "0",
                "--nb-knn",
                "1",
            ]
        )
