import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.data.image_io import SKIPPED_KEY, BadImageError, SkipBadSamples
from dinov2.data.loaders import make_data_loader, make_dataset
from dinov2.data.samplers import EpochSampler, InfiniteSampler


class Numbers(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def _take(sampler, k):
    return list(itertools.islice(iter(sampler), k))


def test_infinite_sampler_ranks_are_disjoint_and_cover_each_epoch():
    ranks = [_take(InfiniteSampler(10, seed=3, rank=r, world_size=2), 10) for r in range(2)]
    first_epoch = ranks[0][:5] + ranks[1][:5]
    assert sorted(first_epoch) == list(range(10))
    assert not set(ranks[0][:5]) & set(ranks[1][:5])
    # Epochs are reshuffled, deterministically from the seed.
    single = _take(InfiniteSampler(10, seed=3, rank=0, world_size=1), 20)
    assert single[:10] != single[10:] and sorted(single[10:]) == list(range(10))
    assert single == _take(InfiniteSampler(10, seed=3, world_size=1, rank=0), 20)
    assert _take(InfiniteSampler(5, shuffle=False, rank=0, world_size=1), 7) == [0, 1, 2, 3, 4, 0, 1]


def test_resume_with_another_world_size_continues_the_global_stream():
    reference = _take(InfiniteSampler(7, seed=1, rank=0, world_size=1), 40)
    # Two ranks consume 6 samples each (12 global), then the run resumes on three ranks.
    state = {"consumed_samples": 12, "sample_count": 7, "seed": 1, "shuffle": 1}
    resumed = []
    for r in range(3):
        sampler = InfiniteSampler(7, seed=1, rank=r, world_size=3)
        sampler.load_state_dict(state)
        resumed.append(_take(sampler, 8))
    interleaved = [resumed[g % 3][g // 3] for g in range(24)]
    assert interleaved == reference[12:36]
    with pytest.raises(ValueError, match="seed=1 but this sampler has seed=2"):
        InfiniteSampler(7, seed=2, rank=0, world_size=1).load_state_dict(state)


def test_loader_state_counts_received_batches_despite_prefetch():
    dataset = Numbers(23)
    loader = make_data_loader(
        dataset, batch_size=4, num_workers=2, seed=5, sampler_type="infinite", rank=0, world_size=1
    )
    iterator = iter(loader)
    seen = [next(iterator).tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state["consumed_samples"] == 12 and all(isinstance(v, int) for v in state.values())
    following = [next(iterator).tolist() for _ in range(2)]
    del iterator
    resumed = make_data_loader(
        dataset, batch_size=4, num_workers=0, seed=5, sampler_type="infinite", rank=0, world_size=1
    )
    resumed.load_state_dict(state)
    again = iter(resumed)
    assert [next(again).tolist() for _ in range(2)] == following
    assert seen[0] != following[0]


def test_epoch_sampler_splits_without_duplicates():
    parts = [list(EpochSampler(11, shuffle=True, seed=2, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))
    assert [len(EpochSampler(11, rank=r, world_size=3)) for r in range(3)] == [4, 4, 3]
    sampler = EpochSampler(11, shuffle=True, seed=2, rank=0, world_size=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(list(sampler)) == list(range(11))


def test_epoch_and_distributed_loaders_cover_the_dataset():
    dataset = Numbers(10)
    for kind in ("epoch", "distributed"):
        batches = [
            make_data_loader(
                dataset, batch_size=3, sampler_type=kind, shuffle=False, drop_last=False, rank=r, world_size=2
            )
            for r in range(2)
        ]
        seen = sorted(int(v) for loader in batches for batch in loader for v in batch)
        assert seen == list(range(10))


def _folder_with_a_corrupted_image(root):
    for k in range(6):
        (root / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (k * 30, 0, 0)).save(root / "a" / f"{k}.jpg")
    bad = root / "a" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:120])
    return bad


def _dict_collate(samples):
    return {
        "images": torch.stack([torch.as_tensor(np.asarray(s[0])) for s in samples]),
        "targets": torch.tensor([s[1] for s in samples]),
    }


def test_skip_policy_counts_reach_the_loop_across_workers(tmp_path):
    bad = _folder_with_a_corrupted_image(tmp_path)
    dataset = make_dataset(f"ImageFolder:root={tmp_path}:bad_images=skip:cache=false")
    loader = make_data_loader(
        dataset,
        batch_size=2,
        num_workers=2,
        sampler_type="epoch",
        shuffle=False,
        drop_last=False,
        collate_fn=_dict_collate,
        rank=0,
        world_size=1,
    )
    skipped, images = 0, 0
    for batch in loader:
        skipped += batch.pop(SKIPPED_KEY)
        images += len(batch.get("images", []))
    assert skipped == 1 and images == 5
    assert bad.name == "3.jpg"


def test_raise_policy_error_names_the_file_from_a_worker(tmp_path):
    bad = _folder_with_a_corrupted_image(tmp_path)
    dataset = make_dataset(f"ImageFolder:root={tmp_path}:cache=false")
    loader = make_data_loader(
        dataset,
        batch_size=2,
        num_workers=1,
        sampler_type="epoch",
        shuffle=False,
        collate_fn=_dict_collate,
        rank=0,
        world_size=1,
    )
    with pytest.raises(BadImageError, match=str(bad)):
        for _ in loader:
            pass


def test_skip_collate_edge_cases():
    collate = SkipBadSamples()
    assert collate([None, None]) == {SKIPPED_KEY: 2}
    images, targets = collate([(torch.zeros(2), 1), None, (torch.ones(2), 0)])
    assert images.shape == (2, 2) and targets.tolist() == [1, 0]
    assert collate([{"x": torch.zeros(1)}, None])[SKIPPED_KEY] == 1
