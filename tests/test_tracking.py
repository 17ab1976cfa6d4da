"""Experiment tracking: TensorBoard event files and W&B offline runs written by real runs, read back
with the packages' own readers (TensorBoard's EventAccumulator; W&B's record protobufs)."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import make_image_folder, make_training_output, tiny_overrides

from dinov2.train.train import main as train_main
from dinov2.utils.tracking import WANDB_ID_FILE, Tracker, flatten_scalars, tracking_options

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TRAINING_TAGS = (
    "total_loss",
    "dino_loss",
    "ibot_loss",
    "koleo_loss",
    "lr",
    "wd",
    "momentum",
    "teacher_temp",
    "images_per_sec",
    "skipped_images",
    "nonfinite_steps",
    "knn_top1",
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), per_class=6)


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B without a network or a home directory: offline mode, its own config and cache dirs."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def accumulator(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def wandb_records(run_file: Path):
    """The protobuf records of a ``run-<id>.wandb`` file (W&B's LevelDB-style log: a 7-byte file
    header, then 32 KiB blocks of chunks with a 7-byte header each: CRC32, length, kind)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, run_file
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # too short for a chunk header: padding up to the next block
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_offline_runs(output_dir: Path):
    """[(run record, [history rows as {key: value}])] of each offline run directory, oldest first."""
    runs = []
    for folder in sorted((output_dir / "wandb").glob("offline-run-*")):
        (run_file,) = folder.glob("run-*.wandb")
        run, history = None, []
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                history.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
        runs.append((run, history))
    return runs


def test_flatten_scalars_keeps_numbers_under_slash_names():
    record = {"epoch": 2, "stage": "probe", "train": {"loss": 0.5, "ok": True}, "val": {"tasks": {"a": {"top1": 1.0}}}}
    record["classes"] = ["a", "b"]
    assert flatten_scalars(record) == {"epoch": 2.0, "train/loss": 0.5, "train/ok": 1.0, "val/tasks/a/top1": 1.0}


def test_options_default_off_and_bad_mode_is_an_error():
    assert not tracking_options(None).enabled
    assert tracking_options({"tensorboard": True}).enabled
    assert tracking_options({"wandb": {"project": "p", "tags": ["x"]}}).wandb_tags == ["x"]
    with pytest.raises(ValueError, match="logging.wandb.mode"):
        tracking_options({"wandb": {"project": "p", "mode": "sometimes"}})


