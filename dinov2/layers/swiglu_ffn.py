from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward: ``w3(silu(x W1) * (x W2))`` with W1 and W2 fused into ``w12``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Optional[Callable[..., nn.Module]] = None,  # accepted for a uniform signature
        drop: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.drop(self.w3(F.silu(gate) * value))


class SwiGLUFFNFused(SwiGLUFFN):
    """SwiGLU with the hidden width that the released ViT-g/14 uses.

    The nominal MLP width (``mlp_ratio * dim``) is reduced to 2/3 (same parameter count as a plain
    MLP) and rounded up to a multiple of 8 (:func:`swiglu_aligned_width`): 6144 -> 4096 for ViT-g.
    DINOv3's :class:`SwiGLUFFNAligned` follows the same rule with separate ``w1`` / ``w2`` weights.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Optional[Callable[..., nn.Module]] = None,
        drop: float = 0.0,
        bias: bool = True,
    ):
        hidden_features = swiglu_aligned_width(hidden_features or in_features, align_to=8)
        super().__init__(in_features, hidden_features, out_features, act_layer, drop, bias)


class SwiGLUFFNAligned(nn.Module):
    """SwiGLU of the DINOv3 ViTs: ``w3(silu(w1 x) * (w2 x))`` with separate ``w1`` / ``w2`` keys.

    The nominal width (``ffn_ratio * dim``) is reduced to 2/3 and rounded up to a multiple of
    ``align_to``: 8 for ViT-S+/16 and H+/16 (1536 and 5120 wide), 64 for ViT-7B/16 (8192).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Optional[Callable[..., nn.Module]] = None,  # accepted for a uniform signature
        drop: float = 0.0,
        bias: bool = True,
        align_to: int = 8,
    ):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = swiglu_aligned_width(hidden_features or in_features, align_to)
        self.w1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.w2 = nn.Linear(in_features, hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w3(F.silu(self.w1(x)) * self.w2(x)))


def swiglu_aligned_width(hidden_features: int, align_to: int = 8) -> int:
    """The hidden width of a 2/3-width SwiGLU (:class:`SwiGLUFFNFused`, :class:`SwiGLUFFNAligned`)
    for a nominal width: 2/3 of it, rounded up to a multiple of ``align_to``."""
    width = int(hidden_features * 2 / 3)
    return width + (-width % align_to)
