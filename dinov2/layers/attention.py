"""Multi-head self-attention (keys ``qkv`` / ``proj`` as in DINOv2).

The default path is ``torch.nn.functional.scaled_dot_product_attention``, which picks a fused
kernel on CUDA and runs everywhere else. xformers is an optional extra used only on CUDA tensors
when it is installed and ``DINOV2_XFORMERS`` is not set to ``0``.

One exception: bf16/fp16 attention on the CPU (bf16 autocast, the CPU recipes' compute dtype) is
written out as two matmuls around a float32 softmax. PyTorch's CPU flash kernel is slow for
low-precision inputs, its backward above all: forward + backward of a (128 x 3 heads x 50 tokens x 64)
bf16 attention took 46-50 ms through SDPA and 9-11 ms written out on this project's 2-core test
machine (torch 2.14.1), and at 257 tokens the written-out form was no slower. fp32 CPU attention
stays on SDPA, which was as fast or faster there.
"""

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .masked_bias import LinearKMaskedBias
from .packing import PackedLayout, packed_attention
from .rope import Rope, apply_rope_to_qkv

try:  # pragma: no cover - xformers is never installed on the CPU test machines
    from xformers.ops import memory_efficient_attention as _xformers_attention
except ImportError:
    _xformers_attention = None


def _use_xformers(x: torch.Tensor) -> bool:
    return _xformers_attention is not None and x.is_cuda and os.environ.get("DINOV2_XFORMERS", "1") != "0"


def _use_explicit_attention(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of a (B, H, N, d) batch: SDPA, or ``explicit_attention`` for bf16/fp16 on the CPU."""
    attend = explicit_attention if _use_explicit_attention(q) else F.scaled_dot_product_attention
    return attend(q, k, v, dropout_p=dropout_p)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, H, N, d) tensors, the softmax in at least float32."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    weights = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        mask_k_bias: bool = False,
    ):
        """``mask_k_bias``: the qkv bias has no key part (DINOv3, :class:`LinearKMaskedBias`)."""
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = (LinearKMaskedBias if mask_k_bias else nn.Linear)(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, rope: Optional[Rope] = None, packing: Optional[PackedLayout] = None
    ) -> torch.Tensor:
        """``rope``: (sin, cos) tables that rotate the patch tokens' queries and keys (DINOv3).
        ``packing``: ``x`` is a (1, T, D) packed multi-crop sequence with this layout, each crop
        attending to its own tokens only (``dinov2.layers.packing``)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        if rope is not None:
            if packing is not None:
                raise ValueError("packed attention takes no RoPE tables: crops of several sizes need several tables")
            qkv = apply_rope_to_qkv(qkv, rope)
        dropout_p = self.attn_drop if self.training else 0.0
        if packing is not None:
            out = packed_attention(qkv, packing, dropout_p, dense_attention)
        elif _use_xformers(x):  # pragma: no cover - CUDA only
            q, k, v = qkv.unbind(2)  # (B, N, H, d): the layout xformers expects
            out = _xformers_attention(q, k, v, p=dropout_p)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) each
            out = dense_attention(q, k, v, dropout_p=dropout_p).transpose(1, 2)
        out = out.reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))
