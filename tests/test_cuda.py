"""CUDA paths: NCCL, bf16 autocast under FSDP2, xformers, packed attention, compile, resume, k-NN.

Marked ``cuda``; every test skips with its reason where there is no CUDA device (CI, the CPU
development machines). ``scripts/gpu_check.sh`` runs them first on a GPU machine.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_train_ssl_meta_arch import synthetic_batch, tiny_cfg
from train_helpers import make_image_folder, tiny_overrides

from dinov2.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs these)"),
]


def _xformers_installed() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def nccl_group():
    """A NCCL process group of one rank on this GPU, destroyed afterwards."""
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_nccl_process_group_of_one_rank_reduces_on_the_gpu(nccl_group):
    from dinov2 import distributed

    assert dist.get_backend() == "nccl"
    value = torch.full((4,), 3.0, device=CUDA)
    torch.testing.assert_close(distributed.all_reduce_sum(value.clone()), value)
    assert distributed.any_rank(True, device=CUDA) and not distributed.any_rank(False, device=CUDA)


def test_bf16_autocast_under_fsdp2_mixed_precision_trains(nccl_group):
    from torch.distributed.tensor import DTensor

    from dinov2.fsdp import shard_ssl_meta_arch

    cfg = tiny_cfg("compute_precision.param_dtype=bf16", "compute_precision.teacher_dtype=bf16")
    torch.manual_seed(0)
    model = shard_ssl_meta_arch(_ssl_model(cfg).to(CUDA), cfg)
    backbone = model.student["backbone"]
    assert all(isinstance(p, DTensor) for p in backbone.parameters())
    batch = _on_cuda(synthetic_batch(cfg))
    losses = model.forward_backward(batch, teacher_temp=0.05)
    assert torch.isfinite(losses["total_loss"])
    # Parameters and their gradients stay fp32 (compute in bf16, reductions in reduce_dtype fp32).
    for param in backbone.parameters():
        assert param.dtype == torch.float32 and param.grad is not None and param.grad.dtype == torch.float32
        assert torch.isfinite(param.grad.to_local()).all()


def test_bf16_autocast_matches_fp32_on_one_gpu():
    cfg32, cfg16 = tiny_cfg(), tiny_cfg("compute_precision.param_dtype=bf16", "compute_precision.teacher_dtype=bf16")
    results = []
    for cfg in (cfg32, cfg16):
        torch.manual_seed(0)
        model = _ssl_model(cfg).to(CUDA)
        torch.manual_seed(1)
        results.append(model.forward_backward(_on_cuda(synthetic_batch(cfg)), teacher_temp=0.05)["total_loss"])
    torch.testing.assert_close(results[1], results[0], rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(not _xformers_installed(), reason="xformers is not installed")
def test_xformers_attention_equals_sdpa(monkeypatch):
    from dinov2.layers import Attention

    torch.manual_seed(0)
    attention = Attention(64, num_heads=4, qkv_bias=True).to(CUDA)
    x = torch.randn(8, 50, 64, device=CUDA)
    with_xformers = attention(x)
    monkeypatch.setenv("DINOV2_XFORMERS", "0")
    torch.testing.assert_close(with_xformers, attention(x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kernel", ["sdpa_split", "sdpa_mask", "njt", "flex", "xformers"])
def test_packed_attention_kernels_equal_the_per_resolution_forward_and_backward(kernel):
    if kernel == "xformers" and not _xformers_installed():
        pytest.skip("xformers is not installed")
    from dinov2.models import vit_small

    torch.manual_seed(0)
    model = vit_small(patch_size=4, img_size=16, embed_dim=64, depth=2, num_heads=4).to(CUDA).train()
    crops = [torch.randn(4, 3, 16, 16, device=CUDA), torch.randn(8, 3, 8, 8, device=CUDA)]
    weights = [torch.randn(4, 17, 64, device=CUDA), torch.randn(8, 5, 64, device=CUDA)]
    results = []
    for mode in ("per_resolution", kernel):
        model.set_packed_attention(mode)
        model.zero_grad()
        outputs = model.forward_features_list(crops, [None, None])
        sum((o["x_prenorm"] * w).sum() for o, w in zip(outputs, weights)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(([o["x_prenorm"].detach() for o in outputs], grads))
    (ref_out, ref_grads), (out, grads) = results
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-3 * grad.abs().max().item(), msg=name)


def test_a_compiled_training_step_matches_eager(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_check import _BlankImages

    from dinov2.train.trainer import SSLTrainer
    from dinov2.utils.config import load_config

    if "compile" not in load_config(None, []).train:
        pytest.skip("train.compile is not a key of this checkout's configs/ssl_default_config.yaml")
    results = []
    for compiled in ("false", "true"):
        cfg = tiny_cfg(f"train.compile={compiled}", "student.drop_path_rate=0.0")
        trainer = SSLTrainer(cfg, output_dir=tmp_path / compiled, dataset=_BlankImages(), device=CUDA)
        steps = [trainer.train_step(synthetic_batch(cfg, seed=seed)) for seed in (0, 1)]
        results.append(torch.tensor([step["losses"]["total_loss"] for step in steps]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-3, atol=1e-4)


def test_train_kill_and_resume_continues_the_losses_of_a_straight_run(tmp_path):
    data = make_image_folder(tmp_path / "images")
    common = tiny_overrides(data, "train.max_iterations=16", "checkpointing.period_iterations=4")
    command = [sys.executable, str(REPO / "train" / "train.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*command, "--output-dir", str(straight), *common], check=True, env=env, cwd=REPO, timeout=300)
    proc = subprocess.Popen([*command, "--output-dir", str(killed), *common], env=env, cwd=REPO)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "ckpt_00000008").exists():
        assert proc.poll() is None, "the run ended before its checkpoint at iteration 8"
        assert time.monotonic() < deadline, "no checkpoint at iteration 8 within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no clean shutdown: what a lost node does
    proc.wait(timeout=60)
    subprocess.run([*command, "--output-dir", str(killed), *common], check=True, env=env, cwd=REPO, timeout=300)

    def losses(run):
        lines = [json.loads(line) for line in (run / "training_metrics.jsonl").read_text().splitlines()]
        return {line["iteration"]: line["total_loss"] for line in lines}

    reference, resumed = losses(straight), losses(killed)
    assert sorted(resumed) == list(range(1, 17))
    for iteration, loss in reference.items():
        # CUDA reductions (atomics in index_add's backward) are not bit-reproducible.
        assert resumed[iteration] == pytest.approx(loss, rel=1e-3, abs=1e-4), iteration


def test_knn_on_cuda_equals_the_cpu_result():
    from dinov2.eval.knn import knn_search

    torch.manual_seed(0)
    bank, queries = torch.randn(500, 32), torch.randn(40, 32)
    labels, indices = torch.randint(0, 5, (500,)), torch.arange(500)
    on_cpu = knn_search(queries, bank, labels, indices, k=10)
    on_gpu = knn_search(queries.to(CUDA), bank.to(CUDA), labels.to(CUDA), indices.to(CUDA), k=10)
    torch.testing.assert_close(on_gpu[0].cpu(), on_cpu[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(on_gpu[2].cpu(), on_cpu[2])


def _ssl_model(cfg):
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    return SSLMetaArch(cfg).train()


def _on_cuda(batch):
    return {k: v.to(CUDA, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
