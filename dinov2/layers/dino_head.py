"""Projection heads of DINO / iBOT: MLP -> L2-normalised bottleneck -> prototype scores."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.layers.batch_norm import AllReduce, GlobalBatchNorm1d

__all__ = ["DINOHead", "WeightNormalizedLinear", "build_dino_ibot_heads"]


class WeightNormalizedLinear(nn.Module):
    """Bias-free weight-normalised linear layer: ``weight = weight_g * weight_v / ||weight_v||``,
    row by row (one prototype per output).

    The parametrisation, initialisation and state-dict keys of upstream DINOv2's prototype layer,
    ``torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` with ``weight_g`` filled with 1:
    ``weight_v`` (``(out_features, in_features)``, the prototype directions) and ``weight_g``
    (``(out_features, 1)``, their magnitudes). A state dict of that module loads strictly.

    Args:
        fixed_magnitude: False (DINOv2): ``weight_g`` is a trained parameter, so each prototype
            learns a scale of its logits. True (DINO's ``norm_last_layer``): ``weight_g`` is a
            buffer, fixed at 1 (or at the loaded value), and output ``k`` is the cosine-like score
            ``<x, v_k / ||v_k||>``. The keys are the same either way, so a checkpoint loads
            whatever the setting it was written with.

    Plain tensors instead of a parametrization keep the module friendly to FSDP2 ``fully_shard``
    (both shard along dim 0 and are combined after the all-gather) and to DCP checkpoints.
    """

    def __init__(self, in_features: int, out_features: int, fixed_magnitude: bool = False, eps: float = 1e-12):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fixed_magnitude = fixed_magnitude
        self.eps = eps
        magnitude = torch.ones(out_features, 1)
        if fixed_magnitude:
            self.register_buffer("weight_g", magnitude)
        else:
            self.weight_g = nn.Parameter(magnitude)
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default initialisation of the directions, magnitudes 1 (as upstream).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        with torch.no_grad():
            self.weight_g.fill_(1.0)

    def normalized_weight(self) -> torch.Tensor:
        """The prototype directions: rows of ``weight_v`` scaled to unit L2 norm."""
        return F.normalize(self.weight_v, p=2, dim=1, eps=self.eps)

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies: ``weight_g * normalized_weight()`` (exactly the
        directions while the magnitudes are 1)."""
        return self.weight_g * self.normalized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fixed_magnitude={self.fixed_magnitude}"
        )


def _build_mlp(
    nlayers: int,
    in_dim: int,
    bottleneck_dim: int,
    hidden_dim: int,
    use_bn: bool,
    bias: bool,
    bn_all_reduce: AllReduce | None = None,
) -> nn.Sequential:
    if nlayers < 1:
        raise ValueError(f"DINOHead nlayers must be >= 1, got {nlayers}")
    if nlayers == 1:
        # A linear projection; with BatchNorm it standardises each bottleneck unit over the batch
        # before the L2 normalisation (a "linear + BN" head, which the Quick, Draw! recipe uses).
        layers = [nn.Linear(in_dim, bottleneck_dim, bias=bias)]
        if use_bn:
            layers.append(GlobalBatchNorm1d(bottleneck_dim, all_reduce=bn_all_reduce))
        return nn.Sequential(*layers)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(GlobalBatchNorm1d(d_out, all_reduce=bn_all_reduce))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """``nlayers``-layer MLP (GELU) to a ``bottleneck_dim`` feature, L2-normalised, then scored
    against ``out_dim`` prototypes by a :class:`WeightNormalizedLinear` (``self.last_layer``).

    ``head(x)`` takes a ``(B, in_dim)`` or ``(B, N, in_dim)`` tensor (patch tokens) and returns
    logits with the same leading shape. ``head([x1, x2, ...])`` takes *groups* of tokens that
    must not share BatchNorm statistics (the CLS tokens of global crops, those of smaller local
    crops, masked patch tokens): the linear layers run once on all rows, every BatchNorm layer
    normalises each group with the statistics of that group alone, and the logits come back as a
    list, one tensor per group. Without BatchNorm a list gives the same values as one call on the
    concatenation. One call per step and module matters under FSDP2 (the head is gathered once).

    The head's BatchNorm layers always normalise with the statistics of the rows they are given,
    in eval mode too (:meth:`train` keeps them in training mode): the teacher runs in eval mode
    (no stochastic depth) but must standardise its own batch as the student does, since running
    statistics, which start at mean 0 / variance 1, would make a young model's targets nearly
    identical from image to image. The running statistics are still updated and saved.

    The training loop freezes the prototypes for the first epoch(s) by zeroing the gradients of
    ``head.last_layer.parameters()`` (``weight_v``, and ``weight_g`` when it is trained).

    Args:
        in_dim: backbone embedding size.
        out_dim: number of prototypes (65536 in DINOv2).
        use_bn: BatchNorm after the hidden linear layers (3-D inputs are flattened for it), with
            statistics over the global batch of all ranks (:class:`GlobalBatchNorm1d`); a
            one-layer head (``nlayers=1``) has it after its only linear layer instead.
        bn_all_reduce: how that BatchNorm sums its statistics over the ranks (autograd-aware,
            e.g. ``dinov2.distributed.differentiable_all_reduce_sum``); None: this process's rows.
        nlayers: linear layers in the MLP (3).
        hidden_dim: MLP width (2048).
        bottleneck_dim: size of the normalised feature scored against the prototypes (256).
        mlp_bias: biases in the MLP linear layers.
        norm_last_layer: fix the prototypes' magnitudes (``last_layer.weight_g``) at 1, so every
            logit is a cosine in ``[-1, 1]`` (DINO's option of that name). False (DINOv2): they
            are trained, in the prototypes' parameter group.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
        norm_last_layer: bool = False,
        bn_all_reduce: AllReduce | None = None,
    ):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.bottleneck_dim = bottleneck_dim
        self.use_bn = use_bn
        self.mlp = _build_mlp(
            nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn=use_bn, bias=mlp_bias, bn_all_reduce=bn_all_reduce
        )
        self.last_layer = WeightNormalizedLinear(bottleneck_dim, out_dim, fixed_magnitude=norm_last_layer)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter, e.g. after building on the meta device and
        ``to_empty()``: truncated-normal (std 0.02) MLP weights, zero biases, default
        initialisation of the prototypes."""
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm1d):
                module.reset_parameters()
        self.last_layer.reset_parameters()

    def train(self, mode: bool = True) -> "DINOHead":
        super().train(mode)
        for module in self.mlp.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.train(True)  # batch statistics in both modes (see the class docstring)
        return self

    def _mlp_by_group(self, rows: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        for layer in self.mlp:
            if isinstance(layer, nn.BatchNorm1d) and len(sizes) > 1:
                rows = torch.cat([layer(group) for group in rows.split(sizes)])
            else:
                rows = layer(rows)
        return rows

    def _bottleneck_rows(self, groups: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[int]]:
        if not groups:
            raise ValueError("DINOHead got an empty list of token groups")
        rows = [group.reshape(-1, group.shape[-1]) for group in groups]  # BatchNorm1d wants (rows, features)
        sizes = [r.shape[0] for r in rows]
        x = self._mlp_by_group(torch.cat(rows) if len(rows) > 1 else rows[0], sizes)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, p=2, dim=-1, eps=eps), sizes

    @staticmethod
    def _regroup(rows: torch.Tensor, groups: Sequence[torch.Tensor], sizes: List[int]) -> List[torch.Tensor]:
        return [part.reshape(*group.shape[:-1], -1) for part, group in zip(rows.split(sizes), groups)]

    def forward_bottleneck(
        self, x: Union[torch.Tensor, Sequence[torch.Tensor]]
    ) -> Union[torch.Tensor, List[torch.Tensor]]:
        """The L2-normalised bottleneck feature (before the prototypes), of a tensor or of each
        group of a list."""
        groups = [x] if isinstance(x, torch.Tensor) else list(x)
        rows, sizes = self._bottleneck_rows(groups)
        out = self._regroup(rows, groups, sizes)
        return out[0] if isinstance(x, torch.Tensor) else out

    def forward(self, x: Union[torch.Tensor, Sequence[torch.Tensor]], with_bottleneck: bool = False):
        """Logits of a tensor, or of each group of a list; with ``with_bottleneck``, the pair
        (logits, L2-normalised bottleneck features) in the same layout. (A keyword of forward
        rather than a method of its own: an FSDP2-wrapped head gathers its weights in forward.)"""
        groups = [x] if isinstance(x, torch.Tensor) else list(x)
        rows, sizes = self._bottleneck_rows(groups)
        out = self._regroup(self.last_layer(rows), groups, sizes)
        if isinstance(x, torch.Tensor):
            out = out[0]
        if not with_bottleneck:
            return out
        bottleneck = self._regroup(rows, groups, sizes)
        return out, (bottleneck[0] if isinstance(x, torch.Tensor) else bottleneck)


def build_dino_ibot_heads(
    in_dim: int,
    dino_out_dim: int,
    ibot_out_dim: int | None = None,
    separate_ibot_head: bool = False,
    hidden_dim: int = 2048,
    bottleneck_dim: int = 256,
    nlayers: int = 3,
    ibot_hidden_dim: int | None = None,
    ibot_bottleneck_dim: int | None = None,
    ibot_nlayers: int | None = None,
    use_bn: bool = False,
    mlp_bias: bool = True,
    norm_last_layer: bool = False,
) -> tuple[DINOHead, DINOHead]:
    """Build the DINO head and the iBOT head.

    With ``separate_ibot_head=False`` the iBOT head *is* the DINO head (the same module object
    is returned twice, so its parameters are shared and must be registered once); its
    prototypes are then ``dino_out_dim`` and ``ibot_out_dim`` must be None or equal. With
    ``separate_ibot_head=True`` a second head is built from the ``ibot_*`` arguments (each
    defaulting to the DINO value).

    Returns:
        ``(dino_head, ibot_head)``.
    """
    dino_head = DINOHead(
        in_dim,
        dino_out_dim,
        use_bn=use_bn,
        nlayers=nlayers,
        hidden_dim=hidden_dim,
        bottleneck_dim=bottleneck_dim,
        mlp_bias=mlp_bias,
        norm_last_layer=norm_last_layer,
    )
    if not separate_ibot_head:
        if ibot_out_dim is not None and ibot_out_dim != dino_out_dim:
            raise ValueError(
                f"a shared iBOT head has the DINO head's {dino_out_dim} prototypes, but ibot_out_dim={ibot_out_dim}; "
                "set separate_ibot_head=True or make them equal"
            )
        return dino_head, dino_head
    ibot_head = DINOHead(
        in_dim,
        dino_out_dim if ibot_out_dim is None else ibot_out_dim,
        use_bn=use_bn,
        nlayers=nlayers if ibot_nlayers is None else ibot_nlayers,
        hidden_dim=hidden_dim if ibot_hidden_dim is None else ibot_hidden_dim,
        bottleneck_dim=bottleneck_dim if ibot_bottleneck_dim is None else ibot_bottleneck_dim,
        mlp_bias=mlp_bias,
        norm_last_layer=norm_last_layer,
    )
    return dino_head, ibot_head
