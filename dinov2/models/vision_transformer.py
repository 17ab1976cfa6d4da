"""The DINOv2 vision transformer.

Parameter names and shapes follow the official DINOv2 release exactly (see
``../shared/reference/dinov2_vits14_keys.tsv``), so its checkpoints load with ``strict=True``.
Token order inside the model is [CLS, registers, patches]; the position embedding covers CLS and
patches only, and is interpolated to whatever input size is given.
"""

import math
from functools import partial
from typing import Dict, List, Optional, Sequence, Set, Union

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.layers import PATCH_EMBEDS, Block, Mlp, SwiGLUFFN, SwiGLUFFNFused
from dinov2.layers.packing import PACKED_ATTENTION_MODES, PackedLayout, resolve_packed_kernel

from .vit_features import ViTFeatureMethods

FFN_LAYERS = {
    "mlp": Mlp,
    "swiglu": SwiGLUFFNFused,  # the released ViT-g uses the fused width rule
    "swiglufused": SwiGLUFFNFused,
    "swiglu_unfused": SwiGLUFFN,
}


def _init_vit_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DinoVisionTransformer(ViTFeatureMethods, nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: Optional[float] = None,
        ffn_layer: str = "mlp",
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        block_chunks: int = 0,
        stochastic_depth: str = "mask",
        activation_checkpointing: int = 0,
        packed_attention: str = "per_resolution",
        patch_embed: str = "linear",
    ):
        """
        Args:
            img_size: training resolution; sets the size of the learned position embedding.
            drop_path_rate: stochastic depth rate, the same for every block when
                ``drop_path_uniform`` and growing linearly with depth otherwise.
            init_values: LayerScale initial value; ``None`` or 0 disables LayerScale.
            ffn_layer: "mlp", or "swiglu"/"swiglufused" (ViT-g), or "swiglu_unfused".
            num_register_tokens: extra learned tokens after CLS (Darcet et al., 2023).
            interpolate_antialias / interpolate_offset: how the position embedding is resized;
                the register models were trained with antialias=True and offset=0.
            block_chunks: accepted for config compatibility; only 0 (flat ``blocks.<i>`` keys,
                the released format) is supported.
            stochastic_depth: "mask", "subset" or "auto", how blocks drop residual branches in
                training (``dinov2.layers.drop_path``); no effect in eval mode or at rate 0.
            activation_checkpointing: 0 (off), or k: every k-th block (0, k, 2k, ...) recomputes
                its activations in backward instead of storing them (1: all blocks).
            packed_attention: how ``forward_features_list`` runs batches of several resolutions:
                "per_resolution" (each through every block on its own), "packed" or a kernel name
                (all crops in one sequence, block-diagonal attention) or "auto" (packed only
                where measured faster); see ``dinov2.layers.packing``.
            patch_embed: "linear" (the released strided patch convolution) or "conv_stem" (a
                small convolutional stem with the same token grid, ``ConvStemPatchEmbed``; its
                weights have no counterpart in the released checkpoints).
        """
        super().__init__()
        if block_chunks not in (0, None):
            raise ValueError("block_chunks > 0 is not supported: blocks are kept flat as in the released weights")
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"Unknown ffn_layer {ffn_layer!r}; valid: {sorted(FFN_LAYERS)}")
        if patch_embed not in PATCH_EMBEDS:
            raise ValueError(f"Unknown patch_embed {patch_embed!r}; valid: {sorted(PATCH_EMBEDS)}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.n_blocks = depth
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = PATCH_EMBEDS[patch_embed](
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=rates[i],
                norm_layer=norm_layer,
                ffn_layer=FFN_LAYERS[ffn_layer],
                init_values=init_values,
                stochastic_depth=stochastic_depth,
            )
            for i in range(depth)
        )
        self.set_activation_checkpointing(activation_checkpointing)
        self.set_packed_attention(packed_attention)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def set_packed_attention(self, mode: str) -> None:
        """How ``forward_features_list`` runs several resolutions (``dinov2.layers.packing``)."""
        if mode not in PACKED_ATTENTION_MODES:
            raise ValueError(f"packed_attention must be one of {list(PACKED_ATTENTION_MODES)}, got {mode!r}")
        self.packed_attention = mode

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        self.apply(_init_vit_weights)
        for block in self.blocks:
            for scale in (block.ls1, block.ls2):
                if hasattr(scale, "reset_parameters"):
                    scale.reset_parameters()

    # ------------------------------------------------------------------ tokens
    def interpolate_pos_encoding(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embedding for an image of ``height`` x ``width`` pixels (CLS first)."""
        num_patches = x.shape[1] - 1
        num_stored = self.pos_embed.shape[1] - 1
        if num_patches == num_stored and height == width:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        dim = x.shape[-1]
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        side = int(math.sqrt(num_stored))
        if side * side != num_stored:
            raise ValueError(f"pos_embed holds {num_stored} patch positions, which is not a square grid")
        patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            # The released non-register models were trained with a small offset that makes
            # F.interpolate use a slightly different scale factor; kept for bit-compatibility.
            scale = ((grid_h + self.interpolate_offset) / side, (grid_w + self.interpolate_offset) / side)
            patch_pos = F.interpolate(
                patch_pos, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias
            )
        else:
            patch_pos = F.interpolate(
                patch_pos, size=(grid_h, grid_w), mode="bicubic", antialias=self.interpolate_antialias
            )
        if patch_pos.shape[-2:] != (grid_h, grid_w):
            raise RuntimeError(
                f"position embedding resized to {tuple(patch_pos.shape[-2:])}, expected {(grid_h, grid_w)}"
            )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat((class_pos, patch_pos), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, _, height, width = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(
                    f"masks must have shape {tuple(x.shape[:2])} (batch, patches), got {tuple(masks.shape)}"
                )
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(batch, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, height, width)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(batch, -1, -1), x[:, 1:]), dim=1)
        return x

    def _split_tokens(self, x_prenorm: torch.Tensor, masks: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        x_norm = self.norm(x_prenorm)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:first_patch],
            "x_norm_patchtokens": x_norm[:, first_patch:],
            "x_prenorm": x_prenorm,
            "masks": masks,
        }

    # ----------------------------------------------------------------- forward
    def forward_features_list(
        self, x_list: Sequence[torch.Tensor], masks_list: Sequence[Optional[torch.Tensor]]
    ) -> List[Dict[str, torch.Tensor]]:
        """One forward per batch of a given resolution (e.g. global and local crops).

        Per resolution, each batch runs through every block separately, so the result equals
        separate forwards. Packed (``packed_attention``), the batches' tokens run through the
        blocks as one sequence with block-diagonal attention: the same result up to rounding.
        """
        if len(x_list) != len(masks_list):
            raise ValueError(f"got {len(x_list)} batches but {len(masks_list)} masks")
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        kernel = resolve_packed_kernel(self.packed_attention, tokens[0].device) if len(tokens) > 1 else None
        if kernel is None:
            for block in self.blocks:
                tokens = [block(t) for t in tokens]
        else:
            layout = PackedLayout.of(tokens, kernel)
            x = layout.pack(tokens)
            for block in self.blocks:
                x = block(x, packing=layout)
            tokens = layout.unpack(x)
        return [self._split_tokens(t, m) for t, m in zip(tokens, masks_list)]

    def forward_features(
        self,
        x: Union[torch.Tensor, Sequence[torch.Tensor]],
        masks: Optional[Union[torch.Tensor, Sequence[Optional[torch.Tensor]]]] = None,
    ):
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks if masks is not None else [None] * len(x))
        x = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            x = block(x)
        return self._split_tokens(x, masks)

    @property
    def _num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    def _normalize_block_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def _block_outputs(self, x: torch.Tensor, take: Set[int]) -> List[torch.Tensor]:
        """The outputs of the blocks whose indices are in ``take`` (before the final norm)."""
        x = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in take:
                outputs.append(x)
        return outputs


ARCHITECTURES = {
    # name: (embed_dim, depth, num_heads, mlp_ratio)
    "vit_tiny": (192, 12, 3, 4),
    "vit_small": (384, 12, 6, 4),
    "vit_base": (768, 12, 12, 4),
    "vit_large": (1024, 24, 16, 4),
    "vit_giant2": (1536, 40, 24, 4),
}


def make_vit(arch: str, patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """Build a named architecture; ``embed_dim``, ``depth``, ``num_heads`` and ``mlp_ratio`` in
    ``kwargs`` override the named shape (handy for tiny research models)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; valid: {sorted(ARCHITECTURES)}")
    shape = dict(zip(("embed_dim", "depth", "num_heads", "mlp_ratio"), ARCHITECTURES[arch]))
    shape.update({key: kwargs.pop(key) for key in list(shape) if kwargs.get(key) is not None})
    kwargs = {key: value for key, value in kwargs.items() if key not in shape}
    return DinoVisionTransformer(patch_size=patch_size, num_register_tokens=num_register_tokens, **shape, **kwargs)


def vit_tiny(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return make_vit("vit_tiny", patch_size, num_register_tokens, **kwargs)


def vit_small(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return make_vit("vit_small", patch_size, num_register_tokens, **kwargs)


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return make_vit("vit_base", patch_size, num_register_tokens, **kwargs)


def vit_large(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return make_vit("vit_large", patch_size, num_register_tokens, **kwargs)


def vit_giant2(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-g/14 as released: width 1536, 40 blocks, 24 heads (use ffn_layer="swiglufused")."""
    return make_vit("vit_giant2", patch_size, num_register_tokens, **kwargs)
