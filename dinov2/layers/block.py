from functools import partial
from typing import Callable, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from .attention import Attention
from .drop_path import STOCHASTIC_DEPTH_MODES, DropPath, drop_add_residual_subset, uses_sample_subset
from .layer_scale import LayerScale
from .mlp import Mlp
from .packing import PackedLayout, drop_add_residual_subset_packed, drop_path_packed
from .rope import Rope


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    Two training-only options that leave parameters, key names and eval outputs unchanged:

    * ``checkpoint_activations``: the block's activations are not kept for backward but
      recomputed from its input (``torch.utils.checkpoint``, non-reentrant, so it composes with
      FSDP2 units that wrap this block's ``forward``);
    * ``stochastic_depth``: how a drop rate > 0 drops residual branches: ``"mask"`` (a per-sample
      Bernoulli mask, every sample computed), ``"subset"`` (the branch runs only on the samples
      that keep it) or ``"auto"`` (subset above ``SUBSET_ABOVE_RATE``, i.e. 0.1); see ``drop_path``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        ffn_layer: Callable[..., nn.Module] = Mlp,
        stochastic_depth: str = "mask",
        checkpoint_activations: bool = False,
        mask_k_bias: bool = False,
    ):
        super().__init__()
        if stochastic_depth not in STOCHASTIC_DEPTH_MODES:
            raise ValueError(
                f"stochastic_depth must be one of {list(STOCHASTIC_DEPTH_MODES)}, got {stochastic_depth!r}"
            )
        self.sample_drop_ratio = drop_path
        self.stochastic_depth = stochastic_depth
        self.checkpoint_activations = checkpoint_activations
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            mask_k_bias=mask_k_bias,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, bias=ffn_bias
        )
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _attn_residual(
        self, x: torch.Tensor, rope: Optional[Rope] = None, packing: Optional[PackedLayout] = None
    ) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x), rope=rope, packing=packing))

    def _ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _forward_packed(self, x: torch.Tensor, packing: PackedLayout) -> torch.Tensor:
        # Stochastic depth drops whole crops of the packed sequence, as it drops samples of a batch.
        rate = self.sample_drop_ratio if self.training else 0.0
        if rate > 0.0 and uses_sample_subset(self.stochastic_depth, rate):
            x = drop_add_residual_subset_packed(x, lambda t, kept: self._attn_residual(t, packing=kept), rate, packing)
            return drop_add_residual_subset_packed(x, lambda t, kept: self._ffn_residual(t), rate, packing)
        x = x + drop_path_packed(self._attn_residual(x, packing=packing), rate, packing)
        return x + drop_path_packed(self._ffn_residual(x), rate, packing)

    def _forward(
        self, x: torch.Tensor, rope: Optional[Rope] = None, packing: Optional[PackedLayout] = None
    ) -> torch.Tensor:
        if packing is not None:
            return self._forward_packed(x, packing)
        if self.training and uses_sample_subset(self.stochastic_depth, self.sample_drop_ratio):
            # The RoPE tables are the same for every sample, so a subset of samples uses them as they are.
            x = drop_add_residual_subset(x, partial(self._attn_residual, rope=rope), self.sample_drop_ratio)
            return drop_add_residual_subset(x, self._ffn_residual, self.sample_drop_ratio)
        x = x + self.drop_path1(self._attn_residual(x, rope))
        return x + self.drop_path2(self._ffn_residual(x))

    def forward(
        self, x: torch.Tensor, rope: Optional[Rope] = None, packing: Optional[PackedLayout] = None
    ) -> torch.Tensor:
        """``rope``: RoPE (sin, cos) tables for the patch tokens (DINOv3 models), None otherwise.
        ``packing``: ``x`` is a (1, T, D) packed multi-crop sequence with this layout
        (``dinov2.layers.packing``), None for a (B, N, D) batch."""
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            # The recomputation replays the RNG state (preserve_rng_state), so dropped samples
            # and dropout masks are the same in the forward and in its recomputation.
            return torch.utils.checkpoint.checkpoint(self._forward, x, rope, packing, use_reentrant=False)
        return self._forward(x, rope, packing)
