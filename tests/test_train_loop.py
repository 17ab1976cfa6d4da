import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from train_helpers import make_image_folder, tiny_overrides

from dinov2.checkpoint import CheckpointManager
from dinov2.hub.weights import load_backbone_weights
from dinov2.models import build_backbone
from dinov2.train.data import SeededSampleDataset
from dinov2.train.knn_monitor import weighted_knn_top1
from dinov2.train.train import main
from dinov2.train.trainer import NonFiniteLossError, SSLTrainer
from dinov2.utils.config import load_config, load_saved_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def read_lines(output_dir):
    with open(Path(output_dir) / "training_metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


def test_run_writes_config_metrics_checkpoints_and_exports(tmp_path, data_root):
    out = tmp_path / "run"
    main(
        [
            "--output-dir",
            str(out),
            *tiny_overrides(
                data_root,
                "train.max_iterations=10",
                "evaluation.knn_period_iterations=5",
                "evaluation.knn_max_samples=8",
                "evaluation.knn_k=3",
            ),
        ]
    )
    cfg = load_saved_config(out)
    assert cfg.train.output_dir == str(out)  # where it ran, recorded without changing the loaded config
    peak_lr = 0.004 * math.sqrt(4 / 1024)  # optim.base_lr scaled by the global batch
    lines = read_lines(out)
    assert [line["iteration"] for line in lines] == list(range(1, 11))
    first = lines[0]
    for key in (
        "total_loss",
        "dino_loss",
        "dino_global_crops_loss",
        "dino_local_crops_loss",
        "ibot_loss",
        "koleo_loss",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "images_per_sec",
        "eta_seconds",
        "skipped_images",
        "nonfinite_steps",
        "last_layer_lr",
    ):
        assert key in first, key
    assert first["lr"] == 0.0 and lines[4]["lr"] == pytest.approx(peak_lr)  # warm-up of 5 iterations
    assert [line["iteration"] for line in lines if "knn_top1" in line] == [5, 10]
    assert all(0.0 <= line["knn_top1"] <= 1.0 for line in lines if "knn_top1" in line)
    assert [p.name for p in sorted((out / "checkpoints").glob("ckpt_*"))] == ["ckpt_00000005", "ckpt_00000010"]
    exports = sorted(p.name for p in (out / "exports").iterdir())
    assert exports == ["teacher_backbone_00000010.pth", "teacher_backbone_latest.pth"]
    # The export is a plain official-format state dict that loads strictly into the factory.
    backbone = build_backbone(cfg.student, cfg.crops.global_crops_size)
    load_backbone_weights(backbone, out / "exports" / "teacher_backbone_latest.pth")
    # The metrics plot script turns the run into a PNG.
    spec = importlib.util.spec_from_file_location(
        "plot_training_metrics", REPO / "scripts" / "plot_training_metrics.py"
    )
    plot_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_module)
    png = plot_module.plot_training_metrics(out)
    assert png == out / "training_metrics.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_weights_are_never_checkpointed(tmp_path, data_root):
    trainer = SSLTrainer(load_config(None, tiny_overrides(data_root)), output_dir=tmp_path / "run")
    with torch.no_grad():
        trainer.model.student["backbone"].cls_token.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"refusing to checkpoint: student\.backbone\.cls_token holds"):
        trainer.save_checkpoint()
    assert trainer.checkpointer.latest() is None


def test_fp16_scaler_overflow_is_counted_not_logged_as_the_gradient_norm(tmp_path, data_root, monkeypatch):
    import dinov2.train.trainer as trainer_module

    overrides = ["compute_precision.param_dtype=fp16", "compute_precision.grad_scaler=true", "train.max_iterations=2"]
    trainer = SSLTrainer(load_config(None, tiny_overrides(data_root, *overrides)), output_dir=tmp_path / "run")
    monkeypatch.setattr(trainer_module, "clip_student_gradients", lambda *args: torch.tensor(float("inf")))
    trainer.train()
    lines = read_lines(tmp_path / "run")
    assert [line["fp16_overflow_steps"] for line in lines] == [1, 1] and all("grad_norm" not in line for line in lines)
    assert all(line["nonfinite_steps"] == 0 for line in lines)  # the scaler's business, not a skipped step


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path, data_root):
    # Fixed teacher (momentum 1) and temperature: the student fits the teacher's targets.
    cfg = load_config(
        None,
        tiny_overrides(
            data_root,
            "teacher.momentum_teacher=1.0",
            "teacher.warmup_teacher_temp=0.07",
            "optim.warmup_epochs=0",
            "optim.base_lr=0.1",
            "optim.min_lr=0.1",
            "student.drop_path_rate=0",
            "optim.freeze_last_layer_epochs=0",
        ),
    )
    trainer = SSLTrainer(cfg, output_dir=tmp_path / "fit")
    batch = next(iter(trainer.loader))
    batch.pop("skipped_images")
    totals = []
    for _ in range(12):
        result = trainer.train_step(batch)
        assert result["finite"]
        totals.append(result["losses"]["total_loss"])
        trainer.iteration += 1
    assert totals[-1] < totals[0] - 0.05, totals


