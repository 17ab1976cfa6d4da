from typing import Tuple, Union

import torch
from torch import nn


def _pair(value: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/p * W/p, D) through a strided convolution."""

    def __init__(self, img_size=224, patch_size=14, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.patches_resolution = (
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = self._projection()
        self.norm = nn.Identity()

    def _projection(self) -> nn.Module:
        return nn.Conv2d(self.in_chans, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"PatchEmbed expects images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ValueError(
                f"Input size {height}x{width} is not a multiple of the patch size {ph}x{pw}: "
                f"resize or crop to e.g. {max(ph, height // ph * ph)}x{max(pw, width // pw * pw)}"
            )
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x)


class ConvStemPatchEmbed(PatchEmbed):
    """:class:`PatchEmbed` whose projection is a small convolutional stem, after Xiao et al. (2021),
    "Early convolutions help transformers see better": log2(p) stride-2 3 x 3 convolutions, each
    followed by GroupNorm (one group: no batch statistics, so student and EMA teacher behave alike)
    and GELU, widening to ``embed_dim / 2``, then a 1 x 1 convolution to ``embed_dim``. The token grid
    is that of the strided patch convolution, but neighbouring tokens see overlapping pixels, which is
    what a small model trained on little data lacks (docs/quickdraw_recipe.md measures it)."""

    def _projection(self) -> nn.Module:
        ph, pw = self.patch_size
        steps = ph.bit_length() - 1
        if ph != pw or ph < 2 or ph != 1 << steps:
            raise ValueError(f"the conv stem needs a square power-of-two patch size, got {ph}x{pw}")
        if self.embed_dim % (1 << steps):
            raise ValueError(f"the conv stem needs embed_dim divisible by {1 << steps}, got {self.embed_dim}")
        layers, width = [], self.in_chans
        for step in range(steps):
            out = self.embed_dim >> (steps - step)
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(1, out), nn.GELU()]
            width = out
        layers.append(nn.Conv2d(width, self.embed_dim, 1))
        return nn.Sequential(*layers)


PATCH_EMBEDS = {"linear": PatchEmbed, "conv_stem": ConvStemPatchEmbed}