def test_training_logs_to_tensorboard_and_wandb_and_a_rewound_resume_continues_both(tmp_path, data_root, offline_wandb):
    out = tmp_path / "run"
    common = [
        "checkpointing.period_iterations=2",
        "evaluation.export_period_iterations=2",
        "evaluation.knn_period_iterations=2",
        "evaluation.knn_max_samples=6",
        "evaluation.knn_k=3",
        "logging.tensorboard=true",
        "logging.wandb.project=dinov2-tests",
        "logging.wandb.tags=[tiny]",
        "logging.pca_images=3",
    ]
    train_main(["--output-dir", str(out), *tiny_overrides(data_root, "train.max_iterations=4", *common)])
    first_events = accumulator(out / "tensorboard")
    assert [e.step for e in first_events.Scalars("total_loss")] == [1, 2, 3, 4]
    assert [e.step for e in first_events.Images("pca/patch_features")] == [2, 4]  # one per teacher export
    # A run killed after logging iteration 4 but before its checkpoint: it resumes from 2 and
    # does iterations 3 and 4 again.
    shutil.rmtree(out / "checkpoints" / "ckpt_00000004")
    train_main(["--output-dir", str(out), *tiny_overrides(data_root, "train.max_iterations=5", *common)])

    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the same log dir
    events = accumulator(out / "tensorboard")
    lines = {
        line["iteration"]: line for line in map(json.loads, (out / "training_metrics.jsonl").read_text().splitlines())
    }
    assert sorted(lines) == [1, 2, 3, 4, 5]
    for tag in TRAINING_TAGS:
        assert tag in events.Tags()["scalars"], tag
    for tag in ("total_loss", "lr", "teacher_temp", "images_per_sec"):
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == [1, 2, 3, 4, 5], tag  # purge_step: 3 and 4 drawn once
        assert [e.value for e in scalars] == pytest.approx([lines[s][tag] for s in range(1, 6)], rel=1e-6), tag
    assert [e.step for e in events.Scalars("knn_top1")] == [2, 4]
    images = events.Images("pca/patch_features")
    assert [e.step for e in images] == [2, 4, 5]  # the first attempt's export at 4 was redone
    assert (images[-1].width, images[-1].height) == (3 * 16, 2 * 16)  # 3 crops of 16 px over their maps

    runs = wandb_offline_runs(out)
    assert len(runs) == 2
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    assert [run.run_id for run, _ in runs] == [run_id, run_id]  # the resumed run continues the same W&B run
    assert runs[0][0].project == "dinov2-tests" and list(runs[0][0].tags) == ["tiny"]
    assert runs[0][0].display_name == "run"
    history = [row for _, rows in runs for row in rows]
    scalar_rows = [row for row in history if "total_loss" in row]
    assert [row["iteration"] for row in scalar_rows] == [1, 2, 3, 4, 3, 4, 5]  # W&B history is append-only
    for tag in TRAINING_TAGS:
        assert tag in scalar_rows[1], tag
    assert scalar_rows[-1]["total_loss"] == pytest.approx(lines[5]["total_loss"])
    image_rows = [row for row in history if "pca/patch_features/_type" in row]
    assert [row["iteration"] for row in image_rows] == [2, 4, 4, 5]
    assert image_rows[0]["pca/patch_features/_type"] == "image-file"
    assert (image_rows[0]["pca/patch_features/width"], image_rows[0]["pca/patch_features/height"]) == (48, 32)


def test_with_tracking_off_neither_package_is_imported(tmp_path, data_root):
    script = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from train_helpers import tiny_overrides
from dinov2.train.train import main
import dinov2.classify.trainer, dinov2.eval.knn, dinov2.eval.linear, dinov2.eval.log_regression
main(["--output-dir", {str(tmp_path / "run")!r}, *tiny_overrides({data_root!r}, "train.max_iterations=1")])
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("wandb", "tensorboard") or "tensorboard" in name)
print("LOADED", loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout, result.stdout[-2000:]
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "wandb").exists()


@pytest.mark.slow
def test_two_fsdp_ranks_log_once_with_the_pca_map_of_the_sharded_teacher(tmp_path, data_root):
    from distributed_helpers import TORCHRUN, training_overrides

    from dinov2.distributed import free_port

    out = tmp_path / "run"
    overrides = [*training_overrides(Path(data_root), 2), "evaluation.export_period_iterations=2"]
    command = [*TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", str(REPO / "train" / "train.py")]
    command += ["--output-dir", str(out), *overrides, "logging.tensorboard=true", "logging.pca_images=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(list((out / "tensorboard").iterdir())) == 1  # rank 0 only
    events = accumulator(out / "tensorboard")
    assert [e.step for e in events.Scalars("total_loss")] == [1, 2]
    assert [(e.step, e.width, e.height) for e in events.Images("pca/patch_features")] == [(2, 2 * 16, 2 * 16)]


@pytest.mark.parametrize(
    "module, options",
    [("wandb", {"wandb": {"project": "p"}}), ("torch.utils.tensorboard", {"tensorboard": True})],
)
def test_a_missing_package_is_an_error_naming_the_extra(tmp_path, monkeypatch, module, options):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'dinov2\[tracking\]'"):
        Tracker(tmp_path, options)


def test_tracker_on_a_non_main_process_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path, {"tensorboard": True, "wandb": {"project": "p"}}, enabled=False)
    tracker.log({"iteration": 1, "loss": 1.0})
    tracker.log_image("pca", np.zeros((4, 4, 3)), step=1)
    tracker.close()
    assert not tracker.active and list(tmp_path.iterdir()) == []


CLASSIFY_TINY = [
    "backbone.patch_size=4",
    "backbone.embed_dim=32",
    "backbone.depth=2",
    "backbone.num_heads=2",
    "data.crop_size=16",
    "data.batch_size=8",
    "data.num_workers=0",
    "optim.mode=probe",
    "optim.cache_features=true",
]


def test_classifier_epochs_go_to_tensorboard_and_a_resume_continues_them(tmp_path):
    from dinov2.classify.config import load_classify_config
    from dinov2.classify.trainer import train_classifier
    from dinov2_tools.shapes import make_shapes_dataset

    shapes = tmp_path / "shapes"
    make_shapes_dataset(shapes, count=24, size=16, seed=1)
    out = tmp_path / "cls"

    def run(epochs):
        data = [f"data.train=CSV:path={shapes / 'train.csv'}", f"data.val=CSV:path={shapes / 'val.csv'}"]
        overrides = [f"output_dir={out}", *data, *CLASSIFY_TINY, f"optim.epochs={epochs}", "logging.tensorboard=true"]
        train_classifier(load_classify_config(None, overrides))

    run(2)
    run(3)  # resumes after epoch 2
    events = accumulator(out / "tensorboard")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    for tag in ("train/loss", "val/mean_top1"):
        assert tag in events.Tags()["scalars"], events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("val/mean_top1")] == pytest.approx(
        [line["val"]["mean_top1"] for line in lines]
    )


