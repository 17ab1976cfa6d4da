"""Multi-head self-attention (keys ``qkv`` / ``proj`` as in DINOv2).

The default path is ``torch.nn.functional.scaled_dot_product_attention``, which picks a fused
kernel on CUDA and runs everywhere else. xformers is an optional extra used only on CUDA tensors
when it is installed and ``DINOV2_XFORMERS`` is not set to ``0``.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

try:  # pragma: no cover - xformers is never installed on the CPU test machines
    from xformers.ops import memory_efficient_attention as _xformers_attention
except ImportError:
    _xformers_attention = None


def _use_xformers(x: torch.Tensor) -> bool:
    return _xformers_attention is not None and x.is_cuda and os.environ.get("DINOV2_XFORMERS", "1") != "0"


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        dropout_p = self.attn_drop if self.training else 0.0
        if _use_xformers(x):  # pragma: no cover - CUDA only
            q, k, v = qkv.unbind(2)  # (B, N, H, d): the layout xformers expects
            out = _xformers_attention(q, k, v, p=dropout_p)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) each
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p).transpose(1, 2)
        out = out.reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))
