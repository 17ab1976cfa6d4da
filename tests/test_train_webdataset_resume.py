"""Training on WebDataset shards: a resumed run trains on exactly the batches of an uninterrupted one."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dinov2.train.trainer import SSLTrainer
from dinov2.utils.config import load_config
from train_helpers import TINY_OVERRIDES


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
    common = [f"train.dataset_path={shard_spec}", *TINY_OVERRIDES, "train.num_workers=2",
              "checkpointing.period_iterations=100"]
    _, straight = _recorded_run(load_config(None, [*common, "train.max_iterations=7"]), tmp_path / "straight")
    # Stopped after 3 iterations (an odd number of batches: the next one is the second worker's).
    _recorded_run(load_config(None, [*common, "train.max_iterations=3"]), tmp_path / "resumed")
    resumed_trainer, resumed = _recorded_run(load_config(None, [*common, "train.max_iterations=7"]),
                                             tmp_path / "resumed")
    assert resumed_trainer.resumed_from is not None and resumed_trainer.resumed_from.name == "ckpt_00000003"
    assert sorted(resumed) == [4, 5, 6, 7]
    for iteration, (crops, loss) in resumed.items():
        assert torch.equal(crops, straight[iteration][0]), iteration  # same samples, same crops
        assert loss == pytest.approx(straight[iteration][1], rel=1e-6, abs=1e-7), iteration
    assert resumed_trainer.loader.state_dict()["consumed_samples"] == 7 * 4
