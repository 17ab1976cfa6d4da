"""Checkpoint directories as untrusted input: planted DCP metadata runs nothing, corrupted shards
are detected by their checksums, a full disk is named as such, and a resume into another model
lists every mismatched key."""

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from train_helpers import make_image_folder, tiny_overrides

from dinov2.checkpoint import MARKER, CheckpointError, CheckpointManager, ModelOptimizerState, checkpoint_keys
from dinov2.checkpoint.consolidate import consolidate_checkpoint, resolve_checkpoint
from dinov2.eval.setup import build_model_for_eval
from dinov2.hub.sources import load_backbone, resolve_weights_path
from dinov2.train.export import LATEST_EXPORT_NAME, export_teacher_backbone
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import main
from dinov2.utils.config import load_config
from dinov2.utils.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train.max_iterations=2", "checkpointing.period_iterations=2", "evaluation.export_period_iterations=2"]
CHECKPOINT = "ckpt_00000002"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), per_class=4)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_root):
    """A finished 2-iteration run: config.yaml, checkpoints/ckpt_00000002, exports/."""
    out = tmp_path_factory.mktemp("trained") / "run"
    main(["--output-dir", str(out), *tiny_overrides(data_root, *TRAIN)])
    return out


def _tiny_model(*overrides):
    return SSLMetaArch(load_config(None, tiny_overrides("/nonexistent", *overrides)))


def _rewrite_marker(checkpoint: Path) -> None:
    """Record the present sizes and SHA-256 of every file, as a genuine writer would."""
    info = json.loads((checkpoint / MARKER).read_text())
    for name in info["files"]:
        data = (checkpoint / name).read_bytes()
        info["files"][name] = len(data)
        info.setdefault("sha256", {})[name] = hashlib.sha256(data).hexdigest()
    (checkpoint / MARKER).write_text(json.dumps(info))


class _RunsShell:
    """Unpickling this calls os.system(command) (pickled as the global posix.system)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _RunsExec:
    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        return exec, (self.source,)


def _plant(checkpoint: Path, payload) -> None:
    (checkpoint / ".metadata").write_bytes(pickle.dumps(payload))
    _rewrite_marker(checkpoint)


@pytest.fixture
def planted_run(trained_run, tmp_path):
    """A copy of the trained run whose checkpoint metadata would touch ``pwned`` when unpickled."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    pwned = tmp_path / "pwned"
    _plant(run / "checkpoints" / CHECKPOINT, _RunsShell(f"touch {pwned}"))
    return run, pwned


# ------------------------------------------------------------------ planted .metadata
def test_planted_metadata_is_refused_by_resume_and_model_weights(planted_run, data_root, tmp_path):
    run, pwned = planted_run
    checkpoint = run / "checkpoints" / CHECKPOINT
    # The plain rerun of the same training command (resume), with more iterations to go.
    with pytest.raises(CheckpointError, match=r"\.metadata.*posix\.system"):
        main(["--output-dir", str(run), *tiny_overrides(data_root, *TRAIN, "train.max_iterations=4")])
    assert not pwned.exists()
    # A fresh run initialised from that checkpoint.
    with pytest.raises(CheckpointError, match=str(checkpoint / ".metadata")):
        main(
            [
                "--output-dir",
                str(tmp_path / "fresh"),
                *tiny_overrides(data_root, *TRAIN, f"train.init_from_checkpoint={checkpoint}"),
            ]
        )
    assert not pwned.exists()
    with pytest.raises(CheckpointError, match="posix.system"):
        checkpoint_keys(checkpoint)
    assert not pwned.exists()


