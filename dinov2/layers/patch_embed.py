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
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.Identity()

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
