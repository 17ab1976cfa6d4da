"""dinov2_tools.step_profile: FLOPs of the CPU attention kernel and the matmul-only ceiling."""

import torch
import torch.nn.functional as F

from dinov2_tools.step_profile import flop_counter_mode, matmul_ceiling


def test_flop_counter_counts_the_cpu_attention_kernel():
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    counter = flop_counter_mode()
    with counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    product = 2 * (2 * 3) * 10 * 10 * 8  # one (10 x 8) @ (8 x 10)-sized product per head: 2 FLOPs per multiply-add
    # forward: q k^T and attn v; backward: the scores again, then dv, d(attn), dq and dk
    assert counter.get_total_flops() == 2 * product + 5 * product


def test_matmul_ceiling_records_each_call_and_its_layout():
    a, b, c = torch.randn(16, 32), torch.randn(32, 24), torch.randn(24, 32)

    def step():
        for _ in range(3):
            torch.mm(a, b)
        torch.mm(a, c.t())  # a transposed operand is its own call: its kernel differs
        torch.relu(a)  # not counted: no FLOPs formula

    ceiling = matmul_ceiling(step, min_seconds=0.001, rounds=1)
    by_op = {op["op"]: op for op in ceiling["ops"]}
    assert set(by_op) == {"mm(16x32, 32x24)", "mm(16x32, 32x24(T))"}
    assert by_op["mm(16x32, 32x24)"]["calls"] == 3
    assert by_op["mm(16x32, 32x24(T))"]["calls"] == 1
    assert all(op["flops"] == 2 * 16 * 32 * 24 and op["seconds"] > 0 for op in ceiling["ops"])
    assert ceiling["flops"] == 4 * 2 * 16 * 32 * 24
    assert ceiling["seconds"] == sum(op["calls"] * op["seconds"] for op in ceiling["ops"])


def test_matmul_ceiling_covers_a_training_step_as_the_flop_counter_does():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 5))
    x = torch.randn(7, 12)

    def step():
        model.zero_grad()
        q = model(x).view(1, 1, 7, 5)
        F.scaled_dot_product_attention(q, q, q).sum().backward()

    counter = flop_counter_mode()
    with counter:
        step()
    ceiling = matmul_ceiling(step, min_seconds=0.001, rounds=1)
    assert ceiling["flops"] == counter.get_total_flops() > 0
    names = {op["op"].split("(")[0] for op in ceiling["ops"]}
    assert {"addmm", "mm", "_scaled_dot_product_flash_attention_for_cpu"} <= names
