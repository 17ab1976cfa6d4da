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
    MLP) and rounded up to a multiple of 8: 6144 -> 4096 for ViT-g.
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
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        hidden_features = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        super().__init__(in_features, hidden_features, out_features, act_layer, drop, bias)
