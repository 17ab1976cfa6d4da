"""The DINOv3 vision transformer, built from the same blocks as :class:`DinoVisionTransformer`.

What differs from DINOv2 (Siméoni et al., 2025):

* positions are rotary embeddings in every attention layer (:mod:`dinov2.layers.rope`, buffer
  ``rope_embed.periods``) instead of a learned table added to the tokens, so any input size works
  without interpolation;
* ``storage_tokens``: extra learned tokens after CLS (DINOv2's registers, under DINOv3's key);
* the qkv bias has no key part (``attn.qkv.bias_mask``, :class:`~dinov2.layers.LinearKMaskedBias`);
* LayerNorm epsilon 1e-5, LayerScale, and SwiGLU feed-forwards with separate ``w1`` / ``w2``
  (:class:`~dinov2.layers.SwiGLUFFNAligned`) for the S+, H+ and 7B shapes;
* optional untied output norms: ``cls_norm`` for CLS and storage tokens (``norm`` then only
  normalises patches), and ``local_cls_norm`` for the CLS and storage tokens of local crops in
  training (ViT-7B/16).

State-dict keys and shapes are exactly those of the official release (ViT-S/16:
``tests/data/dinov3_vits16_keys.tsv``), so its checkpoints load with ``strict=True``. Token order is
[CLS, storage tokens, patches], as in DINOv2 with registers; the forward outputs, ``forward_features``
with lists of crops, ``get_intermediate_layers`` and the training options (stochastic depth,
activation checkpointing) are those of :class:`DinoVisionTransformer`, so training, evaluation and
classifiers take either class.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from dinov2.layers import Block, LinearKMaskedBias, Mlp, PatchEmbed, RopePositionEmbedding, SwiGLUFFNAligned

from .vision_transformer import ARCHITECTURES, _init_vit_weights
from .vit_features import ViTFeatureMethods

FFN_LAYERS_V3 = {
    "mlp": Mlp,
    "swiglu": SwiGLUFFNAligned,  # hidden width rounded up to a multiple of 8 (S+, H+)
    "swiglu32": partial(SwiGLUFFNAligned, align_to=32),
    "swiglu64": partial(SwiGLUFFNAligned, align_to=64),  # ViT-7B/16
    "swiglu128": partial(SwiGLUFFNAligned, align_to=128),
}

# name: (embed_dim, depth, num_heads, mlp_ratio); the DINOv2 shapes plus those only DINOv3 released.
ARCHITECTURES_V3 = {
    **ARCHITECTURES,
    "vit_huge2": (1280, 32, 20, 4),
    "vit_7b": (4096, 40, 32, 3),
}


class DinoV3VisionTransformer(ViTFeatureMethods, nn.Module):
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
        drop_path_uniform: bool = True,
        init_values: Optional[float] = 1e-5,
        ffn_layer: str = "mlp",
        num_storage_tokens: int = 4,
        mask_k_bias: bool = True,
        norm_eps: float = 1e-5,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        rope_base: Optional[float] = 100.0,
        rope_min_period: Optional[float] = None,
        rope_max_period: Optional[float] = None,
        rope_normalize_coords: str = "separate",
        rope_shift_coords: Optional[float] = None,
        rope_jitter_coords: Optional[float] = None,
        rope_rescale_coords: Optional[float] = 2.0,
        stochastic_depth: str = "mask",
        activation_checkpointing: int = 0,
    ):
        """
        Args:
            img_size: nominal training resolution; only ``patch_embed`` records it (RoPE has no table).
            mlp_ratio: feed-forward width / ``embed_dim`` before the SwiGLU 2/3 rule (DINOv3's ffn_ratio).
            drop_path_rate, drop_path_uniform: stochastic depth, the same for every block (DINOv3's
                rule) or growing linearly with depth.
            init_values: LayerScale initial value; ``None`` or 0 disables LayerScale.
            ffn_layer: "mlp", or "swiglu" / "swiglu32" / "swiglu64" / "swiglu128" (SwiGLU whose
                hidden width is rounded up to a multiple of 8, 32, 64, 128).
            num_storage_tokens: extra learned tokens after CLS (``storage_tokens``).
            mask_k_bias: the qkv bias has no key part (buffer ``attn.qkv.bias_mask``).
            norm_eps: LayerNorm epsilon (1e-5 in the releases).
            untie_cls_and_patch_norms: CLS and storage tokens get their own final norm ``cls_norm``.
            untie_global_and_local_cls_norm: in training, the CLS and storage tokens of the second
                crop batch of :meth:`forward_features_list` (the local crops) get ``local_cls_norm``.
            rope_*: :class:`~dinov2.layers.RopePositionEmbedding` options (``base`` or both periods;
                coordinate normalisation; training-time shift / jitter / rescale, None: off).
            stochastic_depth, activation_checkpointing: as for :class:`DinoVisionTransformer`.
        """
        super().__init__()
        if ffn_layer not in FFN_LAYERS_V3:
            raise ValueError(f"Unknown DINOv3 ffn_layer {ffn_layer!r}; valid: {sorted(FFN_LAYERS_V3)}")
        if num_storage_tokens < 0:
            raise ValueError(f"num_storage_tokens must be >= 0, got {num_storage_tokens}")
        # The architecture, in plain values: what rebuilds this model without weights
        # (dinov2.hub.sources build specs); training-only options are left out.
        self.architecture: Dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=float(mlp_ratio),
            qkv_bias=qkv_bias,
            ffn_bias=ffn_bias,
            proj_bias=proj_bias,
            init_values=init_values,
            ffn_layer=ffn_layer,
            num_storage_tokens=num_storage_tokens,
            mask_k_bias=mask_k_bias,
            norm_eps=norm_eps,
            untie_cls_and_patch_norms=untie_cls_and_patch_norms,
            untie_global_and_local_cls_norm=untie_global_and_local_cls_norm,
            rope_base=rope_base,
            rope_min_period=rope_min_period,
            rope_max_period=rope_max_period,
            rope_normalize_coords=rope_normalize_coords,
            rope_shift_coords=rope_shift_coords,
            rope_jitter_coords=rope_jitter_coords,
            rope_rescale_coords=rope_rescale_coords,
        )
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.n_blocks = depth
        self.num_heads = num_heads
        # Storage tokens take the registers' place in the token sequence; code that slices
        # [CLS, registers, patches] reads num_register_tokens.
        self.num_storage_tokens = self.num_register_tokens = num_storage_tokens

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = (
            nn.Parameter(torch.zeros(1, num_storage_tokens, embed_dim)) if num_storage_tokens else None
        )
        self.rope_embed = RopePositionEmbedding(
            embed_dim,
            num_heads,
            base=rope_base,
            min_period=rope_min_period,
            max_period=rope_max_period,
            normalize_coords=rope_normalize_coords,
            shift_coords=rope_shift_coords,
            jitter_coords=rope_jitter_coords,
            rescale_coords=rope_rescale_coords,
        )
        rates = (
            [drop_path_rate] * depth
            if drop_path_uniform
            else [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        )
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
                ffn_layer=FFN_LAYERS_V3[ffn_layer],
                init_values=init_values,
                stochastic_depth=stochastic_depth,
                mask_k_bias=mask_k_bias,
            )
            for i in range(depth)
        )
        self.set_activation_checkpointing(activation_checkpointing)
        self.packed_attention = "per_resolution"
        # ``norm`` normalises every token, or only the patches when the CLS norm is untied.
        self.norm = norm_layer(embed_dim)
        self.cls_norm = norm_layer(embed_dim) if untie_cls_and_patch_norms else None
        self.local_cls_norm = norm_layer(embed_dim) if untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def set_packed_attention(self, mode: str) -> None:
        """Accepts ``train.packed_attention``'s "per_resolution" and "auto"; both run each crop
        resolution on its own here. Packing several resolutions into one sequence would need one
        RoPE table per crop inside the sequence, which the packed kernels do not take."""
        if mode not in ("per_resolution", "auto"):
            raise ValueError(
                f"packed_attention={mode!r} is not available for DINOv3 (RoPE) backbones: use per_resolution or auto"
            )
        self.packed_attention = mode

    def init_weights(self) -> None:
        """DINOv3's initialisation: tokens N(0, 0.02), zero mask token, truncated-normal linear
        weights, RoPE periods from their formula, key bias masked.

        Nothing to do on the meta device (shapes only, e.g. to take a loaded state dict): torch's
        meta-device initialisers import its Python reference kernels first, 10 s and more."""
        if self.cls_token.is_meta:
            return
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        self.apply(_init_vit_weights)
        for module in self.modules():
            if isinstance(module, LinearKMaskedBias) and module.bias is not None:
                module.reset_bias_mask()
        for block in self.blocks:
            for scale in (block.ls1, block.ls2):
                if hasattr(scale, "reset_parameters"):
                    scale.reset_parameters()

    # ------------------------------------------------------------------ tokens
    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[CLS, storage tokens, patches] of a (B, C, H, W) batch; masked patches become ``mask_token``."""
        batch = x.shape[0]
        x = self.patch_embed(x)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(
                    f"masks must have shape {tuple(x.shape[:2])} (batch, patches), got {tuple(masks.shape)}"
                )
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        tokens = [self.cls_token.expand(batch, -1, -1)]
        if self.storage_tokens is not None:
            tokens.append(self.storage_tokens.expand(batch, -1, -1))
        return torch.cat(tokens + [x], dim=1)

    def _grid(self, images: torch.Tensor) -> Tuple[int, int]:
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def _run_blocks(self, tokens: List[torch.Tensor], grids: List[Tuple[int, int]], take=None):
        """Every block on every batch of tokens; with ``take`` (block indices) also the outputs of those blocks.

        In training with coordinate augmentation the RoPE tables are drawn afresh for every block
        (as the official code does); otherwise one table per grid serves all blocks.
        """
        augment = self.training and self.rope_embed.augments
        ropes = [self.rope_embed(*grid) for grid in grids]
        taken = []
        for i, block in enumerate(self.blocks):
            if augment and i > 0:
                ropes = [self.rope_embed(*grid) for grid in grids]
            tokens = [block(t, rope) for t, rope in zip(tokens, ropes)]
            if take is not None and i in take:
                taken.append(tokens[0])
        return tokens, taken

    def _split_tokens(
        self, x_prenorm: torch.Tensor, masks: Optional[torch.Tensor], local_crops: bool = False
    ) -> Dict[str, torch.Tensor]:
        first_patch = 1 + self.num_storage_tokens
        x_norm_head, x_norm_patch = self._normalize(x_prenorm, local_crops)
        return {
            "x_norm_clstoken": x_norm_head[:, 0],
            "x_norm_regtokens": x_norm_head[:, 1:first_patch],
            "x_storage_tokens": x_norm_head[:, 1:first_patch],  # DINOv3's name for the same tokens
            "x_norm_patchtokens": x_norm_patch,
            "x_prenorm": x_prenorm,
            "masks": masks,
        }

    def _normalize(self, x: torch.Tensor, local_crops: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """(normalised CLS + storage tokens, normalised patch tokens) of block outputs."""
        first_patch = 1 + self.num_storage_tokens
        if self.local_cls_norm is not None and local_crops and self.training:
            head_norm = self.local_cls_norm  # never used in eval mode
        elif self.cls_norm is not None:
            head_norm = self.cls_norm
        else:
            head_norm = self.norm  # LayerNorm is per token: the same as slicing norm(x)
        return head_norm(x[:, :first_patch]), self.norm(x[:, first_patch:])

    # ----------------------------------------------------------------- forward
    def forward_features_list(
        self, x_list: Sequence[torch.Tensor], masks_list: Sequence[Optional[torch.Tensor]]
    ) -> List[Dict[str, torch.Tensor]]:
        """One forward per batch of a given resolution (global crops first, then local crops).

        Each batch runs through every block separately, so the result equals separate forwards
        (up to the training-time RoPE draws); the second batch counts as local crops for
        ``local_cls_norm``.
        """
        if len(x_list) != len(masks_list):
            raise ValueError(f"got {len(x_list)} batches but {len(masks_list)} masks")
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        tokens, _ = self._run_blocks(tokens, [self._grid(x) for x in x_list])
        return [self._split_tokens(t, m, local_crops=i == 1) for i, (t, m) in enumerate(zip(tokens, masks_list))]

    def forward_features(
        self,
        x: Union[torch.Tensor, Sequence[torch.Tensor]],
        masks: Optional[Union[torch.Tensor, Sequence[Optional[torch.Tensor]]]] = None,
    ):
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks if masks is not None else [None] * len(x))
        tokens, _ = self._run_blocks([self.prepare_tokens_with_masks(x, masks)], [self._grid(x)])
        return self._split_tokens(tokens[0], masks)

    @property
    def _num_prefix_tokens(self) -> int:
        return 1 + self.num_storage_tokens

    def _normalize_block_output(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._normalize(x), dim=1)

    def _block_outputs(self, x: torch.Tensor, take: Set[int]) -> List[torch.Tensor]:
        """The outputs of the blocks whose indices are in ``take`` (before the final norms)."""
        _, taken = self._run_blocks([self.prepare_tokens_with_masks(x)], [self._grid(x)], take=take)
        return taken


def make_vit_v3(arch: str, patch_size: int = 16, **kwargs) -> DinoV3VisionTransformer:
    """Build a named architecture as a DINOv3 ViT; ``embed_dim``, ``depth``, ``num_heads`` and
    ``mlp_ratio`` in ``kwargs`` override the named shape (handy for tiny research models)."""
    if arch not in ARCHITECTURES_V3:
        raise ValueError(f"Unknown architecture {arch!r}; valid: {sorted(ARCHITECTURES_V3)}")
    shape = dict(zip(("embed_dim", "depth", "num_heads", "mlp_ratio"), ARCHITECTURES_V3[arch]))
    shape.update({key: kwargs.pop(key) for key in list(shape) if kwargs.get(key) is not None})
    kwargs = {key: value for key, value in kwargs.items() if key not in shape}
    return DinoV3VisionTransformer(patch_size=patch_size, **shape, **kwargs)


# The published DINOv3 ViTs (patch 16, 4 storage tokens, masked K bias, LayerScale 1e-5, LayerNorm
# eps 1e-5, RoPE base 100 with per-axis coordinates, trained with coordinate rescaling up to 2x).
DINOV3_RELEASES: Dict[str, Dict[str, Any]] = {
    "dinov3_vits16": dict(arch="vit_small"),
    "dinov3_vits16plus": dict(arch="vit_small", mlp_ratio=6.0, ffn_layer="swiglu"),
    "dinov3_vitb16": dict(arch="vit_base"),
    "dinov3_vitl16": dict(arch="vit_large"),
    "dinov3_vith16plus": dict(arch="vit_huge2", mlp_ratio=6.0, ffn_layer="swiglu"),
    "dinov3_vit7b16": dict(arch="vit_7b", ffn_layer="swiglu64", qkv_bias=False, untie_global_and_local_cls_norm=True),
}


def make_dinov3_release(name: str, **kwargs) -> DinoV3VisionTransformer:
    """A randomly initialised model of the published shape ``name`` (a key of ``DINOV3_RELEASES``);
    ``kwargs`` override its options (e.g. ``drop_path_rate``, or ``untie_global_and_local_cls_norm``
    for the satellite ViT-L/16)."""
    if name not in DINOV3_RELEASES:
        raise ValueError(f"Unknown DINOv3 release {name!r}; valid: {sorted(DINOV3_RELEASES)}")
    options = dict(DINOV3_RELEASES[name])
    arch = options.pop("arch")
    options.update(kwargs)
    return make_vit_v3(arch, patch_size=16, **options)
