"""DINO / iBOT / KoLeo / InfoNCE losses, teacher targets and the DINO head, checked against small
hand-computed examples (explicit Python loops over math.exp / math.log)."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from dinov2.layers.dino_head import DINOHead, WeightNormalizedLinear, build_dino_ibot_heads
from dinov2.loss import DINOLoss, InfoNCELoss, KoLeoLoss, iBOTPatchLoss, masks_weight_from_masks, sinkhorn_knopp


def _log_softmax(row, temp):
    scaled = [v / temp for v in row]
    m = max(scaled)
    log_z = m + math.log(sum(math.exp(v - m) for v in scaled))
    return [v - log_z for v in scaled]


def _softmax(row, temp):
    return [math.exp(v) for v in _log_softmax(row, temp)]


def _cross_entropy(target, student_row, temp):
    return -sum(p * lp for p, lp in zip(target, _log_softmax(student_row, temp)))


# ---------------------------------------------------------------- DINO loss


def test_dino_loss_matches_hand_computed_pairs():
    torch.manual_seed(1)
    batch, k, n_global, n_local = 2, 4, 2, 3
    student = [torch.randn(batch, k) for _ in range(n_global + n_local)]
    teacher = [torch.softmax(torch.randn(batch, k), dim=-1) for _ in range(n_global)]

    terms = []
    for s_idx, s in enumerate(student):
        for t_idx, t in enumerate(teacher):
            if s_idx == t_idx:  # the same view is never compared with itself
                continue
            per_sample = [_cross_entropy(t[b].tolist(), s[b].tolist(), 0.1) for b in range(batch)]
            terms.append(sum(per_sample) / batch)
    expected = sum(terms) / len(terms)

    loss = DINOLoss(k, student_temp=0.1)(student, teacher)
    assert len(terms) == DINOLoss.num_pairs(5, 2) == 2 * 1 + 2 * 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # Without skipping, every pair counts, including (i, i).
    all_terms = [
        sum(_cross_entropy(t[b].tolist(), s[b].tolist(), 0.1) for b in range(batch)) / batch
        for s in student
        for t in teacher
    ]
    loss_all = DINOLoss(k)(student, teacher, skip_same_view=False)
    assert loss_all.item() == pytest.approx(sum(all_terms) / len(all_terms), rel=1e-5)


def test_dino_loss_gradient_flows_to_student_only_and_shape_errors():
    student = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    teacher = [torch.softmax(torch.randn(3, 5), -1) for _ in range(2)]
    DINOLoss(5)(student, teacher).backward()
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in student)
    with pytest.raises(ValueError, match="prototypes"):
        DINOLoss(6)(student, teacher)
    with pytest.raises(ValueError, match="no \\(student, teacher\\) pair"):
        DINOLoss(5)(student[:1], teacher[:1])


def test_softmax_centering_and_center_ema_by_hand():
    loss = DINOLoss(3, center_momentum=0.9)
    loss.center.copy_(torch.tensor([[0.5, -1.0, 0.0]]))
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    probs = loss.softmax_center_teacher(logits, teacher_temp=0.07)
    for b in range(2):
        centred = [logits[b, i].item() - loss.center[0, i].item() for i in range(3)]
        assert probs[b].tolist() == pytest.approx(_softmax(centred, 0.07), rel=1e-5, abs=1e-7)

    loss.update_center(logits)
    mean = [(1.0 + 0.0) / 2, (2.0 - 1.0) / 2, (3.0 + 4.0) / 2]
    expected = [0.9 * c + 0.1 * m for c, m in zip([0.5, -1.0, 0.0], mean)]
    assert loss.center[0].tolist() == pytest.approx(expected, rel=1e-6)
    # The centre is a buffer: it travels in state dicts (checkpoints).
    assert "center" in loss.state_dict() and "center" not in dict(loss.named_parameters())


# ---------------------------------------------------------------- Sinkhorn-Knopp


def _sinkhorn_reference(logits, temp, n_iterations):
    """Textbook loops: Q[k][b] = exp(z[b][k] / temp), normalise, alternate rows and columns."""
    n_b, n_k = len(logits), len(logits[0])
    q = [[math.exp(logits[b][k] / temp) for b in range(n_b)] for k in range(n_k)]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(n_iterations):
        q = [[v / sum(row) / n_k for v in row] for row in q]
        col = [sum(q[k][b] for k in range(n_k)) for b in range(n_b)]
        q = [[q[k][b] / col[b] / n_b for b in range(n_b)] for k in range(n_k)]
    return [[q[k][b] * n_b for k in range(n_k)] for b in range(n_b)]


def test_sinkhorn_knopp_matches_reference_and_marginals():
    torch.manual_seed(2)
    logits = torch.randn(6, 4) * 0.3
    targets = DINOLoss(4).sinkhorn_knopp_teacher(logits, teacher_temp=0.1, n_iterations=3)
    expected = _sinkhorn_reference(logits.tolist(), 0.1, 3)
    assert targets.shape == (6, 4)
    assert targets.tolist() == [pytest.approx(row, rel=1e-4, abs=1e-6) for row in expected]
    # Every sample's targets form a distribution (exact: the last step normalises samples).
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    # Prototypes share the batch evenly: column sums -> B / K as iterations grow.
    many = sinkhorn_knopp(logits, 0.1, n_iterations=200)
    torch.testing.assert_close(many.sum(dim=0), torch.full((4,), 6 / 4), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(many.sum(dim=1), torch.ones(6))
    # Three iterations already balance the prototypes far better than a plain softmax does.
    softmax = torch.softmax(logits / 0.1, dim=-1)
    assert (targets.sum(0) - 1.5).abs().max() < 0.5 * (softmax.sum(0) - 1.5).abs().max()


def test_sinkhorn_knopp_is_stable_for_large_logits_and_ibot_sample_count():
    logits = torch.tensor([[100.0, 99.0], [98.0, 100.0], [100.0, 100.0]])
    targets = sinkhorn_knopp(logits, temp=0.04)
    assert torch.isfinite(targets).all()
    # Shifting all logits by a constant does not change the result (max subtraction is exact).
    torch.testing.assert_close(targets, sinkhorn_knopp(logits - 99.0, temp=0.04))
    ibot = iBOTPatchLoss(2)
    t = ibot.sinkhorn_knopp_teacher(logits, 0.04, n_samples=torch.tensor(3))
    torch.testing.assert_close(t, targets)
    assert sinkhorn_knopp(torch.empty(0, 2), 0.1).shape == (0, 2)


# ---------------------------------------------------------------- iBOT loss


def test_ibot_loss_upstream_and_paper_weighting_by_hand():
    torch.manual_seed(3)
    masks = torch.tensor(
        [[True, False, True, False], [False, False, False, False], [False, True, False, False]]
    )  # image 0: 2 masked tokens, image 1: none, image 2: one
    k = 5
    n_masked = int(masks.sum())
    student = torch.randn(n_masked, k)
    teacher = torch.softmax(torch.randn(n_masked, k), -1)
    per_token = [_cross_entropy(teacher[i].tolist(), student[i].tolist(), 0.1) for i in range(n_masked)]

    weights = masks_weight_from_masks(masks)
    assert weights.tolist() == pytest.approx([0.5, 0.5, 1.0])

    upstream = iBOTPatchLoss(k).forward_masked(student, teacher, weights, n_images=3)
    # Each masked image counts once, the batch's 3 images (masked or not) divide.
    expected_upstream = ((per_token[0] + per_token[1]) / 2 + per_token[2]) / 3
    assert upstream.item() == pytest.approx(expected_upstream, rel=1e-5)

    paper = iBOTPatchLoss(k, weighting="paper").forward_masked(student, teacher, None, n_images=3)
    assert paper.item() == pytest.approx(sum(per_token) / 3, rel=1e-5)

    # Padded buffers: only the first n_masked_patches rows count.
    padded_s = torch.cat([student, torch.randn(2, k)])
    padded_t = torch.cat([teacher, torch.softmax(torch.randn(2, k), -1)])
    padded_w = torch.cat([weights, torch.ones(2)])
    again = iBOTPatchLoss(k)(padded_s, padded_t, padded_w, 3, n_masked_patches=torch.tensor([n_masked]))
    assert again.item() == pytest.approx(expected_upstream, rel=1e-5)


def test_ibot_loss_without_masked_tokens_is_zero_and_backpropagates():
    for weighting in ("upstream", "paper"):
        student = torch.randn(0, 4, requires_grad=True)
        loss = iBOTPatchLoss(4, weighting=weighting)(student, torch.empty(0, 4), torch.empty(0), n_images=2)
        assert loss.item() == 0.0
        loss.backward()
    with pytest.raises(ValueError, match="weighting"):
        iBOTPatchLoss(4, weighting="mean")
    with pytest.raises(ValueError, match="masks_weight"):
        iBOTPatchLoss(4)(torch.randn(2, 4), torch.rand(2, 4), None, n_images=1)


def test_ibot_center_update_ignores_empty_batch():
    loss = iBOTPatchLoss(3)
    loss.update_center(torch.empty(0, 3))
    assert torch.equal(loss.center, torch.zeros(1, 3))
    loss.update_center(torch.ones(4, 3))
    torch.testing.assert_close(loss.center, torch.full((1, 3), 0.1))


# ---------------------------------------------------------------- KoLeo


def test_koleo_matches_hand_computed_nearest_neighbours():
    # Unit vectors at angles 0, 30 and 100 degrees (already normalised; scaling must not matter).
    angles = [0.0, 30.0, 100.0]
    pts = [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in angles]
    feats = torch.tensor([[3 * x, 3 * y] for x, y in pts])

    def dist(i, j):
        return math.hypot(pts[i][0] - pts[j][0], pts[i][1] - pts[j][1])

    nearest = [min((dist(i, j), j) for j in range(3) if j != i)[0] for i in range(3)]
    expected = -sum(math.log(d) for d in nearest) / 3
    assert KoLeoLoss()(feats).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "feats",
    [
        torch.randn(1, 8),  # batch size 1: no neighbour
        torch.randn(1, 8).repeat(4, 1),  # all duplicates
        torch.cat([torch.randn(2, 8), torch.randn(1, 8).repeat(2, 1)]),  # one duplicate pair
        torch.cat([torch.zeros(2, 8), torch.randn(2, 8)]),  # zero vectors (also duplicates)
    ],
    ids=["batch1", "all-duplicates", "one-duplicate-pair", "zero-vectors"],
)
def test_koleo_value_and_gradient_are_finite(feats):
    feats = feats.clone().requires_grad_(True)
    loss = KoLeoLoss()(feats)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(feats.grad).all()
    if feats.abs().sum(dim=1).min() > 0:
        # No 1/eps spike at duplicates (a zero vector's normalisation has a ~1/eps Jacobian,
        # so that case is only required to be finite).
        assert feats.grad.abs().max() < 1e3
    if feats.shape[0] == 1:
        assert loss.item() == 0.0


def test_koleo_exact_duplicates_give_minus_log_eps():
    loss = KoLeoLoss(eps=1e-8)(torch.ones(3, 4))
    assert loss.item() == pytest.approx(-math.log(1e-8), rel=1e-5)


# ---------------------------------------------------------------- InfoNCE


def test_infonce_matches_a_loop_over_queries():
    torch.manual_seed(0)
    views = [torch.randn(3, 4) * 2, torch.randn(3, 4)]  # scales must not matter: features are normalised
    tau = 0.3
    rows = [v / v.norm(dim=1, keepdim=True) for v in views]
    everything = [(view, i, rows[view][i]) for view in range(2) for i in range(3)]
    terms = []
    for view, i, query in everything:
        others = [(v, j, key) for v, j, key in everything if (v, j) != (view, i)]
        scores = {(v, j): math.exp(float(query @ key) / tau) for v, j, key in others}
        terms.append(-math.log(scores[(1 - view, i)] / sum(scores.values())))
    assert InfoNCELoss(temperature=tau)(views).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_infonce_rewards_the_right_pairing_only():
    one_hot = torch.eye(8)
    matched = InfoNCELoss(temperature=0.05)([one_hot, one_hot.clone()])
    shuffled = InfoNCELoss(temperature=0.05)([one_hot, one_hot.roll(1, dims=0)])
    assert matched.item() < 1e-3
    assert shuffled.item() > 10  # the positive sits 20 logits below a negative
    features = torch.randn(5, 3, requires_grad=True)
    InfoNCELoss()([features, features.detach() + 0.1]).backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="two .batch, dim. views of equal shape"):
        InfoNCELoss()([torch.randn(4, 3), torch.randn(5, 3)])
    with pytest.raises(ValueError, match="temperature must be positive"):
        InfoNCELoss(temperature=0.0)


# ---------------------------------------------------------------- heads


def test_dino_head_shapes_and_normalised_prototypes():
    head = DINOHead(in_dim=16, out_dim=40, hidden_dim=32, bottleneck_dim=8, nlayers=3)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 40)
    assert head(torch.randn(2, 7, 16)).shape == (2, 7, 40)
    assert out.abs().max() <= 1.0 + 1e-5  # unit bottleneck x unit prototype rows (magnitudes start at 1)
    row_norms = head.last_layer.normalized_weight().norm(dim=1)
    torch.testing.assert_close(row_norms, torch.ones(40))
    # Rescaling the prototype directions changes nothing; the magnitudes scale the logits.
    x = torch.randn(3, 16)
    before = head(x)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.rand(40, 1) * 10 + 0.1)
    torch.testing.assert_close(head(x), before)
    scale = torch.rand(40, 1) + 0.5
    with torch.no_grad():
        head.last_layer.weight_g.copy_(scale)
    torch.testing.assert_close(head(x), before * scale.T)
    assert [n for n, _ in head.last_layer.named_parameters()] == ["weight_g", "weight_v"]  # trained, as DINOv2
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]

    fixed = DINOHead(in_dim=16, out_dim=40, hidden_dim=32, bottleneck_dim=8, norm_last_layer=True)
    assert [n for n, _ in fixed.last_layer.named_parameters()] == ["weight_v"]
    assert set(fixed.state_dict()) == set(head.state_dict())  # magnitudes kept as a buffer of ones
    assert torch.equal(fixed.last_layer.weight_g, torch.ones(40, 1))


def test_weight_normalized_linear_is_torch_weight_norm_with_its_state_dict():
    """Upstream's prototype layer is ``torch.nn.utils.weight_norm(nn.Linear(..., bias=False))``:
    its state dict (``weight_g``, ``weight_v``) loads strictly and gives the same outputs, also
    through the current parametrization API."""
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):  # the deprecated hook, as upstream DINOv2 uses it
        upstream = torch.nn.utils.weight_norm(torch.nn.Linear(8, 40, bias=False))
    with torch.no_grad():
        upstream.weight_g.uniform_(0.5, 2.0)  # trained magnitudes
    assert {k: tuple(v.shape) for k, v in upstream.state_dict().items()} == {"weight_g": (40, 1), "weight_v": (40, 8)}
    ours = WeightNormalizedLinear(8, 40)
    ours.load_state_dict(upstream.state_dict(), strict=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), upstream(x))
    parametrized = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 40, bias=False))
    parametrized.load_state_dict(upstream.state_dict(), strict=True)  # torch maps weight_g / weight_v itself
    torch.testing.assert_close(ours(x), parametrized(x))
    # Gradients reach both tensors, as for upstream's weight_g / weight_v.
    ours(x).square().sum().backward()
    upstream(x).square().sum().backward()
    torch.testing.assert_close(ours.weight_g.grad, upstream.weight_g.grad)
    # (float32 rounding: torch computes the same expression in another order)
    torch.testing.assert_close(ours.weight_v.grad, upstream.weight_v.grad, rtol=1e-4, atol=1e-4)

    fixed = WeightNormalizedLinear(8, 40, fixed_magnitude=True)
    fixed.load_state_dict(upstream.state_dict(), strict=True)  # DINO-style files (weight_g of ones) load too
    torch.testing.assert_close(fixed(x), upstream(x))


@pytest.mark.parametrize("nlayers", [1, 3])
@pytest.mark.parametrize("use_bn", [False, True], ids=["no_bn", "bn"])
def test_dino_head_normalises_each_token_group_with_its_own_statistics(nlayers, use_bn):
    torch.manual_seed(0)
    head = DINOHead(16, 24, use_bn=use_bn, nlayers=nlayers, hidden_dim=32, bottleneck_dim=8)
    head.train()
    # Three groups with different distributions (as global CLS, local CLS and patch tokens).
    groups = [torch.randn(6, 16) * 3 + 1, torch.randn(10, 16) - 2, torch.randn(2, 5, 16) * 0.5]
    out = head(groups)
    assert isinstance(out, list) and [o.shape for o in out] == [(6, 24), (10, 24), (2, 5, 24)]
    alone = [head(g) for g in groups]  # one call per group: each its own BatchNorm statistics
    for grouped, single in zip(out, alone):
        torch.testing.assert_close(grouped, single)
    concatenated = head(torch.cat([g.reshape(-1, 16) for g in groups]))
    if use_bn:  # one call on the concatenation mixes the statistics of the groups
        assert not torch.allclose(torch.cat([o.reshape(-1, 24) for o in out]), concatenated, atol=1e-3)
        # eval() leaves the head's BatchNorm on batch statistics (the teacher runs in eval mode).
        head.eval()
        assert all(m.training for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d))
        for grouped, evaluated in zip(out, head(groups)):
            torch.testing.assert_close(grouped, evaluated)
    else:
        torch.testing.assert_close(torch.cat([o.reshape(-1, 24) for o in out]), concatenated)
    # Gradients flow back to every group.
    inputs = [g.clone().requires_grad_() for g in groups]
    sum(o.square().sum() for o in head(inputs)).backward()
    assert all(i.grad is not None and i.grad.abs().sum() > 0 for i in inputs)
    with pytest.raises(ValueError, match="empty list"):
        head([])


def test_dino_head_variants_and_shared_or_separate_ibot_head():
    bn_head = DINOHead(16, 10, use_bn=True, nlayers=2, hidden_dim=24, bottleneck_dim=8, mlp_bias=False)
    assert bn_head(torch.randn(2, 3, 16)).shape == (2, 3, 10)
    assert DINOHead(16, 10, nlayers=1, bottleneck_dim=8)(torch.randn(4, 16)).shape == (4, 10)
    # One layer with BatchNorm: linear then BN over the batch, so every bottleneck unit is
    # standardised before the L2 normalisation (with BN's initial weight 1 and bias 0).
    linear_bn = DINOHead(16, 10, use_bn=True, nlayers=1, bottleneck_dim=8)
    assert [type(m).__name__ for m in linear_bn.mlp] == ["Linear", "GlobalBatchNorm1d"]
    x = torch.randn(64, 16) * torch.linspace(0.1, 10, 16)
    z = linear_bn.mlp(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    assert isinstance(bn_head.last_layer, WeightNormalizedLinear)

    dino, ibot = build_dino_ibot_heads(16, 12, hidden_dim=24, bottleneck_dim=8)
    assert dino is ibot
    dino, ibot = build_dino_ibot_heads(
        16, 12, ibot_out_dim=20, separate_ibot_head=True, hidden_dim=24, bottleneck_dim=8
    )
    assert dino is not ibot and ibot.out_dim == 20 and dino.out_dim == 12
    with pytest.raises(ValueError, match="separate_ibot_head"):
        build_dino_ibot_heads(16, 12, ibot_out_dim=20, separate_ibot_head=False)


# ---------------------------------------------------------------- two ranks (gloo)


def _distributed_worker(rank, world_size, init_file, logits, features, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        half = logits.shape[0] // world_size
        mine = logits[rank * half : (rank + 1) * half]
        loss = DINOLoss(logits.shape[1])
        targets = loss.sinkhorn_knopp_teacher(mine, 0.1)
        loss.update_center(mine)
        feat_half = features.shape[0] // world_size
        my_features = features[rank * feat_half : (rank + 1) * feat_half].clone().requires_grad_(True)
        koleo = KoLeoLoss(distributed=True)(my_features)
        koleo.backward()
        # InfoNCE: the second view of each row is the row reversed; the negatives span both ranks.
        my_views = [my_features.detach().clone().requires_grad_(True), my_features.detach().flip(1)]
        infonce = InfoNCELoss(temperature=0.5)(my_views)
        infonce.backward()
        # Ranks with different numbers of masked patches still agree on the global mean/SK.
        ibot = iBOTPatchLoss(logits.shape[1])
        uneven = logits[:1] if rank == 0 else logits[1:]
        ibot_targets = ibot.sinkhorn_knopp_teacher(uneven, 0.1, n_samples=uneven.shape[0])
        ibot.update_center(uneven)
        # Different batch sizes per rank (images skipped as unreadable): 2 rows on rank 0, 3 on rank 1.
        uneven_koleo = KoLeoLoss(distributed=True)(features[:2] if rank == 0 else features[2:5])
        torch.save(
            {
                "targets": targets,
                "center": loss.center,
                "koleo": koleo.detach(),
                "koleo_grad": my_features.grad,
                "infonce": infonce.detach(),
                "infonce_grad": my_views[0].grad,
                "ibot_targets": ibot_targets,
                "ibot_center": ibot.center,
                "uneven_koleo": uneven_koleo.detach(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()  # nobody tears the group down while the other rank is still in a collective
    finally:
        dist.destroy_process_group()


def test_targets_center_koleo_and_infonce_reduce_across_two_ranks(tmp_path):
    torch.manual_seed(4)
    logits = torch.randn(8, 5)
    features = torch.randn(6, 3)
    mp.start_processes(
        _distributed_worker,
        args=(2, str(tmp_path / "pg_init"), logits, features, str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    full = sinkhorn_knopp(logits, 0.1)
    torch.testing.assert_close(torch.cat([r["targets"] for r in results]), full)
    torch.testing.assert_close(torch.cat([r["ibot_targets"] for r in results]), full)
    reference = DINOLoss(5)
    reference.update_center(logits)
    for r in results:
        torch.testing.assert_close(r["center"], reference.center)
        torch.testing.assert_close(r["ibot_center"], reference.center)
    # Averaging the per-rank losses gives the single-process loss on the whole batch.
    koleo_mean = (results[0]["koleo"] + results[1]["koleo"]) / 2
    full = features.clone().requires_grad_(True)
    koleo_full = KoLeoLoss()(full)
    koleo_full.backward()
    torch.testing.assert_close(koleo_mean, koleo_full.detach())
    # Each rank's gradient covers every rank's loss term: d(L0 + L1)/dx = 2 dL_full/dx.
    torch.testing.assert_close(torch.cat([r["koleo_grad"] for r in results]), 2 * full.grad)
    infonce_mean = (results[0]["infonce"] + results[1]["infonce"]) / 2
    full_views = [features.clone().requires_grad_(True), features.flip(1)]
    infonce_full = InfoNCELoss(temperature=0.5)(full_views)
    infonce_full.backward()
    torch.testing.assert_close(infonce_mean, infonce_full.detach())
    torch.testing.assert_close(torch.cat([r["infonce_grad"] for r in results]), 2 * full_views[0].grad)
    # Uneven batches: each rank's mean over its own rows, weighted by the rows, is the full loss.
    uneven = (2 * results[0]["uneven_koleo"] + 3 * results[1]["uneven_koleo"]) / 5
    torch.testing.assert_close(uneven, KoLeoLoss()(features[:5]))


def test_global_batch_norm_is_batch_norm_in_one_process():
    from dinov2.layers.batch_norm import GlobalBatchNorm1d

    torch.manual_seed(0)
    reference, ours = torch.nn.BatchNorm1d(6), GlobalBatchNorm1d(6)
    with torch.no_grad():
        for bn in (reference, ours):
            bn.weight.copy_(torch.linspace(0.5, 2, 6))
            bn.bias.copy_(torch.linspace(-1, 1, 6))
    x = torch.randn(9, 6) * 3 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn(9, 6)
    (reference(x1) * weights).sum().backward()
    (ours(x2) * weights).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    assert set(ours.state_dict()) == set(reference.state_dict())


def test_global_batch_norm_keeps_precision_on_nearly_identical_rows():
    """Rows that differ by 1e-2 around a mean of 10 (CLS tokens at initialisation): the one-pass
    E[x^2] - mean^2 variance cancels in float32 (0.37 off here); the two-pass statistics stay as
    close to the exact float64 normalisation as nn.BatchNorm1d's."""
    from dinov2.layers.batch_norm import GlobalBatchNorm1d

    generator = torch.Generator().manual_seed(0)
    x = 10 + 1e-2 * torch.randn(64, 16, generator=generator)
    exact = (x.double() - x.double().mean(0)) / x.double().std(0, unbiased=False)
    ours = GlobalBatchNorm1d(16, eps=1e-12, all_reduce=lambda stats: stats)
    torch.testing.assert_close(ours(x).double(), exact, atol=1e-3, rtol=0)