def test_resume_continues_with_the_same_losses(tmp_path, data_root):
    common = tiny_overrides(data_root, "train.max_iterations=12", "checkpointing.period_iterations=5")
    main(["--output-dir", str(tmp_path / "straight"), *common])
    # Interrupted after 7 iterations (a checkpoint at 5 and the final one at 7), then resumed.
    main(["--output-dir", str(tmp_path / "resumed"), *common, "train.max_iterations=7"])
    with open(tmp_path / "resumed" / "training_metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"iteration": 99, "total_loss": 0.0}) + "\n")  # logged after the checkpoint
    main(["--output-dir", str(tmp_path / "resumed"), *common])
    straight, resumed = read_lines(tmp_path / "straight"), read_lines(tmp_path / "resumed")
    assert [line["iteration"] for line in resumed] == list(range(1, 13))
    for a, b in zip(straight, resumed):
        for key in ("total_loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "teacher_temp"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["iteration"], key)
    # The final teachers are identical too.
    a = torch.load(tmp_path / "straight" / "exports" / "teacher_backbone_latest.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "exports" / "teacher_backbone_latest.pth", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_non_finite_losses_stop_the_run_and_keep_the_last_checkpoint(tmp_path, data_root):
    cfg = load_config(
        None,
        tiny_overrides(
            data_root, "train.max_iterations=20", "checkpointing.period_iterations=3", "train.max_nonfinite_steps=2"
        ),
    )
    trainer = SSLTrainer(cfg, output_dir=tmp_path / "nan")
    original = trainer.model.forward_backward
    snapshots = {}

    def poisoned(data, teacher_temp, scaler=None, **options):
        if trainer.iteration >= 4:
            snapshots.setdefault(
                "state",
                {
                    k: v.clone()
                    for k, v in trainer.model.state_dict().items()
                    if k.startswith("teacher.") or k.endswith(".center")
                },
            )
        losses = original(data, teacher_temp, scaler, **options)
        if trainer.iteration >= 4:  # from the 5th iteration on, iBOT goes NaN
            losses["ibot_loss"] = torch.tensor(float("nan"))
            losses["total_loss"] = torch.tensor(float("nan"))
        return losses

    trainer.model.forward_backward = poisoned
    with pytest.raises(NonFiniteLossError, match="ibot_loss"):
        trainer.train()
    assert trainer.iteration == 5  # iteration 5 skipped, the 6th (second in a row) stopped the run
    # Skipped steps touched neither the teacher nor the loss centres.
    after = trainer.model.state_dict()
    assert any(k.endswith(".center") for k in snapshots["state"])
    assert all(torch.equal(after[k], v) for k, v in snapshots["state"].items())
    last_line = read_lines(tmp_path / "nan")[-1]
    assert last_line["iteration"] == 5 and last_line["nonfinite_steps"] == 1 and "ibot_loss" not in last_line
    latest = CheckpointManager(tmp_path / "nan" / "checkpoints").latest()
    assert latest.name == "ckpt_00000003"
    # The intact checkpoint resumes cleanly.
    fresh = SSLTrainer(cfg, output_dir=tmp_path / "nan")
    assert fresh.resume() and fresh.iteration == 3
    assert all(torch.isfinite(p).all() for p in fresh.model.parameters())


def test_data_stream_does_not_depend_on_the_number_of_workers(tmp_path, data_root):
    batches = []
    for workers in (0, 2):
        cfg = load_config(None, tiny_overrides(data_root, f"train.num_workers={workers}"))
        trainer = SSLTrainer(cfg, output_dir=tmp_path / f"w{workers}")
        iterator = iter(trainer.loader)
        batches.append([next(iterator) for _ in range(2)])
    for first, second in zip(*batches):
        assert torch.equal(first["collated_global_crops"], second["collated_global_crops"])
        assert torch.equal(first["collated_local_crops"], second["collated_local_crops"])
        assert torch.equal(first["collated_masks"], second["collated_masks"])


def test_seeded_samples_are_the_same_per_batch_or_per_item_and_leave_the_callers_rng_alone():
    class RandomDraws(torch.utils.data.Dataset):  # one draw from each RNG the seeding covers
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return (torch.rand(1).item(), random.random(), float(np.random.rand())), index

    dataset = SeededSampleDataset(RandomDraws(), seed=3)
    keys = [(position, position % 8) for position in range(10, 14)]
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    batch = dataset.__getitems__(keys)
    one_by_one = [dataset[key] for key in keys]
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2][1])
    assert batch == one_by_one
    assert len({sample[0] for sample in batch}) == len(keys)  # positions give different draws
    assert [sample[2] for sample in batch] == [position for position, _ in keys]


def test_weighted_knn_top1():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.2, 1.0]])
    assert weighted_knn_top1(bank, labels, queries, torch.tensor([0, 1, 1]), k=2) == 1.0
    assert weighted_knn_top1(bank, labels, queries, torch.tensor([1, 1, 1]), k=2) == pytest.approx(2 / 3)


