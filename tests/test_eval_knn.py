import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dinov2.eval.knn import knn_classify, knn_search, sample_few_shot, vote

KS = (1, 3, 10, 20)
T = 0.07


def brute_force(queries, bank, labels, ks, temperature, num_classes):
    """Full similarity matrix, exact top-k by (-similarity, index), weighted votes in numpy."""
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    b = torch.nn.functional.normalize(bank.float(), dim=1)
    sims = (q @ b.T).numpy()
    labels = labels.numpy()
    neighbours, scores = [], {k: np.zeros((len(sims), num_classes)) for k in ks}
    for row, s in enumerate(sims):
        order = np.lexsort((np.arange(len(s)), -s))[: max(ks)]
        neighbours.append(order)
        for k in ks:
            for j in order[:k]:
                scores[k][row, labels[j]] += np.exp(np.float64(s[j]) / temperature)
    for k in ks:
        scores[k] /= scores[k].sum(axis=1, keepdims=True)
    return np.array(neighbours), sims, scores


def tie_features(n, dim=16, seed=0):
    """Entries +-1 (norm 4 in 16-d): normalised dot products are exact multiples of 1/16,
    so ties are exact and frequent whatever the summation order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, dim), generator=g).float() * 2 - 1


def check_against_reference(queries, bank, labels, num_classes, **chunks):
    neighbours, sims, ref_scores = brute_force(queries, bank, labels, KS, T, num_classes)
    top_sims, top_idx, top_labels = knn_search(queries, bank, labels, torch.arange(len(bank)), max(KS), **chunks)
    np.testing.assert_array_equal(top_idx.numpy(), neighbours)
    np.testing.assert_array_equal(top_labels.numpy(), labels.numpy()[neighbours])
    np.testing.assert_allclose(top_sims.numpy(), np.take_along_axis(sims, neighbours, axis=1), rtol=0, atol=1e-6)
    scores = knn_classify(queries, bank, labels, ks=KS, temperature=T, num_classes=num_classes, **chunks)
    for k in KS:
        np.testing.assert_allclose(scores[k].numpy(), ref_scores[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "chunks", [{}, {"query_chunk_size": 7, "bank_chunk_size": 13}, {"query_chunk_size": 1, "bank_chunk_size": 25}]
)
def test_knn_matches_brute_force_on_random_features(chunks):
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(300, 24, generator=g), torch.randn(40, 24, generator=g)
    labels = torch.randint(0, 6, (300,), generator=g)
    check_against_reference(queries, bank, labels, 6, **chunks)


@pytest.mark.parametrize(
    "chunks", [{}, {"query_chunk_size": 5, "bank_chunk_size": 11}, {"query_chunk_size": 3, "bank_chunk_size": 1}]
)
def test_knn_ties_resolved_like_brute_force(chunks):
    bank, queries = tie_features(200, seed=2), tie_features(30, seed=3)
    bank[100:150] = bank[:50]  # exact duplicates: equal similarities for every query
    labels = torch.arange(200) % 7
    neighbours, sims, _ = brute_force(queries, bank, labels, KS, T, 7)
    # the test is only meaningful if ties straddle the k-th place
    kth = np.take_along_axis(sims, neighbours[:, -1:], axis=1)
    assert ((sims >= kth).sum(axis=1) > max(KS)).sum() > 10
    check_against_reference(queries, bank, labels, 7, **chunks)


def test_block_topk_equals_topk_on_wide_blocks():
    from dinov2.eval.knn import _block_topk

    g = torch.Generator().manual_seed(4)
    for rows, width, n in ((7, 5003, 21), (5, 4096, 11), (3, 40000, 201)):  # tails of 11 and 0 columns
        sims = torch.randn(rows, width, generator=g)
        values, positions = _block_topk(sims, n)
        expected = sims.topk(n, dim=1)
        assert torch.equal(values, expected.values)
        assert torch.equal(sims.gather(1, positions), values)
        assert all(len(set(row.tolist())) == n for row in positions)  # n distinct columns
    sims = torch.zeros(2, 5003)
    sims[0, -3:] = 1.0  # the best values in the tail columns
    sims[1, ::7] = 0.5
    values, positions = _block_topk(sims, 21)
    assert torch.equal(values, sims.topk(21, dim=1).values)
    assert set(positions[0, :3].tolist()) == {5000, 5001, 5002}


@pytest.mark.parametrize("chunks", [{}, {"query_chunk_size": 16, "bank_chunk_size": 2500}])
def test_knn_on_a_bank_wide_enough_for_grouped_selection(chunks):
    """Blocks of thousands of columns take the grouped top-k path; ties must still resolve by index."""
    g = torch.Generator().manual_seed(6)
    bank, queries = torch.randn(3000, 24, generator=g), torch.randn(30, 24, generator=g)
    labels = torch.randint(0, 6, (3000,), generator=g)
    check_against_reference(queries, bank, labels, 6, **chunks)
    bank, queries = tie_features(3000, seed=9), tie_features(20, seed=10)
    bank[1500:] = bank[:1500]
    check_against_reference(queries, bank, torch.arange(3000) % 7, 7, **chunks)


def test_vote_weights_and_class_tie_rule():
    sims = torch.tensor([[0.5, 0.5, 0.1], [0.9, 0.2, 0.2]])
    labels = torch.tensor([[2, 0, 1], [1, 0, 2]])
    scores = vote(sims, labels, [2, 3], temperature=0.1, num_classes=3)
    e = np.exp
    expected3 = np.array([[e(5), e(1), e(5)], [e(2), e(9), e(2)]])
    expected3 /= expected3.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(scores[3].numpy(), expected3, rtol=1e-6)
    np.testing.assert_allclose(scores[2][0].numpy(), [0.5, 0.0, 0.5], rtol=1e-6)


def test_bank_smaller_than_k_is_padded_and_neighbours_are_real():
    bank, labels = torch.randn(4, 8), torch.tensor([0, 1, 1, 0])
    sims, idx, _ = knn_search(torch.randn(3, 8), bank, labels, torch.arange(4), k=6, bank_chunk_size=3)
    assert (idx[:, :4].sort(dim=1).values == torch.arange(4)).all()
    assert torch.isinf(sims[:, 4:]).all()
    with pytest.raises(ValueError, match="same D"):
        knn_search(torch.randn(3, 5), bank, labels, torch.arange(4), k=2)


def test_few_shot_sampling_is_seeded_and_per_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    indices = np.arange(100, 120)
    a = sample_few_shot(labels, indices, 5, seed=0)
    assert len(a) == 5 + 3 + 5
    assert np.array_equal(a, sample_few_shot(labels[::-1], indices[::-1], 5, seed=0))  # input order irrelevant
    assert not np.array_equal(a, sample_few_shot(labels, indices, 5, seed=1))
    chosen = labels[a - 100]
    assert np.bincount(chosen).tolist() == [5, 3, 5]


# ------------------------------------------------------------------------ 2 gloo ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world_size, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from dinov2.eval import _dist
    from dinov2.eval.features import FeatureSet, gather_feature_set

    assert _dist.init_from_env(torch.device("cpu"))
    try:
        # random features (uneven shards: 301 rows) and tie-heavy features
        g = torch.Generator().manual_seed(5)
        cases = [
            (
                torch.randn(301, 16, generator=g),
                torch.randn(23, 16, generator=g),
                torch.randint(0, 5, (301,), generator=g),
                5,
            ),
            (tie_features(150, seed=7), tie_features(20, seed=8), torch.arange(150) % 4, 4),
        ]
        cases[1][0][75:] = cases[1][0][:75]
        for bank, queries, labels, num_classes in cases:
            neighbours, _, ref_scores = brute_force(queries, bank, labels, KS, T, num_classes)
            shard = torch.arange(rank, len(bank), world_size)
            for chunks in ({}, {"query_chunk_size": 4, "bank_chunk_size": 9}):
                _, idx, _ = knn_search(queries, bank[shard], labels[shard], shard, max(KS), **chunks)
                np.testing.assert_array_equal(idx.numpy(), neighbours)
                scores = knn_classify(queries, bank[shard], labels[shard], shard, KS, T, num_classes, **chunks)
                for k in KS:
                    np.testing.assert_allclose(scores[k].numpy(), ref_scores[k], rtol=1e-5, atol=1e-6)
        # one rank with an empty shard (a 1-sample bank) still merges correctly
        tiny = torch.randn(1, 16, generator=g)
        shard = torch.arange(rank, 1, world_size)
        _, idx, _ = knn_search(queries, tiny[shard], torch.zeros(len(shard), dtype=torch.long), shard, 3)
        assert (idx[:, 0] == 0).all() and (idx[:, 1:] == torch.iinfo(torch.long).max).all()
        # gathering feature slices back into dataset order
        local = FeatureSet(
            torch.full((3 - rank, 2), float(rank)), torch.tensor([rank] * (3 - rank)), torch.arange(rank, 5, 2)
        )
        full = gather_feature_set(local)
        assert full.indices.tolist() == [0, 1, 2, 3, 4]
        assert full.features[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
        dist.barrier()
    finally:
        _dist.destroy()


def test_knn_two_gloo_ranks_match_brute_force():
    mp.spawn(_rank_worker, args=(2, _free_port()), nprocs=2, join=True)
