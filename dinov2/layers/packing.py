"""Packed multi-crop attention: every crop of a student step in one token sequence.

The student sees crops of two sizes in a step (e.g. 2 x 224 px global crops of 257 tokens and
8 x 98 px local crops of 50 tokens). Per resolution, each block runs once per crop size. Packed,
the tokens of all crops are concatenated into one ``(1, T, D)`` sequence: the token-wise layers
(norms, the qkv / proj / MLP matmuls) run once over all of them, and attention is confined to each
crop's own tokens by a block-diagonal mask, as upstream DINOv2 does with xformers'
``BlockDiagonalMask``. The result equals the per-resolution forward up to the order of
floating-point sums.

Kernels for the block-diagonal attention (``PACKED_KERNELS``):

* ``sdpa_split``: SDPA once per resolution on views of the packed q / k / v (``(crops, tokens)``
  per resolution): no masked-out work, no mask; the linear layers still run packed.
* ``sdpa_mask``: SDPA over the whole sequence with a dense ``(T, T)`` boolean mask: ``T^2`` work
  and memory, so only for small steps (a reference).
* ``njt``: SDPA on a nested jagged tensor with one entry per crop: varlen flash / memory-efficient
  kernels on CUDA; on the CPU torch runs its math kernel crop by crop.
* ``flex``: ``flex_attention`` with a ``BlockMask`` of crop ids, compiled; it has no backward on
  the CPU (torch 2.14), so there it serves inference only.
* ``xformers``: ``memory_efficient_attention`` with ``BlockDiagonalMask`` (CUDA, xformers installed).

Modes (``train.packed_attention``, ``PACKED_ATTENTION_MODES``): ``per_resolution`` (no packing),
``packed`` (the kernel for the device: xformers on CUDA when installed, else ``njt`` on CUDA and
``sdpa_split`` elsewhere), one of the kernel names, or ``auto``: packed only where it was measured
faster than per resolution. That is CUDA with xformers (upstream DINOv2's measured setup); on the
CPU no packed kernel was measured faster (docs/training.md, scripts/benchmark_packed_attention.py),
and CUDA without xformers has not been measured yet, so ``auto`` stays per resolution there.

Stochastic depth works per crop in the packed sequence as it does per sample in a batch
(``drop_path_packed``, ``drop_add_residual_subset_packed``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "PACKED_ATTENTION_MODES",
    "PACKED_KERNELS",
    "PackedLayout",
    "drop_add_residual_subset_packed",
    "drop_path_packed",
    "packed_attention",
    "resolve_packed_kernel",
    "xformers_available",
]

PACKED_KERNELS = ("sdpa_split", "sdpa_mask", "njt", "flex", "xformers")
PACKED_ATTENTION_MODES = ("auto", "per_resolution", "packed") + PACKED_KERNELS

# (B, H, N, d) q, k, v and a dropout rate -> (B, H, N, d): the dense attention of attention.py.
DenseAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def xformers_available() -> bool:
    """xformers imports and is not switched off with ``DINOV2_XFORMERS=0`` (as in attention.py)."""
    if os.environ.get("DINOV2_XFORMERS", "1") == "0":
        return False
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_packed_kernel(mode: str, device: torch.device) -> Optional[str]:
    """The kernel that ``mode`` runs on ``device``, or None for the per-resolution forward."""
    if mode not in PACKED_ATTENTION_MODES:
        raise ValueError(f"packed_attention must be one of {list(PACKED_ATTENTION_MODES)}, got {mode!r}")
    cuda_xformers = device.type == "cuda" and xformers_available()
    if mode == "per_resolution":
        return None
    if mode == "auto":
        return "xformers" if cuda_xformers else None
    if mode == "packed":
        return "xformers" if cuda_xformers else ("njt" if device.type == "cuda" else "sdpa_split")
    if mode == "xformers" and not cuda_xformers:
        raise ValueError(
            f"packed_attention=xformers needs CUDA tensors and xformers (pip install xformers); "
            f"got a {device.type} device{'' if xformers_available() else ' and no usable xformers'}"
        )
    return mode


@dataclass(frozen=True)
class PackedLayout:
    """Where each crop lies in a packed sequence: ``groups[i] = (crops, tokens per crop)`` of the
    i-th resolution, in packing order, and the attention ``kernel``. Hashable, so the masks built
    for a layout are cached (a training run repeats the same few layouts)."""

    groups: Tuple[Tuple[int, int], ...]
    kernel: str

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor], kernel: str) -> "PackedLayout":
        if kernel not in PACKED_KERNELS:
            raise ValueError(f"packed attention kernel must be one of {list(PACKED_KERNELS)}, got {kernel!r}")
        return cls(tuple((int(t.shape[0]), int(t.shape[1])) for t in tensors), kernel)

    @property
    def total_tokens(self) -> int:
        return sum(crops * tokens for crops, tokens in self.groups)

    @property
    def seqlens(self) -> List[int]:
        """Tokens of each crop, in order."""
        return [tokens for crops, tokens in self.groups for _ in range(crops)]

    def pack(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """(crops_i, tokens_i, D) tensors -> one (1, T, D) sequence."""
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors]).unsqueeze(0)

    def split(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(1, T, ...) -> one (crops_i, tokens_i, ...) view per resolution."""
        if x.shape[1] != self.total_tokens:
            raise ValueError(f"packed sequence has {x.shape[1]} tokens, its layout {self.groups} {self.total_tokens}")
        sizes = [crops * tokens for crops, tokens in self.groups]
        return [
            part.reshape(crops, tokens, *x.shape[2:]) for part, (crops, tokens) in zip(x[0].split(sizes), self.groups)
        ]

    unpack = split

    def crop_of_token(self, device: torch.device) -> torch.Tensor:
        return _crop_of_token(self, torch.device(device))


