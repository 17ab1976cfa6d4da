"""Single-process tests of the distributed helpers, the checkpoint manager, stop signals and the
submitit job wrapper, and one two-process load check (the multi-process training runs are in
test_distributed_training.py)."""

import os
import pickle
import random
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_helpers import TINY_MODEL  # noqa: E402

from dinov2 import distributed  # noqa: E402
from dinov2.checkpoint import (  # noqa: E402
    MARKER,
    CheckpointError,
    CheckpointManager,
    ModelOptimizerState,
    RNGState,
    capture_rng_state,
    checkpoint_keys,
    derive_seed,
    seed_all,
)
from dinov2.checkpoint.consolidate import consolidate_checkpoint, resolve_checkpoint  # noqa: E402
from dinov2.checkpoint.signals import StopSignal  # noqa: E402
from dinov2.train.ssl_meta_arch import SSLMetaArch  # noqa: E402
from dinov2.utils.config import load_config  # noqa: E402


# ------------------------------------------------------------------ environment
def test_environment_from_torchrun_variables():
    env = distributed.read_environment(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node7",
            "MASTER_PORT": "1234",
            "SLURM_PROCID": "0",
            "SLURM_STEP_NUM_TASKS": "1",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        3,
        8,
        1,
        "node7",
        1234,
        "torchrun",
    )


def test_environment_from_a_slurm_step():
    slurm = {
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "vm",
        "SLURM_JOB_ID": "4711",
        "SLURM_STEP_TASKS_PER_NODE": "2",
    }
    env = distributed.read_environment(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (1, 2, 1, 2, "slurm")
    assert env.master_addr == "127.0.0.1"  # one node: loopback
    assert env.master_port == distributed.slurm_master_port("4711") == 20000 + 4711
    assert distributed.read_environment(dict(slurm, MASTER_PORT="999")).master_port == 999
    # an sbatch/salloc shell (no srun step) is one process, whatever --ntasks says
    batch_shell = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"}
    assert distributed.read_environment(batch_shell).source == "single"


def test_single_process_has_no_process_group():
    env = distributed.enable("auto")
    assert env.world_size == 1 and not distributed.is_enabled()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1 and distributed.is_main_process()
    assert distributed.get_device() == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    t = torch.tensor([2.0, 4.0])
    assert torch.equal(distributed.all_reduce_mean(t), torch.tensor([2.0, 4.0]))
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    distributed.barrier()
    with pytest.raises(ValueError, match="distributed.backend"):
        distributed._resolve_backend("mpi")


# ------------------------------------------------------------------ checkpoints
def _tiny_model():
    cfg = load_config(None, TINY_MODEL)
    model = SSLMetaArch(cfg)
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    return model, optimizer


def _one_step(model, optimizer):
    batch = 2
    masks = torch.zeros(2 * batch, 16, dtype=torch.bool)
    masks[:, :3] = True
    indices = masks.flatten().nonzero().flatten()
    data = {
        "collated_global_crops": torch.randn(2 * batch, 3, 16, 16),
        "collated_local_crops": torch.randn(2 * batch, 3, 8, 8),
        "collated_masks": masks,
        "mask_indices_list": indices,
        "n_masked_patches": torch.tensor(indices.numel()),
        "masks_weight": torch.full((indices.numel(),), 1 / 3),
    }
    optimizer.zero_grad()
    model.forward_backward(data, teacher_temp=0.07)
    optimizer.step()
    model.update_teacher(0.9)


def test_save_and_load_restore_model_optimizer_centres_extra_and_rng(tmp_path):
    model, optimizer = _tiny_model()
    _one_step(model, optimizer)
    assert not torch.equal(model.dino_loss.center, torch.zeros_like(model.dino_loss.center))
    manager = CheckpointManager(tmp_path)
    extra = {"iteration": 1, "sampler": {"consumed_samples": 8, "seed": 0}}
    seed_all(5, 0, 1)
    path = manager.save(1, {"train": ModelOptimizerState(model, optimizer), "extra": extra, "rng": RNGState(0)})
    expected_draws = (torch.rand(3), np.random.rand(2), random.random())
    keys = checkpoint_keys(path)
    assert "train.model.dino_loss.center" in keys and "train.model.ibot_patch_loss.center" in keys
    assert "train.model.teacher.backbone.cls_token" in keys and "rng.rank_0.torch" in keys

    fresh_model, fresh_optimizer = _tiny_model()
    fresh_extra = {"iteration": 0, "sampler": {"consumed_samples": 0, "seed": 0}}
    rng = RNGState(0)
    seed_all(123)
    info = manager.load(
        manager.latest(), {"train": ModelOptimizerState(fresh_model, fresh_optimizer), "extra": fresh_extra, "rng": rng}
    )
    assert info["iteration"] == 1 and info["world_size"] == 1
    assert fresh_extra == extra and not rng.reseeded
    draws = (torch.rand(3), np.random.rand(2), random.random())
    assert (
        torch.equal(draws[0], expected_draws[0])
        and np.array_equal(draws[1], expected_draws[1])
        and draws[2] == expected_draws[2]
    )
    for (name, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(a, b), name
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for index in saved:
        for key in saved[index]:
            assert torch.equal(saved[index][key], loaded[index][key])
    # both continue identically
    torch.manual_seed(9)
    _one_step(model, optimizer)
    torch.manual_seed(9)
    _one_step(fresh_model, fresh_optimizer)
    assert torch.equal(model.teacher["backbone"].cls_token, fresh_model.teacher["backbone"].cls_token)


def test_model_mismatch_is_an_error(tmp_path):
    model, optimizer = _tiny_model()
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, {"train": ModelOptimizerState(model, optimizer)})
    smaller = load_config(None, TINY_MODEL + ["ibot.separate_head=true"])
    other = SSLMetaArch(smaller)
    with pytest.raises(CheckpointError, match="ibot_head"):  # the file lacks the separate iBOT head
        manager.load(path, {"train": ModelOptimizerState(other)})
    linear = torch.nn.Linear(3, 3)
    with pytest.raises(CheckpointError, match="model entries this model does not have"):
        manager.load(path, {"train": ModelOptimizerState(linear)})


def _load_that_fits_one_rank_only(rank, init_file, directory):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        manager = CheckpointManager(directory)
        path = manager.save(1, {"extra": {"w": torch.arange(4.0)}})
        try:  # rank 1 asks for another shape, as a rank training another student would
            manager.load(path, {"extra": {"w": torch.zeros(4 if rank == 0 else 5)}})
            outcome = "loaded"
        except CheckpointError as error:
            outcome = str(error)
        (Path(directory) / f"rank{rank}.txt").write_text(outcome)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_that_does_not_fit_one_rank_is_refused_on_every_rank(tmp_path):
    # The ranks whose part fits must not wait in dcp.load for the one that gave up.
    import torch.multiprocessing as mp

    ranks = mp.start_processes(
        _load_that_fits_one_rank_only,
        args=(str(tmp_path / "pg_init"), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
        join=False,
    )
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=2):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("a rank is still waiting in the checkpoint load after 120 s")
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].startswith("rank 1: checkpoint") and "extra.w" in outcomes[0] and "rank 0" not in outcomes[0]


