"""The qkv projection of the DINOv3 ViTs, whose keys carry no bias.

Without position-dependent rotations a bias on the keys would add the same term ``q . b_k`` to every
logit of a query, which the softmax cancels. Under RoPE it does not: the bias is rotated with each
key's position, so it becomes a learned positional term (dropping it from a model trained with it
changes the outputs). DINOv3 masks it out, so the key third contributes nothing. The released DINOv3 models keep the full
``(3 * dim,)`` bias and a persistent ``bias_mask`` buffer (1 on the query and value thirds, 0 on the
key third), both in the state dict (``blocks.<i>.attn.qkv.bias_mask``), so their files load
strictly only into a module with the same buffer.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearKMaskedBias"]


class LinearKMaskedBias(nn.Linear):
    """``nn.Linear`` to ``(q, k, v)`` whose bias is multiplied by ``bias_mask`` (K third zero).

    Without a bias (``bias=False``) it is a plain linear layer and has no ``bias_mask``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        if out_features % 3:
            raise ValueError(f"a qkv projection has 3 equal parts; out_features {out_features} is not divisible by 3")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if self.bias is not None:
            mask = torch.empty(out_features, device=self.bias.device, dtype=self.bias.dtype)
            self.register_buffer("bias_mask", mask, persistent=True)
            self.reset_bias_mask()

    def reset_bias_mask(self) -> None:
        """1 on the query and value thirds, 0 on the key third."""
        third = self.out_features // 3
        if self.bias_mask.is_meta:
            return  # shapes only: a model built on the meta device to take loaded weights
        with torch.no_grad():
            self.bias_mask.fill_(1.0)
            self.bias_mask[third : 2 * third] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return F.linear(x, self.weight)
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))