def test_planted_metadata_is_refused_by_consolidation(planted_run, tmp_path):
    run, pwned = planted_run
    with pytest.raises(CheckpointError, match=r"refusing to read .*\.metadata.*posix\.system"):
        consolidate_checkpoint(run, tmp_path / "teacher.pth")
    script = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "consolidate_checkpoint.py"),
            str(run / "checkpoints" / CHECKPOINT),
            "--output",
            str(tmp_path / "teacher.pth"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert script.returncode != 0
    assert "posix.system" in script.stderr and "refusing to read" in script.stderr
    assert not pwned.exists() and not (tmp_path / "teacher.pth").exists()


def test_planted_metadata_is_never_read_by_warm_start_or_evaluation(planted_run, data_root, tmp_path):
    run, pwned = planted_run
    checkpoint = run / "checkpoints" / CHECKPOINT
    # Warm start and evaluation take backbone files: a checkpoint directory is refused unread.
    with pytest.raises((FileNotFoundError, ValueError)):
        main(
            [
                "--output-dir",
                str(tmp_path / "warm"),
                *tiny_overrides(data_root, *TRAIN, f"student.pretrained_weights={checkpoint}"),
            ]
        )
    with pytest.raises(ValueError, match="consolidate_checkpoint"):
        resolve_weights_path(checkpoint)
    # A training output directory is evaluated from its export, never from its checkpoints.
    evaluated = build_model_for_eval(None, run)
    assert evaluated.weights_path == run / "exports" / LATEST_EXPORT_NAME
    model, spec = load_backbone(str(run))
    assert spec["kind"] == "vit"
    assert not pwned.exists()


def test_builtins_exec_payload_is_refused_naming_the_file_and_global(trained_run, tmp_path):
    checkpoint = tmp_path / CHECKPOINT
    shutil.copytree(trained_run / "checkpoints" / CHECKPOINT, checkpoint)
    pwned = tmp_path / "pwned"
    _plant(checkpoint, _RunsExec(f"open({str(pwned)!r}, 'w').close()"))
    with pytest.raises(CheckpointError, match=r"builtins\.exec") as caught:
        CheckpointManager(tmp_path).load(checkpoint, {"train": ModelOptimizerState(_tiny_model())})
    assert str(checkpoint / ".metadata") in str(caught.value)
    assert not pwned.exists()


def test_real_checkpoints_read_through_the_restricted_reader(trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / CHECKPOINT
    from dinov2.checkpoint import read_metadata

    restricted = read_metadata(checkpoint)
    plain = FileSystemReader(str(checkpoint)).read_metadata()
    assert restricted.state_dict_metadata == plain.state_dict_metadata
    assert restricted.storage_data == plain.storage_data
    # bf16 / fp16 / int tensors and plain values pickle more dtypes into the metadata.
    state = {
        "extra": {
            "a": torch.ones(3, dtype=torch.bfloat16),
            "b": torch.ones(2, dtype=torch.float16),
            "c": torch.arange(4, dtype=torch.int32),
            "d": [1, "x", 2.5],
            "e": True,
        }
    }
    path = CheckpointManager(tmp_path).save(1, state)
    assert "extra.a" in checkpoint_keys(path)
    loaded = {
        "extra": {
            "a": torch.zeros(3, dtype=torch.bfloat16),
            "b": torch.zeros(2, dtype=torch.float16),
            "c": torch.zeros(4, dtype=torch.int32),
            "d": None,
            "e": False,
        }
    }
    CheckpointManager(tmp_path).load(path, loaded)
    assert torch.equal(loaded["extra"]["a"], state["extra"]["a"]) and loaded["extra"]["d"] == [1, "x", 2.5]
    assert loaded["extra"]["e"] is True


# ------------------------------------------------------------------ checksums
def _save_two(directory):
    manager = CheckpointManager(directory, keep_last=0)
    state = {"extra": {"iteration": 0, "weights": torch.randn(20000)}}
    return manager, manager.save(1, state), manager.save(2, state), state


def test_marker_records_the_sha256_of_every_file(tmp_path):
    _, _, path, _ = _save_two(tmp_path)
    info = json.loads((path / MARKER).read_text())
    assert set(info["sha256"]) == set(info["files"]) == {".metadata", "__0_0.distcp"}
    for name, digest in info["sha256"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest


def test_a_shard_overwritten_in_place_is_skipped_with_a_warning(tmp_path):
    manager, older, newer, state = _save_two(tmp_path / "checkpoints")
    shard = newer / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:  # 4 KB of garbage in the middle, same size
        handle.seek(size // 2)
        handle.write(os.urandom(4096))
    assert shard.stat().st_size == size
    with pytest.warns(RuntimeWarning, match=rf"skipping corrupted checkpoint {newer}.*{shard}"):
        assert manager.latest() == older
    with pytest.raises(CheckpointError, match=rf"{shard} does not match its recorded SHA-256"):
        CheckpointManager(tmp_path / "checkpoints").load(newer, state)
    with pytest.raises(CheckpointError, match="SHA-256"):
        resolve_checkpoint(newer)
    with pytest.warns(RuntimeWarning, match="skipping corrupted checkpoint"):
        assert resolve_checkpoint(tmp_path) == older


def test_checkpoints_without_checksums_load_with_a_note(tmp_path, caplog):
    manager, _, path, state = _save_two(tmp_path)
    info = json.loads((path / MARKER).read_text())
    del info["sha256"]  # as written before checksums were recorded
    (path / MARKER).write_text(json.dumps(info))
    with caplog.at_level("WARNING", logger="dinov2"):
        assert manager.latest() == path
        manager.load(path, state)
    notes = [r.getMessage() for r in caplog.records if "before checkpoints recorded checksums" in r.getMessage()]
    assert len(notes) == 1 and str(path) in notes[0]  # verified once: latest() and load() share it


# ------------------------------------------------------------------ disk full
@contextmanager
def _shards_go_to_dev_full(monkeypatch):
    """DCP shard writes land on /dev/full: the real ENOSPC a full disk gives, nothing else changed."""
    original = dcp_filesystem.FileSystem.create_stream

    @contextmanager
    def create_stream(self, path, mode):
        if str(path).endswith(".distcp") and "w" in mode:
            with open("/dev/full", mode) as stream:
                yield stream
        else:
            with original(self, path, mode) as stream:
                yield stream

    monkeypatch.setattr(dcp_filesystem.FileSystem, "create_stream", create_stream)
    yield


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@needs_dev_full
def test_disk_full_during_a_checkpoint_says_so_and_removes_the_partial_one(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    state = {"extra": {"weights": torch.randn(50000)}}
    good = manager.save(1, state)
    with _shards_go_to_dev_full(monkeypatch):
        with pytest.raises(
            CheckpointError,
            match=rf"cannot write checkpoint {tmp_path / 'ckpt_00000002'}: "
            r"no space left on device while writing .*\.tmp_ckpt_00000002",
        ):
            manager.save(2, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001"]
    assert manager.latest() == good


@needs_dev_full
def test_disk_full_during_an_export_says_so_and_keeps_the_previous_files(tmp_path):
    model = _tiny_model()
    exports = tmp_path / "exports"
    first = export_teacher_backbone(model, exports / "teacher_backbone_00000001.pth")
    before = (exports / LATEST_EXPORT_NAME).read_bytes()
    # The temporary files the writers will create are links to /dev/full: real short writes.
    target = exports / "teacher_backbone_00000002.pth"
    temporary = exports / f".{target.name}.tmp{os.getpid()}"
    temporary.symlink_to("/dev/full")
    with pytest.raises(OSError, match=rf"no space left on device.*while writing {target}") as caught:
        export_teacher_backbone(model, target)  # torch.save: "enforce fail at inline_container.cc ... unexpected pos"
    assert caught.value.errno == errno.ENOSPC
    latest_tmp = exports / f".{LATEST_EXPORT_NAME}.tmp{os.getpid()}"
    latest_tmp.symlink_to("/dev/full")
    with pytest.raises(OSError, match=rf"no space left on device while writing {exports / LATEST_EXPORT_NAME}"):
        export_teacher_backbone(model, target)  # the copy to teacher_backbone_latest.pth: OSError(ENOSPC)
    assert sorted(p.name for p in exports.iterdir()) == sorted([first.name, target.name, LATEST_EXPORT_NAME])
    assert (exports / LATEST_EXPORT_NAME).read_bytes() == before
    text = tmp_path / "notes.txt"
    (tmp_path / f".notes.txt.tmp{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(OSError, match="no space left on device"):
        atomic_write_text(text, "x" * 100000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports"]


# ------------------------------------------------------------------ model mismatch
def test_loading_into_another_model_names_every_mismatched_key(tmp_path):
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    for parameter in model.student.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, {"train": ModelOptimizerState(model, optimizer)})
    # One block fewer (unexpected), a separate iBOT head (missing) and fewer prototypes (shapes).
    other = _tiny_model("student.depth=1", "ibot.separate_head=true", "dino.head_n_prototypes=32")
    other_optimizer = torch.optim.AdamW(other.student.parameters(), lr=1e-3)
    with pytest.raises(CheckpointError) as caught:
        manager.load(path, {"train": ModelOptimizerState(other, other_optimizer)})
    message = str(caught.value)
    assert "CheckpointException" not in message and "nothing was loaded" in message
    saved, wanted = model.state_dict(), other.state_dict()
    unexpected = [k for k in saved if k not in wanted]
    missing = [k for k in wanted if k not in saved]
    reshaped = [k for k in wanted if k in saved and saved[k].shape != wanted[k].shape]
    assert unexpected and missing and reshaped
    assert any(".blocks.1." in k for k in unexpected) and any("ibot_head" in k for k in missing)
    for key in unexpected + missing:
        assert f"    train.model.{key}\n" in message + "\n", key
    for key in reshaped:
        assert (
            f"train.model.{key}: checkpoint {tuple(saved[key].shape)} vs this run {tuple(wanted[key].shape)}" in message
        )
    # The optimizer state of the removed block is unexpected too.
    assert "train.optimizer.state.student.backbone.blocks.1.attn.qkv.weight.exp_avg" in message
    # The model is untouched.
    assert torch.equal(other.state_dict()["student.backbone.cls_token"], wanted["student.backbone.cls_token"])


def test_resume_with_another_depth_lists_the_blocks_it_lacks(trained_run, data_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with pytest.raises(CheckpointError) as caught:
        main(
            ["--output-dir", str(run), *tiny_overrides(data_root, *TRAIN, "train.max_iterations=4", "student.depth=1")]
        )
    message = str(caught.value)
    for name in ("student", "teacher"):
        for parameter in ("norm1.weight", "attn.qkv.weight", "mlp.fc2.bias"):
            assert f"train.model.{name}.backbone.blocks.1.{parameter}" in message, (name, parameter)


# ------------------------------------------------------------------ two ranks
_TWO_RANK_WORKER = """
import json, os, sys, warnings
import torch
from dinov2 import distributed
from dinov2.checkpoint import CheckpointError, CheckpointManager

directory, out = sys.argv[1], sys.argv[2]
distributed.enable("gloo")
rank = distributed.get_rank()
manager = CheckpointManager(directory, keep_last=0)
state = {"extra": {f"rank_{rank}": torch.full((20000,), float(rank + 1))}}
older, newer = manager.save(1, state), manager.save(2, state)
if rank == 0:  # 4 KB of rank 1's shard overwritten in place: only rank 1 hashes it
    shard = newer / "__1_0.distcp"
    with open(shard, "r+b") as handle:
        handle.seek(shard.stat().st_size // 2)
        handle.write(os.urandom(4096))
distributed.barrier()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    chosen = manager.latest()
try:
    manager.load(newer, state)
    refused = ""
except CheckpointError as error:
    refused = str(error)
with open(f"{out}.{rank}.json", "w") as handle:
    json.dump({"chosen": str(chosen), "warnings": [str(w.message) for w in caught], "refused": refused}, handle)
distributed.disable()
"""


def test_two_ranks_share_the_checksum_work_and_agree_on_a_corrupted_shard(tmp_path):
    from distributed_helpers import run, torchrun_command

    from dinov2.distributed import free_port

    worker = tmp_path / "worker.py"
    worker.write_text(_TWO_RANK_WORKER)
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "result"
    result = run(
        torchrun_command(2, str(worker), [str(checkpoints), str(out)], free_port()), tmp_path / "log.txt", timeout=180
    )
    assert result.returncode == 0, (tmp_path / "log.txt").read_text()[-3000:]
    ranks = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(2)]
    shard = checkpoints / "ckpt_00000002" / "__1_0.distcp"
    for rank, seen in enumerate(ranks):
        assert seen["chosen"] == str(checkpoints / "ckpt_00000001"), rank
        assert f"{shard} does not match its recorded SHA-256" in seen["refused"], rank
    assert any("skipping corrupted checkpoint" in w and str(shard) in w for w in ranks[0]["warnings"])
