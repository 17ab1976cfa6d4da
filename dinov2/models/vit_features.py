"""What the DINOv2 and DINOv3 backbones share above their blocks.

Both classes put [CLS, register / storage tokens, patches] through a stack of ``Block``s; they
differ in how positions enter and how block outputs are normalised. Everything that only needs
the token layout lives here once: the activation-checkpointing switch, the block selection of
``get_intermediate_layers`` and that method itself, and the forward that returns the CLS token.
A backbone provides ``blocks``, ``n_blocks``, ``patch_size``, ``head``, ``forward_features``,
``_block_outputs(x, take)``, ``_num_prefix_tokens`` and ``_normalize_block_output(x)``.
"""

from __future__ import annotations

from typing import Sequence, Set, Tuple, Union

import torch


class ViTFeatureMethods:
    def set_activation_checkpointing(self, every: int) -> None:
        """Checkpoint every ``every``-th block (0: none, 1: all); see ``Block``."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(
                f"activation_checkpointing must be an integer >= 0 (0: off, k: every k-th block), got {every!r}"
            )
        for i, block in enumerate(self.blocks):
            block.checkpoint_activations = every > 0 and i % every == 0

    def _block_indices(self, n: Union[int, Sequence[int]]) -> Set[int]:
        """The last ``n`` block indices, or the indices in ``n``; out-of-range ones are an error."""
        take = set(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else set(n)
        bad = [i for i in take if not 0 <= i < self.n_blocks]
        if bad or not take:
            raise ValueError(f"block indices {sorted(bad) or n} out of range for a {self.n_blocks}-block model")
        return take

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: Union[int, Sequence[int]] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> Tuple:
        """Patch tokens of the last ``n`` blocks (or of the block indices in ``n``).

        Returns a tuple with one entry per block: patch tokens (B, N, D), or (B, D, h, w) when
        ``reshape``; with ``return_class_token`` each entry is (patch_tokens, cls_token).
        """
        outputs = self._block_outputs(x, self._block_indices(n))
        if norm:
            outputs = [self._normalize_block_output(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        patch_tokens = [out[:, self._num_prefix_tokens :] for out in outputs]
        if reshape:
            batch, _, height, width = x.shape
            grid = (height // self.patch_size, width // self.patch_size)
            patch_tokens = [p.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous() for p in patch_tokens]
        if return_class_token:
            return tuple(zip(patch_tokens, class_tokens))
        return tuple(patch_tokens)

    def forward(self, *args, is_training: bool = False, **kwargs):
        features = self.forward_features(*args, **kwargs)
        if is_training:
            return features
        return self.head(features["x_norm_clstoken"])