def test_rng_reseeds_deterministically_when_the_rank_was_not_saved():
    rng = RNGState(seed=11)
    assert rng.template_for_load(["rng.rank_1.torch"], "rng", iteration=40) == {}
    rng.load_state_dict({})
    assert rng.reseeded
    after_reseed = capture_rng_state()
    seed_all(11, 0, 40)
    expected = capture_rng_state()
    assert torch.equal(after_reseed["torch"], expected["torch"])
    assert torch.equal(after_reseed["numpy_keys"], expected["numpy_keys"])


def test_a_checkpoint_saved_without_cuda_resumes_on_a_cuda_machine(monkeypatch):
    # A run started on a laptop's CPU, resumed on a GPU node: there is no CUDA generator state to
    # ask the checkpoint for; the CPU generators are restored and the device is seeded as a rank
    # without any saved state would be.
    saved = capture_rng_state()
    assert "cuda" not in saved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.zeros(8, dtype=torch.uint8))
    seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed", seeds.append)
    rng = RNGState(seed=11)
    assert "cuda" in rng.state_dict()["rank_0"]  # what a CUDA machine saves
    keys = [f"rng.rank_0.{name}" for name in saved]
    template = rng.template_for_load(keys, "rng", iteration=40)
    assert set(template["rank_0"]) == set(saved)
    rng.load_state_dict({"rank_0": saved})
    assert not rng.reseeded and seeds == [derive_seed(11, 0, 40)]
    assert torch.equal(torch.get_rng_state(), saved["torch"])


