"""End to end: a tiny training output directory and ImageFolder data through the eval entry points."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from train_helpers import TINY_BACKBONE

from dinov2.data.loaders import make_dataset
from dinov2.data.transforms import make_classification_eval_transform
from dinov2.eval import knn, linear, log_regression
from dinov2.eval.cli import setup_eval
from dinov2.eval.config import parse_config
from dinov2.eval.features import extract_features
from dinov2.eval.knn import knn_classify
from dinov2.eval.metrics import classification_metrics
from dinov2.eval.setup import build_model_for_eval
from dinov2.hub.weights import WeightsError, save_state_dict
from dinov2.models import build_model_from_cfg
from dinov2.utils.config import load_config, save_config

REPO = Path(__file__).resolve().parents[1]
TINY = [*TINY_BACKBONE, "student.layerscale=1.0"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    run = root / "run"
    cfg = load_config(None, TINY)
    save_config(cfg, run)
    torch.manual_seed(0)
    teacher, _ = build_model_from_cfg(cfg, only_teacher=True)
    save_state_dict(teacher.state_dict(), run / "exports" / "teacher_backbone_latest.pth")
    rng = np.random.default_rng(0)
    counts = {"train": 10, "val": 5, "test": 5}
    for split, n in counts.items():
        for label, colour in enumerate([(200, 40, 40), (40, 40, 200), (40, 200, 40)]):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 15, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    specs = {split: f"ImageFolder:root={root / split}:cache=false" for split in counts}
    return root, run, specs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common_args(run, specs, out):
    return [
        "--pretrained-weights",
        str(run),
        "--train-dataset",
        specs["train"],
        "--val-dataset",
        specs["val"],
        "--test-dataset",
        specs["test"],
        "--output-dir",
        str(out),
        "--num-workers",
        "0",
        "--batch-size",
        "8",
    ]


def test_knn_cli_writes_results(workspace):
    root, run, specs = workspace
    out = root / "knn"
    assert knn.main(common_args(run, specs, out) + ["--nb-knn", "1", "5", "40", "--plot-k", "5"]) == 0
    results = json.loads((out / "results.json").read_text())
    run0 = results["runs"][0]
    assert run0["bank_size"] == 30 and run0["ks"] == [1, 5]
    assert run0["skipped_ks"] == [40]  # larger than the bank
    test = run0["splits"]["test"]["k=5"]
    assert test["num_samples"] == 15 and test["num_classes"] == 3
    # the same computation through the library
    backbone = build_model_for_eval(None, run)
    transform = make_classification_eval_transform(crop_size=backbone.image_size, mean=backbone.mean, std=backbone.std)
    bank = extract_features(backbone.model, make_dataset(specs["train"], transform), num_workers=0)
    queries = extract_features(backbone.model, make_dataset(specs["test"], transform), num_workers=0)
    scores = knn_classify(queries.features, bank.features, bank.labels, ks=[5], num_classes=3)[5]
    expected = classification_metrics(queries.labels.numpy(), scores.numpy())
    assert test["confusion_matrix"] == expected["confusion_matrix"]
    assert test["top1"] >= 0.9  # three colours: easy for a random ViT with LayerScale 1
    assert results["class_names"] == ["class_0", "class_1", "class_2"]
    assert (out / "summary.txt").read_text().startswith("k-NN evaluation")
    assert (out / "confusion_matrix_test_k5.png").stat().st_size > 0
    saved = OmegaConf.load(out / "eval_config.yaml")  # the merged options, beside the results
    assert list(saved.knn.nb_knn) == [1, 5, 40] and saved.knn.plot_k == 5 and saved.data.batch_size == 8
    # few-shot: 2 per class, two draws
    few = root / "knn_few"
    knn.main(common_args(run, specs, few) + ["--nb-knn", "1", "3", "--n-per-class", "2", "--few-shot-seeds", "0", "1"])
    results = json.loads((few / "results.json").read_text())
    assert [r["bank_size"] for r in results["runs"]] == [6, 6]
    assert set(results["few_shot_summary"]["test"]) == {"k=1", "k=3"}


def test_knn_cli_two_ranks_equals_one(workspace):
    root, run, specs = workspace
    out1, out2 = root / "knn_1", root / "knn_2"
    args = ["--nb-knn", "1", "3", "10", "--query-chunk-size", "4", "--bank-chunk-size", "7"]
    knn.main(common_args(run, specs, out1) + args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(REPO / "eval" / "knn.py"),
            "--device",
            "cpu",
            *common_args(run, specs, out2),
            *args,
        ],
        check=True,
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=180,
    )
    one, two = (json.loads((o / "results.json").read_text()) for o in (out1, out2))
    assert two["settings"]["world_size"] == 2
    for split in ("val", "test"):
        for k in ("k=1", "k=3", "k=10"):
            a, b = one["runs"][0]["splits"][split][k], two["runs"][0]["splits"][split][k]
            assert a["confusion_matrix"] == b["confusion_matrix"]
            assert a["top1"] == b["top1"]


def test_linear_and_log_regression_cli(workspace):
    root, run, specs = workspace
    out = root / "linear"
    linear.main(
        common_args(run, specs, out)
        + ["--learning-rates", "0.01", "0.1", "--n-last-blocks", "1", "2", "--epochs", "2", "--train-batch-size", "8"]
    )
    results = json.loads((out / "results.json").read_text())
    assert len(results["heads"]) == 2 * 2 * 2
    assert results["best_head"]["val_top1"] == max(h["val_top1"] for h in results["heads"])
    assert results["test"]["num_samples"] == 15 and results["test"]["top1"] >= 0.9
    assert (out / "best_linear_head.pth").is_file()
    # on-the-fly features with the upstream augmentation (random-resized crop + flip)
    out = root / "linear_online"
    linear.main(
        common_args(run, specs, out)
        + [
            "--learning-rates",
            "0.1",
            "--n-last-blocks",
            "1",
            "--avgpool",
            "no",
            "--epochs",
            "1",
            "--train-batch-size",
            "8",
            "--feature-mode",
            "online",
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["augment"] is True and len(results["heads"]) == 1
    with pytest.raises(SystemExit, match="--augment needs --feature-mode online"):
        linear.main(common_args(run, specs, out) + ["--augment"])
    out = root / "logreg"
    log_regression.main(common_args(run, specs, out) + ["--c-values", "0.1", "1", "--features", "cls_avgpool"])
    results = json.loads((out / "results.json").read_text())
    assert results["best_c"] in (0.1, 1.0) and results["test"]["num_samples"] == 15
    assert results["test"]["top1"] >= 0.9


def test_backbone_loading_sources_and_errors(workspace, tmp_path):
    root, run, specs = workspace
    from_dir = build_model_for_eval(None, run)
    assert from_dir.image_size == 16 and from_dir.config_path == run / "config.yaml"
    # a checkpoint dict nesting the backbone under "teacher" with a "backbone." prefix
    nested = {"teacher": {f"backbone.{k}": v for k, v in from_dir.model.state_dict().items()}}
    torch.save(nested, tmp_path / "ckpt.pth")
    loaded = build_model_for_eval(run / "config.yaml", tmp_path / "ckpt.pth", image_size=24)
    assert loaded.image_size == 24
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), from_dir.model.state_dict().values())
    )
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="consolidate_checkpoint.py"):
        build_model_for_eval(run / "config.yaml", empty)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build_model_for_eval(None, run, image_size=18)
    with pytest.raises(ValueError, match="--arch"):
        build_model_for_eval(None, tmp_path / "ckpt.pth")
    with pytest.raises(WeightsError, match="missing keys"):
        build_model_for_eval(None, tmp_path / "ckpt.pth", arch="dinov2_vits14")


def test_group_metrics_through_cli_on_industrial_data(workspace, tmp_path):
    from dinov2_tools.synthetic_industrial import make_industrial_dataset

    root, run, _ = workspace
    make_industrial_dataset(str(tmp_path / "parts"), groups=15, images_per_group=2, size=24)
    specs = {split: f"Industrial:root={tmp_path / 'parts'}:split={split}" for split in ("train", "val", "test")}
    out = tmp_path / "knn"
    knn.main(common_args(run, specs, out) + ["--nb-knn", "3", "--positive-class", "defect"])
    results = json.loads((out / "results.json").read_text())
    test = results["runs"][0]["splits"]["test"]["k=3"]
    assert results["class_names"] == ["good", "defect"]
    assert test["binary"]["positive_class"] == 1
    for how in ("mean", "max"):
        group = test["groups"][how]
        assert group["num_samples"] * 2 == test["num_samples"]  # two photos per part
        assert "binary" in group and set(group["binary"]["operating_points"]) >= {"default"}
    val = results["runs"][0]["splits"]["val"]["k=3"]
    assert val["binary"]["youden_threshold"] is not None  # every split holds both classes
    assert test["binary"]["operating_points"]["val_youden"]["threshold"] == val["binary"]["youden_threshold"]
    assert (
        test["groups"]["max"]["binary"]["operating_points"]["val_youden"]["threshold"]
        == (val["groups"]["max"]["binary"]["youden_threshold"])
    )


def test_resize_size_option_keeps_whole_small_images(workspace):
    root, run, specs = workspace

    def options(extra=()):
        return parse_config("knn", knn.get_args_parser(), common_args(run, specs, root / "resize") + list(extra))

    ctx = setup_eval(options(["--resize-size", "16"]), "knn")
    image = Image.fromarray(np.arange(20 * 20 * 3, dtype=np.uint8).reshape(20, 20, 3))
    whole = ctx.transform()(image)  # resized to 16, nothing cropped away
    expected = make_classification_eval_transform(16, 16, mean=ctx.backbone.mean, std=ctx.backbone.std)(image)
    torch.testing.assert_close(whole, expected)
    default = setup_eval(options(), "knn")
    assert not torch.allclose(default.transform()(image), whole)  # 18 px then a centre crop of 16
    too_small = options(["--resize-size", "8"])
    with pytest.raises(SystemExit, match="smaller than the 16 px"):
        setup_eval(too_small, "knn")


@pytest.mark.parametrize("entry", [knn, linear, log_regression], ids=["knn", "linear", "log_regression"])
def test_unusable_output_dir_fails_before_the_backbone_is_loaded(workspace, tmp_path, monkeypatch, entry):
    root, run, specs = workspace

    def must_not_load(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the output directory was checked")

    monkeypatch.setattr("dinov2.eval.cli.build_model_for_eval", must_not_load)
    a_file = tmp_path / "results_here"
    a_file.write_text("not a directory\n")
    with pytest.raises(SystemExit, match=rf"--output-dir: output directory {a_file} is a file"):
        entry.main(common_args(run, specs, a_file))
    below_a_file = a_file / "knn"
    with pytest.raises(SystemExit, match=rf"cannot create output directory {below_a_file}: {a_file} is a file"):
        entry.main(common_args(run, specs, below_a_file))
    if os.geteuid() != 0:  # root writes into read-only directories
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o500)
        with pytest.raises(SystemExit, match=rf"output directory {read_only} is not writable"):
            entry.main(common_args(run, specs, read_only))
    assert a_file.read_text() == "not a directory\n"  # left as it was


def test_prepare_output_dir_creates_it_and_leaves_nothing_behind(tmp_path):
    from dinov2.eval.results import prepare_output_dir

    out = prepare_output_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []
    assert prepare_output_dir(out) == out  # an existing directory is fine