def test_entry_script_help_and_bad_override(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--config-file" in capsys.readouterr().out
    # The thin script itself, as a user runs it: an unknown key is named in the error.
    result = subprocess.run(
        [sys.executable, str(REPO / "train" / "train.py"), "--output-dir", str(tmp_path), "optim.nope=1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode != 0 and "optim.nope" in result.stderr


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=6)
    (Path(data) / "c0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "skip"
    # 19 images, 8 iterations x 4 = 32 samples: the broken image is drawn at least once.
    main(["--output-dir", str(out), *tiny_overrides(data, "train.max_iterations=8", "train.bad_image_policy=skip")])
    lines = read_lines(out)
    assert lines[-1]["iteration"] == 8
    assert sum(line["skipped_images"] for line in lines) >= 1
    assert all(math.isfinite(line["total_loss"]) for line in lines)
    with pytest.raises(Exception, match="broken.png"):
        main(["--output-dir", str(tmp_path / "raise"), *tiny_overrides(data, "train.max_iterations=8")])


def test_init_from_checkpoint_starts_a_fresh_run_from_a_training_checkpoint(tmp_path, data_root):
    main(["--output-dir", str(tmp_path / "first"), *tiny_overrides(data_root, "train.max_iterations=5")])
    checkpoint = tmp_path / "first" / "checkpoints" / "ckpt_00000005"
    cfg = load_config(None, tiny_overrides(data_root, f"train.init_from_checkpoint={checkpoint}"))
    trainer = SSLTrainer(cfg, output_dir=tmp_path / "second")
    # Derived values are the trainer's; the loaded config stays read-only and as given.
    assert trainer.lr == pytest.approx(0.004 * math.sqrt(4 / 1024)) and trainer.output_dir == tmp_path / "second"
    assert OmegaConf.is_readonly(cfg) and cfg.train.output_dir == "."
    assert trainer.resume() is False and trainer.iteration == 0
    exported = torch.load(tmp_path / "first" / "exports" / "teacher_backbone_latest.pth", weights_only=True)
    for key, value in trainer.model.teacher["backbone"].state_dict().items():
        assert torch.equal(value, exported[key]), key


def test_bf16_on_a_cpu_without_bf16_matmuls_is_warned_about(tmp_path, data_root, monkeypatch, caplog):
    """bf16 autocast on an AVX2-only CPU runs emulated matmuls (80x the fp32 time measured): the
    trainer says so and names the setting, on a CPU that has them it says nothing."""
    import dinov2.train.trainer as trainer_module

    cfg = load_config(None, tiny_overrides(data_root, "compute_precision.param_dtype=bf16"))
    for supported, expected in ((False, 1), (True, 0)):
        monkeypatch.setattr(trainer_module, "cpu_has_bf16_matmul", lambda supported=supported: supported)
        caplog.clear()
        with caplog.at_level("WARNING", logger="dinov2"):
            SSLTrainer(cfg, output_dir=tmp_path / f"run_{supported}")
        warned = [r for r in caplog.records if "without AVX512-BF16 or AMX" in r.getMessage()]
        assert len(warned) == expected
        if warned:
            assert "compute_precision.param_dtype=fp32" in warned[0].getMessage()
