"""What a training run writes stays trustworthy: no checkpoint or export after non-finite steps,
retention keeps the last good checkpoint, a failed resume leaves config.yaml alone, metrics
lines are not repeated after a restart, and a stop by signal says so."""

import json
import logging
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from train_helpers import make_image_folder, tiny_overrides

from dinov2.checkpoint import CheckpointError, CheckpointManager
from dinov2.checkpoint.manager import checkpoint_keys
from dinov2.train.train import main
from dinov2.train.trainer import NonFiniteLossError, SSLTrainer
from dinov2.utils.config import load_config, load_saved_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def read_lines(output_dir):
    with open(Path(output_dir) / "training_metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


def iterations(output_dir):
    return [line["iteration"] for line in read_lines(output_dir)]


def checkpoint_names(output_dir):
    return [path.name for _, path in CheckpointManager(Path(output_dir) / "checkpoints").complete_checkpoints()]


class LogLines(logging.Handler):
    """The ``dinov2`` logger's messages (its handlers do not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))

    def __enter__(self):
        logging.getLogger("dinov2").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("dinov2").removeHandler(self)


def poison(trainer, bad_iterations, blow_up=False):
    """Make the loss NaN on the given (1-based) iterations; with ``blow_up`` the first of them also
    scales the student's weights by 1e6 first (finite, but nothing a healthy run would save)."""
    original = trainer.model.forward_backward

    def forward_backward(data, teacher_temp, scaler=None, **options):
        losses = original(data, teacher_temp, scaler, **options)
        if trainer.iteration + 1 in bad_iterations:
            if blow_up and trainer.iteration + 1 == min(bad_iterations):
                with torch.no_grad():
                    for parameter in trainer.model.student.parameters():
                        parameter.mul_(1e6)
            losses = {name: torch.tensor(float("nan")) for name in losses}
        return losses

    trainer.model.forward_backward = forward_backward


def test_a_run_that_explodes_after_a_healthy_checkpoint_resumes_from_it(tmp_path, data_root):
    out = tmp_path / "run"
    common = tiny_overrides(
        data_root,
        "checkpointing.keep_last=1",
        "checkpointing.period_iterations=3",
        "evaluation.export_period_iterations=3",
        "train.max_nonfinite_steps=5",
    )
    # Healthy to iteration 3 (checkpoint and export), then weights of order 1e6 and NaN losses
    # from iteration 5 on: the boundary at 6 falls inside the streak, which stops the run at 9.
    cfg = load_config(None, common + ["train.max_iterations=20"])
    trainer = SSLTrainer(cfg, output_dir=out)
    poison(trainer, set(range(5, 21)), blow_up=True)
    with LogLines() as log, pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    assert trainer.iteration == 8  # the 5th NaN step in a row (iteration 9) raised
    healthy = out / "checkpoints" / "ckpt_00000003"
    assert f"{healthy}, was written before these non-finite steps and is intact" in str(error.value)
    assert checkpoint_names(out) == ["ckpt_00000003"]
    assert sorted(p.name for p in (out / "exports").glob("teacher_backbone_0*")) == ["teacher_backbone_00000003.pth"]
    skipped = [message for level, message in log.lines if "checkpoint skipped" in message]
    assert len(skipped) == 1 and skipped[0].startswith("iteration 6:") and str(healthy) in skipped[0]
    # The rerun at the normal learning rate resumes from the healthy checkpoint and trains on.
    main(["--output-dir", str(out), *common, "train.max_iterations=8"])
    lines = read_lines(out)
    assert [line["iteration"] for line in lines] == list(range(1, 9))
    assert all(math.isfinite(line["total_loss"]) and line["nonfinite_steps"] == 0 for line in lines)
    assert checkpoint_names(out) == ["ckpt_00000008"]


def test_non_finite_steps_before_any_checkpoint_say_there_is_none(tmp_path, data_root):
    cfg = load_config(None, tiny_overrides(data_root, "train.max_iterations=5", "train.max_nonfinite_steps=2"))
    trainer = SSLTrainer(cfg, output_dir=tmp_path / "run")
    poison(trainer, {2, 3})
    with pytest.raises(
        NonFiniteLossError,
        match=r"No checkpoint has been written to .* yet \(a rerun starts from "
        r"iteration 0\)",
    ):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_retention_keeps_the_checkpoint_before_non_finite_steps_also_after_a_resume(tmp_path, data_root):
    out = tmp_path / "run"
    common = tiny_overrides(
        data_root,
        "checkpointing.keep_last=1",
        "checkpointing.period_iterations=2",
        "evaluation.export_period_iterations=100",
    )
    cfg = load_config(None, common + ["train.max_iterations=8"])
    trainer = SSLTrainer(cfg, output_dir=out)
    poison(trainer, {3})  # one NaN step: the boundary at 4 is skipped, training recovers
    with LogLines() as log:
        result = trainer.train()
    assert result["iteration"] == 8 and not result["checkpoint_skipped"]
    assert any(message.startswith("iteration 4: checkpoint skipped, 1 non-finite step(s)") for _, message in log.lines)
    # ckpt 2 is the last one before the NaN step: keep_last=1 did not delete it.
    assert checkpoint_names(out) == ["ckpt_00000002", "ckpt_00000008"]
    assert "extra.protected_checkpoint" in checkpoint_keys(out / "checkpoints" / "ckpt_00000008")
    # A resumed run still protects it.
    cfg = load_config(None, common + ["train.max_iterations=12"])
    resumed = SSLTrainer(cfg, output_dir=out)
    resumed.train()
    assert resumed.resumed_from.name == "ckpt_00000008" and resumed.protected_checkpoint == 2
    assert checkpoint_names(out) == ["ckpt_00000002", "ckpt_00000012"]
    assert CheckpointManager(out / "checkpoints", keep_last=1).to_delete([2, 4, 6], protect=[2]) == [4]


def signal_during(monkeypatch, signum, at_iteration, bad_iterations=()):
    """Every trainer built from here on sends ``signum`` to this process during iteration
    ``at_iteration`` (1-based) and has NaN losses on ``bad_iterations``."""
    original = SSLTrainer.train_step

    def train_step(self, batch):
        if not getattr(self, "_test_poisoned", False):
            poison(self, set(bad_iterations))
            self._test_poisoned = True
        result = original(self, batch)
        if self.iteration + 1 == at_iteration:
            os.kill(os.getpid(), signum)  # handled before the loop's next stop check
        return result

    monkeypatch.setattr(SSLTrainer, "train_step", train_step)


def test_a_stop_signal_is_logged_with_the_iteration_and_its_checkpoint(tmp_path, data_root, monkeypatch):
    out = tmp_path / "run"
    signal_during(monkeypatch, signal.SIGTERM, at_iteration=2)
    with LogLines() as log:
        assert main(["--output-dir", str(out), *tiny_overrides(data_root, "train.max_iterations=9")]) == 0
    assert iterations(out) == [1, 2] and checkpoint_names(out) == ["ckpt_00000002"]
    messages = [message for _, message in log.lines]
    assert (
        f"training stopped on SIGTERM at iteration 2; checkpoint {out / 'checkpoints' / 'ckpt_00000002'} "
        "written, rerun the same command to resume"
    ) in messages
    assert not any("training finished" in message for message in messages)


def test_the_last_iteration_or_a_stop_right_after_non_finite_steps_writes_nothing(tmp_path, data_root, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(
        None,
        tiny_overrides(
            data_root,
            "train.max_iterations=6",
            "checkpointing.period_iterations=3",
            "evaluation.export_period_iterations=3",
        ),
    )
    trainer = SSLTrainer(cfg, output_dir=out)
    poison(trainer, {6})
    result = trainer.train()
    assert result["iteration"] == 6 and result["checkpoint_skipped"] and not result["stopped"]
    assert result["checkpoint"] == out / "checkpoints" / "ckpt_00000003"
    assert checkpoint_names(out) == ["ckpt_00000003"]
    assert sorted(p.name for p in (out / "exports").glob("teacher_backbone_0*")) == ["teacher_backbone_00000003.pth"]
    # SIGUSR1 during a NaN step: the stop writes no checkpoint, and the last line says so.
    signal_during(monkeypatch, signal.SIGUSR1, at_iteration=5, bad_iterations={5})
    with LogLines() as log:
        main(["--output-dir", str(out), *tiny_overrides(data_root, "train.max_iterations=9")])
    assert iterations(out) == [1, 2, 3, 4, 5] and checkpoint_names(out) == ["ckpt_00000003"]
    expected = (
        f"training stopped on SIGUSR1 at iteration 5 without a checkpoint (non-finite steps since the "
        f"previous checkpoint boundary); a rerun resumes from {out / 'checkpoints' / 'ckpt_00000003'}"
    )
    assert ("WARNING", expected) in log.lines


def test_a_failed_resume_leaves_the_config_alone(tmp_path, data_root):
    out = tmp_path / "run"
    main(["--output-dir", str(out), *tiny_overrides(data_root, "train.max_iterations=3")])
    before = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointError):
        main(["--output-dir", str(out), *tiny_overrides(data_root, "train.max_iterations=6", "student.depth=1")])
    assert (out / "config.yaml").read_text() == before
    assert load_saved_config(out).student.depth == 2
    # A resume that fits rewrites it (here with the new iteration budget).
    main(["--output-dir", str(out), *tiny_overrides(data_root, "train.max_iterations=4")])
    assert load_saved_config(out).train.max_iterations == 4


def test_metrics_of_an_attempt_killed_before_its_first_checkpoint_are_not_repeated(tmp_path, data_root):
    out = tmp_path / "run"
    out.mkdir()
    # A killed attempt logged iterations 1-3 but never reached a checkpoint.
    with open(out / "training_metrics.jsonl", "w") as handle:
        handle.writelines(json.dumps({"iteration": iteration, "total_loss": 0.0}) + "\n" for iteration in (1, 2, 3))
    main(["--output-dir", str(out), *tiny_overrides(data_root, "train.max_iterations=3")])
    assert iterations(out) == [1, 2, 3]
    assert all(line["total_loss"] != 0.0 for line in read_lines(out))
