"""Gram anchoring (DINOv3): the Gram loss, the Gram teacher's refresh schedule, resume and file checks."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import make_image_folder, tiny_overrides

from dinov2.checkpoint import CheckpointManager
from dinov2.loss import GramLoss, patch_similarity
from dinov2.models import build_backbone
from dinov2.train.gram_teacher import (
    GramRefreshSchedule,
    GramTeacherChangedError,
    gram_teacher_input_size,
)
from dinov2.train.train import main
from dinov2.train.trainer import SSLTrainer
from dinov2.utils.config import load_config

GRAM = ["gram.use_loss=true", "gram.loss_weight=2.0"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def read_lines(output_dir):
    with open(Path(output_dir) / "training_metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


def tokens(*rows):
    return torch.tensor([rows], dtype=torch.float32)  # one image, (1, N, D)


# ----------------------------------------------------------------------------------- the loss
def test_gram_loss_matches_a_hand_computed_example():
    # Student patches [1, 0] and [1, 1]: cosine similarity 1/sqrt(2); teacher's orthogonal: 0.
    # Two off-diagonal entries differ by 1/sqrt(2) (squared: 1/2), the diagonal agrees: 2 * 0.5 / 4.
    student = tokens([1.0, 0.0], [1.0, 1.0])
    teacher = tokens([3.0, 0.0], [0.0, 0.5])
    torch.testing.assert_close(patch_similarity(student)[0, 0, 1], torch.tensor(1 / math.sqrt(2)))
    assert GramLoss()(student, teacher).item() == pytest.approx(0.25)
    # Per image: two images whose matrices agree within each image, but not across, give 0.
    batch_student = torch.stack([student[0], teacher[0]])
    assert GramLoss()(batch_student, batch_student.flip(-1)).item() == pytest.approx(0.0, abs=1e-7)


def test_gram_loss_is_zero_with_zero_gradient_when_student_and_teacher_agree():
    torch.manual_seed(0)
    student = torch.randn(3, 5, 8, requires_grad=True)
    # A wider teacher with the same similarities: scaled, rotated and padded features.
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    teacher = torch.cat([2.5 * student.detach() @ rotation, torch.zeros(3, 5, 4)], dim=-1)
    loss = GramLoss()(student, teacher)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    loss.backward()
    assert student.grad.abs().max().item() < 1e-5
    # ... and is positive with a gradient once they disagree.
    other = torch.randn(3, 5, 8)
    assert GramLoss()(student, other).item() > 0.01


def test_negative_similarities_are_clipped_for_both_or_only_where_the_teacher_is_negative():
    opposite = tokens([1.0, 0.0], [-1.0, 0.0])  # off-diagonal -1
    orthogonal = tokens([1.0, 0.0], [0.0, 1.0])  # off-diagonal 0
    half = tokens([1.0, 0.0], [0.5, math.sqrt(3) / 2])  # off-diagonal +0.5
    minus_half = tokens([1.0, 0.0], [-0.5, math.sqrt(3) / 2])  # off-diagonal -0.5
    assert GramLoss()(opposite, orthogonal).item() == pytest.approx(0.5)
    assert GramLoss(remove_neg=True)(opposite, orthogonal).item() == pytest.approx(0.0, abs=1e-7)
    # Teacher +0.5, student -0.5: remove_neg clips the student to 0 (error 0.5); only-teacher
    # keeps it (error 1.0).
    assert GramLoss(remove_neg=True)(minus_half, half).item() == pytest.approx(2 * 0.25 / 4)
    assert GramLoss(remove_only_teacher_neg=True)(minus_half, half).item() == pytest.approx(2 * 1.0 / 4)
    # Teacher -1 (clipped to 0): a student at -0.5 is clipped too, one at +0.5 is pulled down.
    assert GramLoss(remove_only_teacher_neg=True)(minus_half, opposite).item() == pytest.approx(0.0, abs=1e-7)
    assert GramLoss(remove_only_teacher_neg=True)(half, opposite).item() == pytest.approx(2 * 0.25 / 4)
    with pytest.raises(ValueError, match="exclusive"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(ValueError, match="differ in"):
        GramLoss()(torch.randn(2, 4, 3), torch.randn(2, 9, 3))


# ------------------------------------------------------------------------------- the schedule
def test_refresh_schedule_iterations_and_maximum():
    schedule = GramRefreshSchedule(first=10, frequency=5, max_updates=3)
    assert schedule.iterations(100) == [10, 15, 20]
    assert [schedule.updates_before(it) for it in (0, 10, 11, 15, 16, 21, 99)] == [0, 0, 1, 1, 2, 3, 3]
    assert schedule.update_index(15) == 1 and schedule.update_index(25) is None and schedule.update_index(12) is None
    assert GramRefreshSchedule(0, 0, 0).iterations(50) == [0]  # one copy only
    assert GramRefreshSchedule(3, 4, 0).iterations(20) == [3, 7, 11, 15, 19]  # no cap
    assert GramRefreshSchedule(3, 4, 0).updates_before(20) == 5
    with pytest.raises(ValueError, match="gram.update_frequency"):
        GramRefreshSchedule(0, -1, 0)
    assert (
        gram_teacher_input_size(16, 2.0, 4) == 32
        and gram_teacher_input_size(28, 1.5, 7) == 42
        and gram_teacher_input_size(29, 1.0, 4) == 28
    )


# ------------------------------------------------------------------------- the run's teacher
def test_gram_teacher_is_taken_on_schedule_and_the_term_is_logged(tmp_path, data_root):
    overrides = tiny_overrides(
        data_root,
        *GRAM,
        "gram.it_first_update=2",
        "gram.update_frequency=3",
        "gram.max_updates=2",
        "train.max_iterations=9",
        "checkpointing.period_iterations=0",
    )
    trainer = SSLTrainer(load_config(None, overrides), output_dir=tmp_path / "run")
    copies = []
    original = trainer.gram_teacher.copy_from

    def recording_copy(teacher):
        copies.append(trainer.iteration)
        original(teacher)

    trainer.gram_teacher.copy_from = recording_copy
    trainer.train()
    assert copies == [2, 5]  # at 2 and 5; the cap of 2 stops the one at 8
    assert trainer.gram_teacher.updates == 2 and trainer.gram_teacher.last_update == 5
    lines = read_lines(tmp_path / "run")
    assert [("gram_loss" in line) for line in lines] == [False, False] + [True] * 7
    # Right after a copy the Gram teacher is the EMA teacher the student was trained towards:
    # the weighted term is in the total.
    for line in lines:
        parts = line["dino_loss"] + 0.1 * line["koleo_loss"] + line["ibot_loss"] + 2.0 * line.get("gram_loss", 0.0)
        assert line["total_loss"] == pytest.approx(parts, rel=1e-5)


def test_gram_term_is_zero_right_after_the_teacher_is_copied_into_a_student_equal_teacher(tmp_path, data_root):
    # At iteration 0 the student, the EMA teacher and the Gram teacher are the same weights; the
    # student's masked crops differ from the teacher's clean ones, so turn masking off.
    overrides = tiny_overrides(data_root, *GRAM, "ibot.loss_weight=0.0", "student.drop_path_rate=0.0")
    trainer = SSLTrainer(load_config(None, overrides), output_dir=tmp_path / "zero")
    trainer.resume()
    batch = next(iter(trainer.loader))
    result = trainer.train_step(batch)
    assert trainer.gram_teacher.updates == 1
    assert result["losses"]["gram_loss"] == pytest.approx(0.0, abs=1e-10)


def test_resumed_run_keeps_its_gram_teacher_and_its_losses(tmp_path, data_root):
    common = tiny_overrides(
        data_root,
        *GRAM,
        "gram.it_first_update=2",
        "gram.update_frequency=4",
        "train.max_iterations=10",
        "checkpointing.period_iterations=4",
    )
    main(["--output-dir", str(tmp_path / "straight"), *common])
    # Interrupted at 8 (a checkpoint at 4 and 8; the Gram teacher copied at 2 and 6), resumed to 10.
    main(["--output-dir", str(tmp_path / "resumed"), *common, "train.max_iterations=8"])
    cfg = load_config(None, common)
    resumed = SSLTrainer(cfg, output_dir=tmp_path / "resumed")
    assert resumed.resume() and resumed.iteration == 8
    assert resumed.gram_teacher.updates == 2 and resumed.gram_teacher.last_update == 6
    # Bit-identical to the Gram teacher of the uninterrupted run at iteration 8.
    straight = SSLTrainer(cfg, output_dir=tmp_path / "straight")
    CheckpointManager(tmp_path / "straight" / "checkpoints").load(
        tmp_path / "straight" / "checkpoints" / "ckpt_00000008", straight.checkpoint_state()
    )
    resumed_state = resumed.gram_teacher.backbone.state_dict()
    for key, value in straight.gram_teacher.backbone.state_dict().items():
        assert torch.equal(value, resumed_state[key]), key
    # ... and not the EMA teacher of iteration 8 (it was copied at 6).
    teacher_state = resumed.model.teacher_backbone().state_dict()
    assert not torch.equal(teacher_state["blocks.0.attn.qkv.weight"], resumed_state["blocks.0.attn.qkv.weight"])
    resumed.train()
    a, b = read_lines(tmp_path / "straight"), read_lines(tmp_path / "resumed")
    assert [line["iteration"] for line in b] == list(range(1, 11))
    for x, y in zip(a, b):
        for key in ("total_loss", "gram_loss", "dino_loss", "ibot_loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-8), (x["iteration"], key)
    assert "gram_loss" in b[-1] and resumed.gram_teacher.updates == 2  # iteration 10 is never trained


# --------------------------------------------------------------------------- a file's teacher
def test_file_gram_teacher_is_verified_on_resume_and_a_changed_file_is_refused(tmp_path, data_root):
    teacher_file = tmp_path / "gram_teacher.pth"
    # A wider teacher than the student (64 vs 32): only the patch-similarity matrices are compared.
    cfg = load_config(None, tiny_overrides(data_root, "student.embed_dim=64", "student.num_heads=1"))
    torch.save(build_backbone(cfg.student, cfg.crops.global_crops_size).state_dict(), teacher_file)
    common = tiny_overrides(
        data_root, *GRAM, f"gram.ckpt={teacher_file}", "gram.resolution_scale=2.0", "train.max_iterations=3"
    )
    main(["--output-dir", str(tmp_path / "run"), *common])
    lines = read_lines(tmp_path / "run")
    assert all(line["gram_loss"] > 0 for line in lines)  # a random teacher, on from iteration 0
    checkpoint = tmp_path / "run" / "checkpoints" / "ckpt_00000003"
    # The file's weights are not in the checkpoint, only its path and checksum.
    from dinov2.checkpoint.manager import checkpoint_keys

    keys = checkpoint_keys(checkpoint)
    assert "gram_state.sha256" in keys and not any(key.startswith("gram.") for key in keys)
    # The same file resumes; a changed one is refused, naming it.
    later = load_config(None, common + ["train.max_iterations=4"])
    assert SSLTrainer(later, output_dir=tmp_path / "run").resume()
    torch.save(build_backbone(cfg.student, cfg.crops.global_crops_size).state_dict(), teacher_file)
    with pytest.raises(GramTeacherChangedError, match=str(teacher_file)):
        SSLTrainer(later, output_dir=tmp_path / "run").resume()


# ------------------------------------------------------------------------------ FSDP2, 2 ranks
@pytest.mark.slow
def test_two_rank_fsdp_run_shards_checkpoints_and_resumes_its_gram_teacher(tmp_path, data_root):
    from test_train_distributed import run_two_ranks

    from dinov2.checkpoint.manager import checkpoint_keys

    common = tiny_overrides(
        data_root, *GRAM, "gram.it_first_update=1", "train.max_iterations=4", "checkpointing.period_iterations=2"
    )
    straight = run_two_ranks(tmp_path / "straight", common)
    # An interrupted run is the straight run's directory as it stood at iteration 2 (two launches,
    # not three: the checkpoint at 2 is what a run stopped there writes).
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "ckpt_00000004")
    resumed = run_two_ranks(tmp_path / "resumed", common)
    keys = checkpoint_keys(tmp_path / "resumed" / "checkpoints" / "ckpt_00000002")
    assert "gram.model.blocks.0.attn.qkv.weight" in keys and "gram_state.updates" in keys
    assert [line["iteration"] for line in resumed] == [1, 2, 3, 4]
    assert "gram_loss" not in straight[0] and all("gram_loss" in line for line in straight[1:])
    for a, b in zip(straight[2:], resumed[2:]):  # the iterations after the resume
        for key in ("total_loss", "gram_loss", "dino_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["iteration"], key)
