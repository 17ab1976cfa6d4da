"""Distillation (distillation.enabled): a frozen teacher, students trained on its targets, on the
pretraining loop (checkpoints, resume, exports), in one process and over 2 gloo ranks."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from distributed_helpers import free_port, subprocess_env, torchrun_command
from train_helpers import count_forwards, make_image_folder, tiny_overrides

from dinov2.checkpoint.manager import checkpoint_keys, file_sha256
from dinov2.hub.sources import load_backbone
from dinov2.train.distill_meta_arch import DistillMetaArch, TeacherChangedError, student_configs, student_ranks
from dinov2.train.train import main
from dinov2.train.trainer import SSLTrainer
from dinov2.utils.config import load_config

REPO = Path(__file__).resolve().parents[1]
# BatchNorm in the teacher's DINO head (as the Quick, Draw! recipe): its statistics must stay frozen too.
TEACHER_WIDTH = ["student.embed_dim=64", "student.num_heads=2", "dino.head_use_bn=true"]
# Fixed learning rate and temperature, no prototype freeze: the loss can only fall by fitting.
FIT = [
    "optim.warmup_epochs=0",
    "optim.base_lr=0.1",
    "optim.min_lr=0.1",
    "teacher.warmup_teacher_temp=0.07",
    "student.drop_path_rate=0",
    "optim.freeze_last_layer_epochs=0",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data_root):
    """A pretrained 64-wide teacher: a training output with checkpoints (heads) and an export."""
    out = tmp_path_factory.mktemp("teacher")
    main(["--output-dir", str(out), *tiny_overrides(data_root, *TEACHER_WIDTH, "train.max_iterations=2")])
    return out


def distill_overrides(data_root, teacher, *extra):
    return tiny_overrides(
        data_root,
        "distillation.enabled=true",
        f"distillation.teacher={teacher}",
        "distillation.teacher_num_heads=2",  # a bare 64-wide file would otherwise be read as 1 head
        *extra,
    )


def read_lines(output_dir):
    with open(Path(output_dir) / "training_metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


def fit_fixed_batch(trainer, steps=10):
    batch = next(iter(trainer.loader))
    batch.pop("skipped_images")
    totals = []
    for _ in range(steps):
        result = trainer.train_step(batch)
        assert result["finite"]
        totals.append(result["losses"]["total_loss"])
        trainer.iteration += 1
    return totals


@pytest.mark.parametrize("source", ["training_output", "backbone_file"])
def test_student_fits_a_frozen_teacher(tmp_path, data_root, teacher_run, source):
    teacher = teacher_run if source == "training_output" else teacher_run / "exports" / "teacher_backbone_latest.pth"
    cfg = load_config(None, distill_overrides(data_root, teacher, *FIT))
    trainer = SSLTrainer(cfg, output_dir=tmp_path / "fit")
    frozen = trainer.model.frozen_teacher
    # Heads come with a training output (its checkpoint); a bare file gets learned heads on an adapter.
    assert frozen.has_heads == (source == "training_output")
    assert ("adapter" in trainer.model.student) == (source == "backbone_file")
    assert trainer.model.student["backbone"].embed_dim == 32 and frozen.embed_dim == 64
    before = {name: t.clone() for name, t in frozen.state_dict().items()}
    totals = fit_fixed_batch(trainer)
    assert totals[-1] < totals[0] - 0.05, totals
    after = frozen.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)  # bit-identical: never trained
    assert not any(p.requires_grad for p in frozen.parameters())


def test_checkpoints_reference_the_teacher_and_resume_like_an_uninterrupted_run(tmp_path, data_root, teacher_run):
    teacher_file = teacher_run / "exports" / "teacher_backbone_latest.pth"
    common = distill_overrides(data_root, teacher_file, "train.max_iterations=6", "checkpointing.period_iterations=2")
    main(["--output-dir", str(tmp_path / "straight"), *common])

    # Stopped as SIGTERM stops it (request_stop) after iteration 3, then the same command again.
    cfg = load_config(None, common)
    trainer = SSLTrainer(cfg, output_dir=tmp_path / "resumed")
    step = trainer.train_step

    def stopping_step(batch):
        result = step(batch)
        if trainer.iteration == 2:  # the iteration being completed is the 3rd
            trainer.request_stop()
        return result

    trainer.train_step = stopping_step
    assert trainer.train()["stopped"]
    keys = checkpoint_keys(tmp_path / "resumed" / "checkpoints" / "ckpt_00000003")
    model_keys = [key for key in keys if key.startswith("train.model.")]
    assert model_keys and all(key.startswith("train.model.students.main.") for key in model_keys)
    assert not any("frozen" in key for key in keys)
    assert len(model_keys) == len(trainer.model.state_dict())  # exactly the students, nothing of the teacher
    assert "extra.distill_teacher_sha256" in keys and "extra.distill_teacher_path" in keys
    assert trainer.model.teacher_reference.sha256 == file_sha256(teacher_file)

    main(["--output-dir", str(tmp_path / "resumed"), *common])
    straight, resumed = read_lines(tmp_path / "straight"), read_lines(tmp_path / "resumed")
    assert [line["iteration"] for line in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        for key in ("total_loss", "dino_loss", "ibot_loss", "koleo_loss", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["iteration"], key)
    # The export is the student's EMA in the official format, loadable through the run directory.
    student, _ = load_backbone(str(tmp_path / "resumed"))
    assert student.embed_dim == 32
    a = torch.load(tmp_path / "straight" / "exports" / "teacher_backbone_latest.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "exports" / "teacher_backbone_latest.pth", weights_only=True)
    assert a.keys() == student.state_dict().keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_a_changed_teacher_file_is_refused_on_resume(tmp_path, data_root, teacher_run):
    teacher_file = tmp_path / "teacher.pth"
    teacher_file.write_bytes((teacher_run / "exports" / "teacher_backbone_latest.pth").read_bytes())
    common = distill_overrides(data_root, teacher_file, "checkpointing.period_iterations=2")
    main(["--output-dir", str(tmp_path / "run"), *common, "train.max_iterations=2"])
    state = torch.load(teacher_file, weights_only=True)
    state["norm.weight"] = state["norm.weight"] + 1.0
    torch.save(state, teacher_file)
    with pytest.raises(TeacherChangedError, match=str(teacher_file)):
        main(["--output-dir", str(tmp_path / "run"), *common, "train.max_iterations=4"])


def test_each_student_starts_from_its_own_seed(data_root, teacher_run):
    # Its initial weights depend on train.seed and its place in the list only: not on what was
    # drawn before, nor on which other students are built (the same on any rank placement).
    two = "distillation.students=[{name: wide, student: {embed_dim: 32}}, {name: narrow, student: {embed_dim: 16}}]"
    cfg = load_config(None, distill_overrides(data_root, teacher_run, two))
    first = DistillMetaArch(cfg).students
    torch.rand(100)
    again = DistillMetaArch(cfg).students
    other = DistillMetaArch(load_config(None, distill_overrides(data_root, teacher_run, two, "train.seed=1"))).students
    for name in ("wide", "narrow"):
        ours, theirs = first[name].state_dict(), again[name].state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
        reseeded = other[name].state_dict()
        assert not torch.equal(ours["student.backbone.cls_token"], reseeded["student.backbone.cls_token"]), name


def test_two_students_share_one_teacher_forward_and_export_separately(tmp_path, data_root, teacher_run):
    students = (
        "distillation.students=[{name: wide, student: {embed_dim: 32}},"
        " {name: narrow, student: {embed_dim: 16}, optim: {base_lr: 0.002}}]"
    )
    knn = ["evaluation.knn_period_iterations=3", "evaluation.knn_max_samples=8", "evaluation.knn_k=3"]
    cfg = load_config(None, distill_overrides(data_root, teacher_run, students, "train.max_iterations=3", *knn))
    out = tmp_path / "multi"
    trainer = SSLTrainer(cfg, output_dir=out)
    assert [unit.name for unit in trainer.units] == ["wide", "narrow"]
    assert trainer.units[0].optimizer is not trainer.units[1].optimizer
    assert trainer.units[1].schedules.lr.base_value == pytest.approx(trainer.units[0].schedules.lr.base_value / 2)
    calls = count_forwards(trainer.model.frozen_teacher.backbone)
    record = trainer.train()["last_record"]
    assert len(calls) == 3  # one teacher forward per batch for both students
    assert {"wide/total_loss", "narrow/total_loss", "wide/lr", "narrow/lr"} <= set(record)
    assert record["narrow/lr"] != record["wide/lr"]
    # The online k-NN monitor scores each student's EMA (knn_top1: the first student's).
    assert record["knn_top1"] == record["wide/knn_top1"] and 0.0 <= record["narrow/knn_top1"] <= 1.0
    for name, width in (("wide", 32), ("narrow", 16)):
        assert (out / "students" / name / "exports" / "teacher_backbone_latest.pth").is_file()
        exported, _ = load_backbone(str(out / "students" / name))  # its own config.yaml beside the export
        assert exported.embed_dim == width
    # A loop longer than both schedules would train nobody at its end: refused, naming the key.
    longer = distill_overrides(
        data_root, teacher_run, students, f"train.max_iterations={trainer.roster.total_iterations + 1}"
    )
    with pytest.raises(ValueError, match=r"train.max_iterations=\d+ is past the end of every student's schedule"):
        SSLTrainer(load_config(None, longer), output_dir=tmp_path / "longer")
    # Both students' weights and optimizer states resume from the one checkpoint.
    cfg = load_config(None, distill_overrides(data_root, teacher_run, students, "train.max_iterations=4"))
    resumed = SSLTrainer(cfg, output_dir=out)
    assert resumed.resume() and resumed.iteration == 3
    for before, after in zip(trainer.units, resumed.units):
        assert before.optimizer.state_dict()["state"].keys() == after.optimizer.state_dict()["state"].keys()
        for key, value in before.arch.state_dict().items():
            assert torch.equal(value, after.arch.state_dict()[key]), key


def test_two_rank_gloo_distillation(tmp_path, data_root, teacher_run):
    out = tmp_path / "ddp"
    overrides = distill_overrides(
        data_root, teacher_run / "exports" / "teacher_backbone_latest.pth", "train.max_iterations=2"
    )
    command = torchrun_command(2, str(REPO / "train" / "train.py"), ["--output-dir", str(out), *overrides], free_port())
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        result = subprocess.run(
            command, cwd=REPO, env=subprocess_env(), stdout=handle, stderr=subprocess.STDOUT, timeout=240
        )
    assert result.returncode == 0, log.read_text()[-3000:]
    lines = read_lines(out)
    assert [line["iteration"] for line in lines] == [1, 2]
    assert all(line["total_loss"] == line["total_loss"] for line in lines)  # finite, no NaN
    keys = checkpoint_keys(out / "checkpoints" / "ckpt_00000002")
    assert all(key.startswith("train.model.students.main.") for key in keys if key.startswith("train.model."))
    student, _ = load_backbone(str(out))
    assert student.embed_dim == 32
    # Resharded: the 2-rank checkpoint resumes in one process.
    cfg = load_config(None, [*overrides[:-1], "train.max_iterations=3"])
    trainer = SSLTrainer(cfg, output_dir=out)
    assert trainer.train()["iteration"] == 3
    assert trainer.resumed_from.name == "ckpt_00000002"


def test_bad_student_entries_and_a_mismatched_patch_size_are_named(tmp_path, data_root, teacher_run):
    for entry, message in (
        ("[{name: a, student: {embed_dims: 16}}]", r"students\[0\]\.student: unknown key\(s\) \['embed_dims'\]"),
        ("[{name: a}, {name: a}]", "'a' is used twice"),
        ("[{name: half}]", "taken by a torch.nn.Module attribute"),
        ("[{name: a, lr: 0.1}]", r"unknown key\(s\) \['lr'\]"),
    ):
        cfg = load_config(None, distill_overrides(data_root, teacher_run, f"distillation.students={entry}"))
        with pytest.raises(ValueError, match=message):
            student_configs(cfg)
    cfg = load_config(None, distill_overrides(data_root, teacher_run, "student.patch_size=8"))
    with pytest.raises(ValueError, match="student.patch_size 8 differs from the teacher's patch size 4"):
        SSLTrainer(cfg, output_dir=tmp_path / "bad")


SUBSET_STUDENTS = (
    "distillation.students=[{name: wide, student: {embed_dim: 32}, ranks: [0]},"
    " {name: narrow, student: {embed_dim: 16}, ranks: [1]}]"
)


def test_students_on_rank_subsets_share_each_ranks_teacher_forward_and_resume_exactly(tmp_path, data_root, teacher_run):
    """Two students, one on each of 2 gloo ranks, in one launch (tests/distill_subset_worker.py):
    an uninterrupted 4-iteration run, and the same run stopped after 2 and resumed. BatchNorm heads
    and distributed KoLeo: their collectives must run over each student's own rank, or the step
    would wait for a rank that does not train that student."""
    knn = ["evaluation.knn_period_iterations=2", "evaluation.knn_max_samples=8", "evaluation.knn_k=3"]
    overrides = distill_overrides(
        data_root,
        teacher_run,
        SUBSET_STUDENTS,
        "dino.head_use_bn=true",
        "dino.koleo_distributed=true",
        "checkpointing.period_iterations=2",
        *knn,
    )
    worker = str(REPO / "tests" / "distill_subset_worker.py")
    command = torchrun_command(2, worker, [str(tmp_path), *overrides], free_port())
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        result = subprocess.run(
            command, cwd=REPO, env=subprocess_env(), stdout=handle, stderr=subprocess.STDOUT, timeout=300
        )
    assert result.returncode == 0, log.read_text()[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [report["students"] for report in reports] == [["wide"], ["narrow"]]
    assert [report["teacher_forwards"] for report in reports] == [4, 4]  # once per rank and step
    assert [report["resumed_from"] for report in reports] == ["ckpt_00000002"] * 2
    for report in reports:  # both ranks, although only rank 1 trained the student that went missing
        assert "holds student(s) ['narrow'] that distillation.students no longer lists" in report["init_refused"]
        assert "initialise from a checkpoint without them" in report["init_refused"]

    # Rank 0 logs both students' figures, each reduced over its own rank.
    full, resumed = read_lines(tmp_path / "full"), read_lines(tmp_path / "resumed")
    assert [line["iteration"] for line in full] == [line["iteration"] for line in resumed] == [1, 2, 3, 4]
    terms = ("wide/total_loss", "narrow/total_loss", "wide/koleo_loss", "narrow/ibot_loss", "grad_norm")
    for line in full:
        assert all(line[term] == line[term] for term in terms)  # present and finite
        assert line["wide/total_loss"] != line["narrow/total_loss"]
    assert 0.0 <= full[-1]["wide/knn_top1"] <= 1.0 and 0.0 <= full[-1]["narrow/knn_top1"] <= 1.0
    # The resumed run continues exactly where the uninterrupted one was.
    for uninterrupted, continued in zip(full, resumed):
        for term in terms + ("wide/lr", "narrow/lr"):
            assert continued[term] == uninterrupted[term], (uninterrupted["iteration"], term)

    # Each student's export, written by its own rank (rank 1 for narrow), with its config beside it.
    for name, width in (("wide", 32), ("narrow", 16)):
        exported, _ = load_backbone(str(tmp_path / "full" / "students" / name))
        assert exported.embed_dim == width
    keys = checkpoint_keys(tmp_path / "full" / "checkpoints" / "ckpt_00000004")
    for name in ("wide", "narrow"):
        assert any(key.startswith(f"train.model.students.{name}.") for key in keys)
        assert any(key.startswith(f"train.optimizer.state.students.{name}.") for key in keys)

    # Resharded onto another world size: one process trains both students from the 2-rank checkpoint.
    together = distill_overrides(
        data_root,
        teacher_run,
        "distillation.students=[{name: wide, student: {embed_dim: 32}}, {name: narrow, student: {embed_dim: 16}}]",
        "dino.head_use_bn=true",
        "train.max_iterations=5",
        *knn,
    )
    trainer = SSLTrainer(load_config(None, together), output_dir=tmp_path / "full")
    assert trainer.resume() and trainer.iteration == 4
    for name in ("wide", "narrow"):
        export = torch.load(
            tmp_path / "full" / "students" / name / "exports" / "teacher_backbone_00000004.pth", weights_only=True
        )
        restored = trainer.model.students[name].teacher["backbone"].state_dict()
        assert all(torch.equal(export[key], restored[key]) for key in export), name
    for unit in trainer.units:  # both optimizers' moments came back (from rank 0's and rank 1's shards)
        assert unit.optimizer.state and all("exp_avg" in state for state in unit.optimizer.state.values())
    # Each rank scored its own student's features only (not merged with the other rank's student).
    trainer.run_knn_monitor()
    assert trainer.knn_by_student == {name: full[-1][f"{name}/knn_top1"] for name in ("wide", "narrow")}
    assert trainer.train()["iteration"] == 5


def test_bad_student_ranks_are_named(data_root, teacher_run):
    def placement(entries, world_size):
        cfg = load_config(None, distill_overrides(data_root, teacher_run, f"distillation.students={entries}"))
        return student_ranks(cfg, world_size)

    assert placement("[{name: a, ranks: [1]}, {name: b}]", 2) == {"a": (1,), "b": (0, 1)}
    assert placement("[{name: a, ranks: [0]}, {name: b, ranks: []}]", 1) == {"a": (0,), "b": (0,)}
    for entries, world_size, message in (
        ("[{name: a, ranks: [0, 2]}, {name: b}]", 2, r"students\[0\]\.ranks \[0, 2\]: rank\(s\) \[2\] do not exist"),
        ("[{name: a, ranks: [0]}, {name: b, ranks: [0]}]", 2, r"rank\(s\) \[1\] of 2 train no student"),
        ("[{name: a, ranks: [1, 1]}, {name: b}]", 2, r"students\[0\]\.ranks lists rank\(s\) \[1\] more than once"),
        ("[{name: a}, {name: b, ranks: [-1]}]", 2, r"students\[1\]\.ranks: rank numbers are >= 0"),
        ("[{name: a, ranks: 0}, {name: b}]", 2, r"students\[0\]\.ranks must be a list of rank numbers"),
    ):
        with pytest.raises(ValueError, match=message):
            placement(entries, world_size)


def test_benchmark_times_a_resumed_run_by_its_last_logged_windows(tmp_path):
    """benchmark_distillation.py's step times: a window's step time is its eta over the iterations
    left, a resumed run's re-logged windows replace the first ones, and the median ignores a
    window slowed by another job."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "benchmark_distillation", REPO / "scripts" / "benchmark_distillation.py"
    )
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)

    (tmp_path / "config.yaml").write_text("optim:\n  total_iterations: 40\n")
    steps = [(10, 1.0), (20, 1.0), (30, 9.0), (20, 1.0), (30, 2.0), (40, 0.0)]  # resumed after 20
    lines = [json.dumps({"iteration": it, "eta_seconds": step * (40 - it)}) for it, step in steps]
    (tmp_path / "training_metrics.jsonl").write_text("\n".join(lines) + "\n")
    times = benchmark.logged_step_times(tmp_path)
    assert times["logged_step_seconds"] == pytest.approx(10 * 1.0 + 10 * 1.0 + 10 * 2.0)
    assert times["median_step_seconds"] == pytest.approx(1.0)
    assert times["quiet_seconds"] == pytest.approx(40.0)