def test_retention_keeps_last_k_and_every_mth(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=3)
    for iteration in range(1, 8):
        manager.save(iteration, {"extra": {"iteration": iteration}})
    assert [i for i, _ in manager.complete_checkpoints()] == [3, 6, 7]
    assert manager.to_delete([1, 2, 3]) == [1]
    assert CheckpointManager(tmp_path, keep_last=0).to_delete([1, 2, 3]) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000003", "ckpt_00000006", "ckpt_00000007"]


def test_latest_skips_incomplete_and_truncated_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=0)
    tensor_state = {"extra": {"iteration": 0, "weights": torch.randn(1000)}}
    good = manager.save(2, tensor_state)
    truncated = manager.save(3, tensor_state)
    unmarked = manager.save(4, tensor_state)
    (unmarked / MARKER).unlink()
    shard = next(truncated.glob("*.distcp"))
    with open(shard, "r+b") as handle:
        handle.truncate(10)
    (tmp_path / ".tmp_ckpt_00000009").mkdir()
    with pytest.warns(RuntimeWarning, match="skipping incomplete checkpoint") as caught:
        assert manager.latest() == good
    messages = " ".join(str(w.message) for w in caught)
    assert "truncated" in messages and "marker" in messages
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        manager.load(truncated, tensor_state)
    assert CheckpointManager(tmp_path / "nothing").latest() is None


def test_loading_refuses_pickled_objects(tmp_path):
    from fractions import Fraction  # any class: unpickling it would run its module's code

    manager = CheckpointManager(tmp_path)
    path = manager.save(1, {"extra": {"payload": Fraction(1, 3)}})
    with pytest.raises(CheckpointError, match="cannot load"):
        manager.load(path, {"extra": {"payload": None}})


def test_consolidation_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)
    CheckpointManager(tmp_path / "checkpoints").save(1, {"extra": {"x": torch.ones(2)}})
    with pytest.raises(CheckpointError, match="teacher.backbone"):
        consolidate_checkpoint(tmp_path, tmp_path / "out.pth")


def test_single_process_checkpoint_consolidates_to_the_teacher(tmp_path):
    model, optimizer = _tiny_model()
    _one_step(model, optimizer)
    CheckpointManager(tmp_path / "checkpoints").save(1, {"train": ModelOptimizerState(model, optimizer)})
    written = consolidate_checkpoint(tmp_path, tmp_path / "teacher.pth")
    state = torch.load(written["backbone"], weights_only=True)
    assert state.keys() == model.teacher["backbone"].state_dict().keys()
    for key, value in model.teacher["backbone"].state_dict().items():
        assert torch.equal(state[key], value), key


# ------------------------------------------------------------------ signals
def test_stop_signal_sets_the_flag_and_restores_handlers():
    previous = signal.getsignal(signal.SIGUSR1)
    calls = []
    with StopSignal(callback=lambda: calls.append(1)) as stop:
        assert not stop.requested and not stop.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.received == signal.SIGUSR1 and calls == [1]
        assert stop.should_stop()
    assert signal.getsignal(signal.SIGUSR1) == previous


# ------------------------------------------------------------------ submitit wrapper
def test_job_runner_pickles_and_resubmits_itself(monkeypatch):
    from dinov2.run.submit import JobRunner, export_distributed_environment, resolve_target

    runner = JobRunner("dinov2.train.train:main", ["--output-dir", "x", "optim.epochs=1"])
    clone = pickle.loads(pickle.dumps(runner))
    assert clone.argv == runner.argv
    delayed = runner.checkpoint()
    assert delayed.function.argv == runner.argv and delayed.function.target == runner.target
    assert resolve_target("dinov2.train.train:main").__name__ == "main"
    with pytest.raises(ValueError, match="package.module:function"):
        resolve_target("no_colon")

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        # setenv first so that monkeypatch records the key and removes what the runner exports;
        # a bare delenv of an absent key is not recorded and would leak RANK/WORLD_SIZE into
        # every later test of the session (which then waits for a second rank forever).
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    job = SimpleNamespace(hostnames=["vm"], num_nodes=1, job_id="42", global_rank=1, num_tasks=2, local_rank=1)
    export_distributed_environment(job)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("127.0.0.1", str(20042))
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