@pytest.fixture(scope="module")
def eval_workspace(tmp_path_factory):
    """A tiny training output directory (config + teacher export) and three ImageFolder splits."""
    root = tmp_path_factory.mktemp("eval_tracking")
    make_training_output(root / "run")
    specs = {}
    for split in ("train", "val", "test"):
        specs[split] = (
            f"ImageFolder:root={make_image_folder(root / split, per_class=4, size=16, seed=len(split))}:cache=false"
        )
    return root, specs


def _eval_args(root, specs, out):
    return [
        "--pretrained-weights",
        str(root / "run"),
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
        "logging.tensorboard=true",
    ]


def test_knn_and_linear_evaluations_write_their_results_to_tensorboard(eval_workspace):
    from dinov2.eval import knn, linear

    root, specs = eval_workspace
    assert knn.main(_eval_args(root, specs, root / "knn") + ["--nb-knn", "1", "3"]) == 0
    results = json.loads((root / "knn" / "results.json").read_text())
    events = accumulator(root / "knn" / "tensorboard")
    for role in ("val", "test"):
        for k in (1, 3):
            (point,) = events.Scalars(f"{role}/k={k}/top1")
            assert point.step == 0
            assert point.value == pytest.approx(results["runs"][0]["splits"][role][f"k={k}"]["top1"])
    assert knn.main(_eval_args(root, specs, root / "knn") + ["--nb-knn", "1", "3"]) == 0  # a rerun replaces
    assert len(accumulator(root / "knn" / "tensorboard").Scalars("test/k=1/top1")) == 1

    linear_args = ["--epochs", "2", "--learning-rates", "0.01", "0.1", "--n-last-blocks", "1", "--avgpool", "no"]
    assert linear.main(_eval_args(root, specs, root / "linear") + linear_args) == 0
    results = json.loads((root / "linear" / "results.json").read_text())
    events = accumulator(root / "linear" / "tensorboard")
    last = results["settings"]["iterations"]
    (point,) = events.Scalars("test/top1")
    assert (point.step, point.value) == (last, pytest.approx(results["test"]["top1"]))
    assert events.Scalars("best_head/val_top1")[0].value == pytest.approx(results["best_head"]["val_top1"])
    for index, head in enumerate(results["heads"]):  # the validation curve of every head
        curve = events.Scalars(f"val_top1/{head['name']}")
        assert [e.step for e in curve] == [entry["iteration"] for entry in results["history"]]
        assert [e.value for e in curve] == pytest.approx([entry["val_top1"][index] for entry in results["history"]])
