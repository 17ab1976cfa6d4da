"""Model FLOPs of a training step, and how fast its matmuls can run on their own.

:func:`flop_counter_mode` is ``FlopCounterMode`` with the formulas torch lacks for the CPU attention
kernel. :func:`matmul_ceiling` answers the question an MFU figure leaves open: how much of the gap
to the machine's peak is the rest of the step (element-wise work, copies, the optimizer), and how
much is the matmuls themselves, which on small shapes run below the rate of a large square
product. It records every call whose FLOPs the counter counts (matmuls, attention, convolutions)
during one call of ``fn``, with its operands' shapes, strides and dtypes, then times each distinct
call alone on fresh tensors of that layout. Their summed time is the step time the counted work
would take if nothing else cost anything: the MFU of that time is the ceiling that kernel-level
work outside the matmuls (fusing, compiling, packing) cannot pass on this machine.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter_mode() -> FlopCounterMode:
    """FlopCounterMode that also counts SDPA's CPU kernel: torch (2.14) has formulas for the CUDA
    flash / memory-efficient / cuDNN kernels only, so CPU attention would count as 0 FLOPs."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
        },
    )


@dataclass(frozen=True)
class _TensorLayout:
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device

    def materialise(self) -> torch.Tensor:
        # Fill the storage, then view it: an expanded operand (stride 0, e.g. the gradient of a
        # sum) cannot be written through its own view.
        size = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) if all(self.shape) else 0
        storage = torch.empty(size, dtype=self.dtype, device=self.device)
        storage = storage.normal_() if storage.is_floating_point() else storage.zero_()
        return storage.as_strided(self.shape, self.stride)


def _layout(value):
    if isinstance(value, torch.Tensor):
        return _TensorLayout(tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    return value


def _freeze(value):
    """A hashable key for an argument tree (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


class _CountedCallRecorder(TorchDispatchMode):
    """Records the layout of every call that ``registry`` (a FlopCounterMode's) counts FLOPs for."""

    def __init__(self, registry: dict):
        super().__init__()
        self.registry = registry
        self.calls: Counter = Counter()
        self.flops: dict = {}
        self.replay: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        counted = self.registry.get(func._overloadpacket)
        if counted is not None:
            layout_args, layout_kwargs = tree_map(_layout, args), tree_map(_layout, kwargs)
            key = (func, _freeze(layout_args), _freeze(layout_kwargs))
            self.calls[key] += 1
            if key not in self.flops:
                self.flops[key] = counted(*args, **kwargs, out_val=out)
                self.replay[key] = (layout_args, layout_kwargs)
        return out


def _describe(func, layout_args) -> str:
    shapes = [
        "x".join(map(str, a.shape)) + ("" if _is_contiguous(a) else "(T)")
        for a in layout_args
        if isinstance(a, _TensorLayout)
    ]
    return f"{func.__name__.split('.')[0]}({', '.join(shapes)})"


def _is_contiguous(layout: _TensorLayout) -> bool:
    expected, stride = [], 1
    for size in reversed(layout.shape):
        expected.append(stride)
        stride *= size
    return tuple(reversed(expected)) == layout.stride


def _time_call(func, layout_args, layout_kwargs, min_seconds: float, rounds: int) -> float:
    """Median over ``rounds`` of the mean time of one call, each round at least ``min_seconds``."""
    args = tree_map(lambda v: v.materialise() if isinstance(v, _TensorLayout) else v, layout_args)
    kwargs = tree_map(lambda v: v.materialise() if isinstance(v, _TensorLayout) else v, layout_kwargs)
    sync = torch.cuda.synchronize if any(isinstance(v, torch.Tensor) and v.is_cuda for v in args) else (lambda: None)
    with torch.no_grad():
        func(*args, **kwargs)  # warm-up: first-call allocation and kernel selection
        sync()
        samples = []
        for _ in range(rounds):
            calls, start = 0, time.perf_counter()
            while True:
                func(*args, **kwargs)
                calls += 1
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            samples.append(elapsed / calls)
    return statistics.median(samples)


def matmul_ceiling(fn, min_seconds: float = 0.02, rounds: int = 3) -> dict:
    """Call ``fn()`` once while recording its counted calls, then time each distinct call alone.

    Returns ``flops`` (all counted FLOPs of the call), ``seconds`` (the summed time of the counted
    calls run alone: what the call would take if nothing else cost anything) and ``ops``: one entry
    per distinct call (``op``, ``calls``, ``flops`` per call, ``seconds`` per call), the slowest
    in total first."""
    recorder = _CountedCallRecorder(flop_counter_mode().flop_registry)
    with recorder:
        fn()
    ops = []
    for key, calls in recorder.calls.items():
        func = key[0]
        layout_args, layout_kwargs = recorder.replay[key]
        seconds = _time_call(func, layout_args, layout_kwargs, min_seconds, rounds)
        ops.append(
            {"op": _describe(func, layout_args), "calls": calls, "flops": recorder.flops[key], "seconds": seconds}
        )
    ops.sort(key=lambda op: op["calls"] * op["seconds"], reverse=True)
    return {
        "flops": sum(op["calls"] * op["flops"] for op in ops),
        "seconds": sum(op["calls"] * op["seconds"] for op in ops),
        "ops": ops,
    }
