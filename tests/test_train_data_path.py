"""The training loader's worker and memory options (train.num_workers, train.prefetch_factor, pinning)."""

import pytest
from train_helpers import make_image_folder, tiny_overrides

from dinov2.train.data import build_train_data_loader, loader_options
from dinov2.train.trainer import SSLTrainer
from dinov2.utils.config import load_config


def _cfg(*extra):
    return load_config(None, tiny_overrides("/nonexistent", *extra))


def test_loader_options_follow_the_config():
    assert loader_options(_cfg("train.num_workers=2", "train.prefetch_factor=4"), pin_memory=True) == {
        "num_workers": 2,
        "persistent_workers": True,
        "prefetch_factor": 4,
        "pin_memory": True,
    }
    # Without workers DataLoader takes no prefetch factor and has no workers to keep.
    assert loader_options(_cfg("train.num_workers=0")) == {
        "num_workers": 0,
        "persistent_workers": False,
        "pin_memory": False,
    }
    with pytest.raises(ValueError, match="train.prefetch_factor must be >= 1"):
        loader_options(_cfg("train.prefetch_factor=0"))


def test_the_training_loader_uses_them(tmp_path):
    data = make_image_folder(tmp_path / "images")
    cfg = load_config(None, tiny_overrides(data, "train.num_workers=1", "train.prefetch_factor=3"))
    loader, _ = build_train_data_loader(cfg, patch_size=4, rank=0, world_size=1, pin_memory=True)
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers, loader.pin_memory) == (
        1,
        3,
        True,
        True,
    )
    # The trainer pins only when it trains on CUDA (pinned host memory makes its copies asynchronous).
    trainer = SSLTrainer(load_config(None, tiny_overrides(data)), output_dir=tmp_path / "run")
    assert trainer.device.type == "cpu" and not trainer.loader.pin_memory


def test_the_loading_benchmark_says_whether_loading_bounds_the_step():
    from dinov2_tools.data_loading_benchmark import bound_verdict

    assert bound_verdict(100.0, 2, 300.0).startswith("bounds the step: 3.00x slower")
    assert bound_verdict(600.0, 2, 300.0).startswith("keeps up")
    # In the main process loading is never hidden: 300 images/s of steps and 600 of loading add 50%.
    assert bound_verdict(600.0, 0, 300.0).startswith("main-process loading adds 50%")
