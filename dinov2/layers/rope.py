"""Axial rotary position embedding (RoPE), as in the DINOv3 ViTs.

Instead of adding a learned table to the tokens, attention rotates each patch token's query and key
by angles that depend on the patch's position, so that ``q(p) . k(p')`` depends on positions only
through their difference ``p - p'`` (Su et al., 2021). "Axial": the two image axes use separate
channels. Within each head of width ``D``, channel ``i`` and channel ``i + D/2`` form a rotated
pair; pairs ``0 .. D/4 - 1`` turn with the patch's row coordinate, pairs ``D/4 .. D/2 - 1`` with its
column coordinate, pair ``j`` of an axis by ``2 pi * coordinate / periods[j mod D/4]``.

The ``periods`` buffer (key ``rope_embed.periods``, ``D/4`` values) is saved in the state dict as
the released checkpoints do, so a file carries the periods its model was trained with; it is
``base ** (4 j / D)`` (``base`` 100 in the releases), or log-spaced from ``min_period`` to
``max_period``.

Coordinates are patch centres scaled to [-1, 1]: per axis (``normalize_coords="separate"``, the
releases), or both axes by the shorter (``"min"``) or longer (``"max"``) side, which keeps the
aspect ratio. Because they are normalised, a model sees the same coordinate range at any input
size. Training may augment them (never in eval mode): ``shift_coords`` (a uniform shift in
``[-s, s]`` per axis), ``jitter_coords`` (a per-axis scale in ``[1/j, j]``, log-uniform) and
``rescale_coords`` (one scale in ``[1/r, r]`` for both axes; the releases trained with 2).

Tokens before the patches (CLS, storage tokens) are not rotated.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["NORMALIZE_COORDS", "RopePositionEmbedding", "apply_rope_to_qkv", "rope_periods", "rotate_half"]

NORMALIZE_COORDS = ("separate", "min", "max")

Rope = Tuple[torch.Tensor, torch.Tensor]
"""``(sin, cos)``, each ``(patches, head_dim)``: what :class:`RopePositionEmbedding` returns."""


def rope_periods(
    head_dim: int,
    base: Optional[float] = 100.0,
    min_period: Optional[float] = None,
    max_period: Optional[float] = None,
    device=None,
) -> torch.Tensor:
    """The ``head_dim // 4`` periods: ``base ** (4 j / head_dim)``, or log-spaced from
    ``min_period`` to ``max_period`` (give either ``base`` or both periods)."""
    n = head_dim // 4
    if min_period is not None and max_period is not None:
        exponents = torch.linspace(0, 1, n, dtype=torch.float32, device=device)
        return min_period * (max_period / min_period) ** exponents
    return base ** (2 * torch.arange(n, dtype=torch.float32, device=device) / (head_dim // 2))


def _positive_or_none(name: str, value: Optional[float], neutral: float) -> Optional[float]:
    """``None`` for an option that is off (``None`` or its neutral value), the float otherwise."""
    if value is None or float(value) == neutral:
        return None
    if value < 0 or (neutral == 1.0 and value < 1.0):
        limit = ">= 0" if neutral == 0.0 else ">= 1"
        raise ValueError(f"RoPE {name} must be {limit} (off: None or {neutral:g}), got {value!r}")
    return float(value)


class RopePositionEmbedding(nn.Module):
    """``(sin, cos)`` tables for a ``height x width`` patch grid (see the module docstring).

    Args:
        embed_dim, num_heads: the attention's width and heads; the head width must be a multiple of 4.
        base: the period base, or None when ``min_period`` and ``max_period`` are given.
        normalize_coords: "separate", "min" or "max" (see the module docstring).
        shift_coords, jitter_coords, rescale_coords: training-time coordinate augmentation;
            None (or 0 for the shift, 1 for the scales) turns one off.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        base: Optional[float] = 100.0,
        min_period: Optional[float] = None,
        max_period: Optional[float] = None,
        normalize_coords: str = "separate",
        shift_coords: Optional[float] = None,
        jitter_coords: Optional[float] = None,
        rescale_coords: Optional[float] = None,
    ):
        super().__init__()
        if embed_dim % (4 * num_heads):
            raise ValueError(
                f"RoPE needs a head width divisible by 4: embed_dim {embed_dim} / num_heads {num_heads} is not"
            )
        both_periods = min_period is not None and max_period is not None
        if (base is None) != both_periods:
            raise ValueError(
                "RoPE takes either base or both min_period and max_period, got "
                f"base={base!r}, min_period={min_period!r}, max_period={max_period!r}"
            )
        if normalize_coords not in NORMALIZE_COORDS:
            raise ValueError(f"RoPE normalize_coords must be one of {list(NORMALIZE_COORDS)}, got {normalize_coords!r}")
        self.head_dim = embed_dim // num_heads
        self.base = None if both_periods else float(base)
        self.min_period = float(min_period) if both_periods else None
        self.max_period = float(max_period) if both_periods else None
        self.normalize_coords = normalize_coords
        self.shift_coords = _positive_or_none("shift_coords", shift_coords, 0.0)
        self.jitter_coords = _positive_or_none("jitter_coords", jitter_coords, 1.0)
        self.rescale_coords = _positive_or_none("rescale_coords", rescale_coords, 1.0)
        self.register_buffer("periods", torch.empty(self.head_dim // 4), persistent=True)
        self.reset_parameters()

    @property
    def augments(self) -> bool:
        """Whether training draws random coordinate changes (so each call differs)."""
        return any(v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords))

    def reset_parameters(self) -> None:
        """Fill ``periods`` from the formula (a loaded state dict overwrites it)."""
        if self.periods.is_meta:
            # Shapes only (a model built on the meta device to take loaded weights). torch.arange on
            # the meta device first imports torch's Python reference kernels, 13 s here.
            return
        with torch.no_grad():
            periods = rope_periods(self.head_dim, self.base, self.min_period, self.max_period, self.periods.device)
            self.periods.copy_(periods)

    def coordinates(self, height: int, width: int) -> torch.Tensor:
        """``(height * width, 2)`` patch-centre coordinates (row, column), row-major, augmented in training."""
        device = self.periods.device
        if self.normalize_coords == "separate":
            scale_h, scale_w = height, width
        else:
            scale_h = scale_w = max(height, width) if self.normalize_coords == "max" else min(height, width)
        rows = torch.arange(0.5, height, device=device, dtype=torch.float32) / scale_h
        cols = torch.arange(0.5, width, device=device, dtype=torch.float32) / scale_w
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        if self.training:
            # The global RNG, on the buffer's device: seeded per rank by training, like dropout.
            if self.shift_coords is not None:
                coords = coords + torch.empty(2, device=device).uniform_(-self.shift_coords, self.shift_coords)
            if self.jitter_coords is not None:
                log_j = math.log(self.jitter_coords)
                coords = coords * torch.empty(2, device=device).uniform_(-log_j, log_j).exp()
            if self.rescale_coords is not None:
                log_r = math.log(self.rescale_coords)
                coords = coords * torch.empty(1, device=device).uniform_(-log_r, log_r).exp()
        return coords

    def forward(self, height: int, width: int) -> Rope:
        """``(sin, cos)``, each ``(height * width, head_dim)`` in float32, for a grid of patches."""
        coords = self.coordinates(height, width)
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]  # (HW, 2, D/4)
        angles = angles.flatten(1, 2).tile(2)  # (HW, D): channel i and i + D/2 share an angle
        return torch.sin(angles), torch.cos(angles)

    def extra_repr(self) -> str:
        periods = f"base={self.base}" if self.base is not None else f"periods={self.min_period}..{self.max_period}"
        return f"head_dim={self.head_dim}, {periods}, normalize_coords={self.normalize_coords!r}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` along the last dimension: pairs channel ``i`` with ``i + D/2``."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope_to_qkv(qkv: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate the queries and keys of the patch tokens of a ``(B, N, 3, heads, head_dim)`` qkv tensor.

    The patches are the last ``sin.shape[0]`` of the ``N`` tokens; the tokens before them (CLS,
    storage tokens) and all values are returned unchanged. The rotation runs in float32 and the
    result is cast back to the qkv dtype. (The tables are float32 as computed; FSDP2 mixed
    precision casts a block's floating-point inputs, tables included, to its parameter dtype.)
    """
    sin, cos = rope
    patches = sin.shape[0]
    prefix = qkv.shape[1] - patches
    if prefix < 0 or sin.shape[-1] != qkv.shape[-1]:
        raise ValueError(
            f"RoPE tables for {patches} patches of width {sin.shape[-1]} do not fit qkv of shape {tuple(qkv.shape)}"
        )
    sin, cos = sin.float()[:, None, None, :], cos.float()[:, None, None, :]  # broadcast over (q/k, heads)
    qk = qkv[:, prefix:, :2].float()
    rotated = (qk * cos + rotate_half(qk) * sin).to(qkv.dtype)
    patch_qkv = torch.cat((rotated, qkv[:, prefix:, 2:]), dim=2)
    return torch.cat((qkv[:, :prefix], patch_qkv), dim=1) if prefix else patch_qkv
