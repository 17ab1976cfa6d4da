"""Training on WebDataset shards: a resumed run trains on exactly the batches of an uninterrupted one."""

import io
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image
from train_helpers import TINY_OVERRIDES

from dinov2 import distributed
from dinov2.checkpoint import CheckpointManager
from dinov2.data.loaders import make_data_loader, make_dataset
from dinov2.train.data import build_train_data_loader
from dinov2.train.trainer import DataExhaustedError, SSLTrainer
from dinov2.utils.config import load_config


@pytest.fixture(scope="module")
def shard_spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for s in range(6):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar")) as sink:
            for k in range(4 + s % 2):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buffer, format="PNG")
                sink.write({"__key__": f"s{s}_{k}", "png": buffer.getvalue(), "cls": k % 2})
    return f"WebDataset:urls={root}/train-{{000000..000005}}.tar:shuffle=3:repeat=true:seed=2"


def _recorded_run(cfg, output_dir):
    """Train with ``cfg``; returns the trainer and {iteration: (global crops, total loss)}."""
    trainer = SSLTrainer(cfg, output_dir=output_dir)
    seen = {}
    original = trainer.train_step

    def recording_step(batch):
        result = original(batch)
        seen[trainer.iteration + 1] = (batch["collated_global_crops"].clone(), result["losses"]["total_loss"])
        return result

    trainer.train_step = recording_step
    trainer.train()
    return trainer, seen


def test_resumed_webdataset_run_trains_on_the_same_batches(tmp_path, shard_spec):
    # 27 samples, 3 shards (13 or 14 samples) per loader worker: in 7 iterations of 4, the first
    # worker delivers 16 samples and goes round its shards a second time.
    common = [
        f"train.dataset_path={shard_spec}",
        *TINY_OVERRIDES,
        "train.num_workers=2",
        "checkpointing.period_iterations=100",
    ]
    _, straight = _recorded_run(load_config(None, [*common, "train.max_iterations=7"]), tmp_path / "straight")
    # Stopped after 3 iterations (an odd number of batches: the next one is the second worker's).
    _recorded_run(load_config(None, [*common, "train.max_iterations=3"]), tmp_path / "resumed")
    resumed_trainer, resumed = _recorded_run(
        load_config(None, [*common, "train.max_iterations=7"]), tmp_path / "resumed"
    )
    assert resumed_trainer.resumed_from is not None and resumed_trainer.resumed_from.name == "ckpt_00000003"
    assert sorted(resumed) == [4, 5, 6, 7]
    for iteration, (crops, loss) in resumed.items():
        assert torch.equal(crops, straight[iteration][0]), iteration  # same samples, same crops
        assert loss == pytest.approx(straight[iteration][1], rel=1e-6, abs=1e-7), iteration
    assert resumed_trainer.loader.state_dict()["consumed_samples"] == 7 * 4


def test_a_stream_that_ends_before_the_run_stops_it_with_a_clear_error(tmp_path, shard_spec):
    once = shard_spec.replace(":repeat=true", "")  # 27 samples: 6 batches of 4
    cfg = load_config(None, [f"train.dataset_path={once}", *TINY_OVERRIDES, "train.max_iterations=10"])
    trainer = SSLTrainer(cfg, output_dir=tmp_path)
    with pytest.raises(DataExhaustedError, match=r"ran out after iteration 6 of 10 \(on this rank\).*:repeat=true"):
        trainer.train()


def test_training_needs_a_shard_per_reader(shard_spec):
    cfg = load_config(None, [f"train.dataset_path={shard_spec}", *TINY_OVERRIDES, "train.num_workers=4"])
    with pytest.raises(ValueError, match=r"6 shard\(s\) for 2 rank\(s\) x 4 loader worker\(s\)"):
        build_train_data_loader(cfg, patch_size=4, rank=1, world_size=2)


def _two_rank_stream_resume(rank, spec, checkpoints, port, results):
    """One rank of a gloo job with 2 loader workers: the straight stream, then one stopped after 5
    batches, checkpointed through the CheckpointManager (DCP across both ranks) and resumed in a
    new loader. The state saved is the same on both ranks (they consume batches in lockstep)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    distributed.enable("gloo")

    def loader():  # rank and world size come from the process group
        return make_data_loader(
            make_dataset(spec),
            batch_size=2,
            num_workers=2,
            persistent_workers=True,
            collate_fn=lambda samples: [int(np.asarray(image)[0, 0, 0]) for image, _ in samples],
        )

    def take(source, count):
        iterator = iter(source)
        return [next(iterator) for _ in range(count)]

    straight = take(loader(), 12)
    interrupted = loader()
    take(interrupted, 5)
    manager = CheckpointManager(checkpoints)
    path = manager.save(5, {"extra": {"sampler": interrupted.state_dict()}})
    resumed = loader()
    state = {"extra": {"sampler": resumed.state_dict()}}
    manager.load(path, state)
    resumed.load_state_dict(state["extra"]["sampler"])
    with open(os.path.join(results, f"rank{rank}.json"), "w") as handle:
        json.dump({"straight": straight, "resumed": take(resumed, 7)}, handle)
    distributed.disable()


def test_two_rank_webdataset_stream_resumes_through_a_checkpoint(tmp_path):
    for s in range(4):
        with wds.TarWriter(str(tmp_path / f"t-{s:06d}.tar")) as sink:
            for k in range(5 + s):
                buffer = io.BytesIO()
                Image.new("L", (4, 4), 10 * s + k).save(buffer, format="PNG")
                sink.write({"__key__": f"s{s}_{k}", "png": buffer.getvalue()})
    spec = f"WebDataset:urls={tmp_path}/t-{{000000..000003}}.tar:shuffle=3:repeat=true:seed=1"
    # Forked, not spawned: a fresh interpreter per rank would spend most of the test importing torch.
    args = (spec, str(tmp_path / "checkpoints"), distributed.free_port(), str(tmp_path))
    mp.start_processes(_two_rank_stream_resume, args=args, nprocs=2, start_method="fork")
    runs = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for run in runs:
        # 12 samples per loader worker, whose one shard holds 5 to 8: two passes or more.
        assert run["resumed"] == run["straight"][5:]
    seen = [{n for batch in run["straight"] for n in batch} for run in runs]
    assert not seen[0] & seen[1]  # each rank reads its own shards