@functools.lru_cache(maxsize=32)
def _crop_of_token(layout: PackedLayout, device: torch.device) -> torch.Tensor:
    lengths = torch.tensor(layout.seqlens, device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


@functools.lru_cache(maxsize=32)
def _dense_mask(layout: PackedLayout, device: torch.device) -> torch.Tensor:
    crop = _crop_of_token(layout, device)
    return crop[:, None] == crop[None, :]


@functools.lru_cache(maxsize=32)
def _offsets(layout: PackedLayout, device: torch.device) -> torch.Tensor:
    lengths = torch.tensor([0] + layout.seqlens, device=device)
    return lengths.cumsum(0)


@functools.lru_cache(maxsize=32)
def _flex_block_mask(layout: PackedLayout, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    crop = _crop_of_token(layout, device)

    def same_crop(batch, head, q_idx, kv_idx):
        return crop[q_idx] == crop[kv_idx]

    total = layout.total_tokens
    return create_block_mask(same_crop, None, None, total, total, device=device)


@functools.lru_cache(maxsize=32)
def _xformers_bias(layout: PackedLayout):  # pragma: no cover - CUDA only
    from xformers.ops import fmha

    return fmha.BlockDiagonalMask.from_seqlens(layout.seqlens)


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # flex_attention is fast only compiled (eager it materialises the full score matrix).
    return torch.compile(flex_attention, dynamic=False)


def packed_attention(
    qkv: torch.Tensor, layout: PackedLayout, dropout_p: float, dense_attention: DenseAttention
) -> torch.Tensor:
    """Block-diagonal attention over a packed ``(1, T, 3, H, d)`` qkv; returns ``(1, T, H, d)``.

    ``dense_attention`` is the per-batch attention of attention.py (SDPA, or the written-out form
    for bf16 on the CPU), used by ``sdpa_split``.
    """
    kernel = layout.kernel
    _, total, _, heads, head_dim = qkv.shape
    if kernel == "sdpa_split":
        outs = []
        for part in layout.split(qkv):  # (crops, tokens, 3, H, d)
            q, k, v = part.permute(2, 0, 3, 1, 4).unbind(0)
            outs.append(dense_attention(q, k, v, dropout_p).transpose(1, 2).reshape(-1, heads, head_dim))
        return torch.cat(outs).unsqueeze(0)
    if kernel == "xformers":  # pragma: no cover - CUDA only
        from xformers.ops import memory_efficient_attention

        q, k, v = qkv.unbind(2)  # (1, T, H, d)
        return memory_efficient_attention(q, k, v, attn_bias=_xformers_bias(layout), p=dropout_p)
    if kernel == "njt":
        from torch.nested import nested_tensor_from_jagged

        offsets = _offsets(layout, qkv.device)
        # Contiguous values: the kernels (and torch's choice among them) need dense (T, H, d) buffers.
        q, k, v = (
            nested_tensor_from_jagged(t.contiguous(), offsets).transpose(1, 2)  # (crops, H, j, d)
            for t in qkv[0].unbind(1)  # (T, H, d) each
        )
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return out.transpose(1, 2).values().unsqueeze(0)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (1, H, T, d)
    if kernel == "sdpa_mask":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_mask(layout, qkv.device), dropout_p=dropout_p)
        return out.transpose(1, 2)
    if kernel == "flex":
        if dropout_p > 0.0:
            raise ValueError("packed_attention=flex has no attention dropout; use sdpa_split or per_resolution")
        if qkv.device.type == "cpu" and qkv.requires_grad:
            raise RuntimeError(
                "packed_attention=flex: torch's flex attention has no backward on the CPU; "
                "train with sdpa_split or per_resolution there"
            )
        return _flex_attention(qkv.device)(q, k, v, block_mask=_flex_block_mask(layout, qkv.device)).transpose(1, 2)
    raise ValueError(f"packed attention kernel must be one of {list(PACKED_KERNELS)}, got {kernel!r}")


def _flex_attention(device: torch.device):
    """Compiled flex attention; eager on the CPU unless ``DINOV2_FLEX_COMPILE=1``: compiling there
    needs a C++ toolchain and minutes on a small machine, for a kernel that cannot train anyway."""
    if device.type == "cpu" and os.environ.get("DINOV2_FLEX_COMPILE", "0") != "1":
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention
    return _compiled_flex_attention()


# ------------------------------------------------------------------ stochastic depth per crop
def drop_path_packed(x: torch.Tensor, drop_prob: float, layout: PackedLayout) -> torch.Tensor:
    """``drop_path`` of a packed ``(1, T, D)`` residual: each crop kept with probability
    ``1 - drop_prob`` (all its tokens together) and rescaled by ``1 / (1 - drop_prob)``."""
    if drop_prob == 0.0:
        return x
    keep_prob = 1.0 - drop_prob
    n_crops = sum(crops for crops, _ in layout.groups)
    keep = x.new_empty(n_crops).bernoulli_(keep_prob).div_(keep_prob)
    per_token = keep[layout.crop_of_token(x.device)]
    return x * per_token.view(1, -1, 1)


def drop_add_residual_subset_packed(
    x: torch.Tensor,
    residual_fn: Callable[[torch.Tensor, PackedLayout], torch.Tensor],
    drop_prob: float,
    layout: PackedLayout,
) -> torch.Tensor:
    """``drop_add_residual_subset`` on a packed ``(1, T, D)`` sequence: per resolution,
    ``keep = max(int(crops * (1 - drop_prob)), 1)`` crops drawn without replacement go (packed
    again, with their own layout) through ``residual_fn(tokens, layout)``; their residual is added
    back scaled by ``crops / keep``."""
    rows, scales, kept_groups = [], [], []
    start = 0
    for crops, tokens in layout.groups:
        keep = max(int(crops * (1.0 - drop_prob)), 1)
        index = torch.randperm(crops, device=x.device)[:keep]
        token_rows = start + index[:, None] * tokens + torch.arange(tokens, device=x.device)
        rows.append(token_rows.flatten())
        scales.append(torch.full((keep * tokens,), crops / keep, device=x.device, dtype=x.dtype))
        kept_groups.append((keep, tokens))
        start += crops * tokens
    rows_t = torch.cat(rows)
    kept_layout = PackedLayout(tuple(kept_groups), layout.kernel)
    residual = residual_fn(x[:, rows_t], kept_layout).to(x.dtype)
    out = torch.index_add(x[0], 0, rows_t, residual[0] * torch.cat(scales)[:, None])
    return out.unsqueeze(0)
