"""Block-wise patch masking for iBOT (the BEiT recipe): masks are unions of random rectangles."""

from __future__ import annotations

import math
import random

import torch

__all__ = ["MaskingGenerator"]


class MaskingGenerator:
    """Draw a boolean ``(height, width)`` patch mask made of random rectangular blocks.

    Each block has a random area in ``[min_num_patches, max_num_patches]`` (capped by what is
    still needed) and a log-uniform aspect ratio in ``[min_aspect, max_aspect]``; blocks are
    placed at random positions and kept when they add at least one new patch without exceeding
    the request (once fewer than ``min_num_patches`` are missing, blocks are at most that
    small). When no block fits in 10 attempts, the remainder is filled with single patches next to the mask
    (``fill_remainder=True``) so the result has exactly the requested number of patches; with
    ``fill_remainder=False`` it behaves like BEiT / DINOv2 and may mask fewer. It never masks
    more than requested.

    Args:
        input_size: ``(height, width)`` in patches, or an int for a square grid.
        num_masking_patches: default request when called without an argument.
        min_num_patches: smallest block area (4).
        max_num_patches: largest block area (default: the whole grid).
        min_aspect: smallest block aspect ratio (0.3); the largest is ``max_aspect`` or
            ``1 / min_aspect``.
        fill_remainder: top up to the exact requested count (see above).

    Randomness comes from the ``rng`` passed to :meth:`__call__` (a ``random.Random``), or from
    Python's global ``random`` module, which PyTorch's DataLoader seeds in every worker.
    """

    max_attempts = 10

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        fill_remainder: bool = True,
    ):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = int(input_size[0]), int(input_size[1])
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"mask input_size must be positive, got {input_size}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = self.num_patches if max_num_patches is None else int(max_num_patches)
        if self.max_num_patches < self.min_num_patches:
            raise ValueError(f"max_num_patches ({self.max_num_patches}) < min_num_patches ({self.min_num_patches})")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.fill_remainder = fill_remainder

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.height}x{self.width}, blocks of {self.min_num_patches}-"
            f"{self.max_num_patches} patches, log aspect {self.log_aspect_ratio}, fill_remainder={self.fill_remainder})"
        )

    def _place_block(self, mask: torch.Tensor, max_new: int, rng: random.Random) -> int:
        """Try to add one block adding between 1 and ``max_new`` patches; return how many it added."""
        for _ in range(self.max_attempts):
            area = rng.uniform(min(self.min_num_patches, max_new), max_new)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            block = mask[top : top + h, left : left + w]
            added = h * w - int(block.sum())
            if 0 < added <= max_new:
                block.fill_(True)
                return added
        return 0

    def _fill(self, mask: torch.Tensor, count: int, rng: random.Random) -> None:
        """Mask ``count`` more patches, preferring neighbours of the current mask."""
        for _ in range(count):
            free = ~mask
            grown = torch.zeros_like(mask)
            grown[1:, :] |= mask[:-1, :]
            grown[:-1, :] |= mask[1:, :]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            candidates = (grown & free).flatten().nonzero().flatten().tolist()
            if not candidates:
                candidates = free.flatten().nonzero().flatten().tolist()
            mask.view(-1)[candidates[rng.randrange(len(candidates))]] = True

    def __call__(self, num_masking_patches: int | None = None, rng: random.Random | None = None) -> torch.Tensor:
        """Return a bool ``(height, width)`` mask with (at most, and with ``fill_remainder``
        exactly) ``num_masking_patches`` True entries."""
        if num_masking_patches is None:
            num_masking_patches = self.num_masking_patches or 0
        num_masking_patches = int(num_masking_patches)
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(f"cannot mask {num_masking_patches} of {self.num_patches} patches")
        rng = random if rng is None else rng
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            max_new = min(num_masking_patches - count, self.max_num_patches)
            added = self._place_block(mask, max_new, rng)
            if added == 0:
                break
            count += added
        if self.fill_remainder and count < num_masking_patches:
            self._fill(mask, num_masking_patches - count, rng)
        return mask
