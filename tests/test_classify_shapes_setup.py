import csv
import json

import numpy as np

from dinov2.classify import check_setup
from dinov2.data.loaders import make_dataset
from dinov2_tools.shapes import make_sample, make_shapes_dataset


def test_shapes_dataset_is_deterministic_and_labelled_by_construction(tmp_path):
    summary = make_shapes_dataset(tmp_path / "a", count=30, size=24, seed=4, val_fraction=0.3)
    make_shapes_dataset(tmp_path / "b", count=12, size=24, seed=4, val_fraction=0.3)
    rows = list(csv.DictReader(open(tmp_path / "a" / "labels.csv")))
    assert len(rows) == 30 and summary["train"] + summary["val"] == 30
    # Image i depends only on (seed, i): a smaller run reproduces the first images exactly.
    for i in range(12):
        assert (tmp_path / "a" / rows[i]["path"]).read_bytes() == (tmp_path / "b" / rows[i]["path"]).read_bytes()
    for row in rows:
        assert row["presence"] in ("clear", "resembles", "none")
        if row["presence"] == "none":
            assert row["closure"] == "" and row["circularity"] == ""
        else:
            assert row["closure"] in ("closed", "open") and row["circularity"] in ("round", "elongated")
    # Every drawing has ink, and drawings differ.
    image, _ = make_sample(0, seed=4, size=24)
    other, _ = make_sample(1, seed=4, size=24)
    assert np.asarray(image).min() < 128 and not np.array_equal(np.asarray(image), np.asarray(other))


def test_shapes_csv_loads_as_multi_task_dataset_with_missing_labels(tmp_path):
    make_shapes_dataset(tmp_path, count=40, size=16, seed=0)
    dataset = make_dataset(f"CSV:path={tmp_path / 'labels.csv'}")
    assert dataset.tasks == {
        "presence": ["clear", "none", "resembles"],
        "closure": ["closed", "open"],
        "circularity": ["elongated", "round"],
    }
    targets = dataset.get_targets()
    none_rows = targets[:, 0] == dataset.tasks["presence"].index("none")
    assert none_rows.any()
    assert (targets[none_rows, 1:] == -1).all() and (targets[~none_rows, 1:] >= 0).all()


def test_setup_check_reports_device_versions_memory_and_batch_size(capsys):
    report = check_setup.setup_report(device="cpu")
    assert report["device_type"] == "cpu"
    assert report["versions"]["torch"] and report["versions"]["python"]
    assert report["memory"]["available"] > 0
    batch = report["suggested_batch_size"]
    assert 1 <= batch["train"] <= batch["inference"] <= 1024
    assert check_setup.main(["--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    assert check_setup.main(["--device", "cpu"]) == 0
    assert "batch size" in capsys.readouterr().out


def test_batch_size_heuristic_scales_with_memory_and_model():
    small = check_setup.suggest_batch_sizes(8 * 2**30, embed_dim=384, depth=12, tokens=257, num_params=21_000_000)
    big = check_setup.suggest_batch_sizes(8 * 2**30, embed_dim=1024, depth=24, tokens=257, num_params=300_000_000)
    more = check_setup.suggest_batch_sizes(32 * 2**30, embed_dim=384, depth=12, tokens=257, num_params=21_000_000)
    assert big["train"] < small["train"] < more["train"]
    assert all(v & (v - 1) == 0 for v in (small["train"], big["train"], more["inference"]))  # powers of two
    assert check_setup.suggest_batch_sizes(None, 384, 12, 257, 1) == {"train": None, "inference": None}
