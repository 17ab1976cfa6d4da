"""Projection heads of DINO / iBOT: MLP -> L2-normalised bottleneck -> prototype scores."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.layers.batch_norm import GlobalBatchNorm1d

__all__ = ["DINOHead", "WeightNormalizedLinear", "build_dino_ibot_heads"]


class WeightNormalizedLinear(nn.Module):
    """Bias-free linear layer whose weight rows are L2-normalised in every forward pass.

    Equivalent to ``weight_norm(nn.Linear(in, out, bias=False))`` with the magnitude
    (``weight_g`` / ``original0``) fixed to 1 and not trained, which is what DINO uses for its
    prototypes: output ``k`` is the cosine-like score ``<x, v_k / ||v_k||>``. Holding one plain
    parameter (``weight``, shape ``(out_features, in_features)``) instead of a parametrization
    keeps the module friendly to FSDP2 ``fully_shard`` (sharding a plain parameter along dim 0,
    then normalising the all-gathered weight) and to DCP checkpoints.
    """

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-12):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default initialisation; only the directions matter after normalisation.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def normalized_weight(self) -> torch.Tensor:
        """The effective weight: rows of unit L2 norm."""
        return F.normalize(self.weight, p=2, dim=1, eps=self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool) -> nn.Sequential:
    if nlayers < 1:
        raise ValueError(f"DINOHead nlayers must be >= 1, got {nlayers}")
    if nlayers == 1:
        # A linear projection; with BatchNorm it standardises each bottleneck unit over the batch
        # before the L2 normalisation (a "linear + BN" head, which the Quick, Draw! recipe uses).
        layers = [nn.Linear(in_dim, bottleneck_dim, bias=bias)]
        if use_bn:
            layers.append(GlobalBatchNorm1d(bottleneck_dim))
        return nn.Sequential(*layers)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(GlobalBatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """``nlayers``-layer MLP (GELU) to a ``bottleneck_dim`` feature, L2-normalised, then scored
    against ``out_dim`` prototypes by a :class:`WeightNormalizedLinear` (``self.last_layer``).

    Inputs may be ``(B, in_dim)`` or ``(B, N, in_dim)`` (patch tokens); outputs have the same
    leading shape with ``out_dim`` logits, each in ``[-1, 1]``.

    The training loop freezes the prototypes for the first epoch(s) by zeroing the gradients of
    ``head.last_layer.parameters()`` (a single tensor, ``last_layer.weight``).

    Args:
        in_dim: backbone embedding size.
        out_dim: number of prototypes (65536 in DINOv2).
        use_bn: BatchNorm after the hidden linear layers (3-D inputs are flattened for it), with
            statistics over the global batch of all ranks (:class:`GlobalBatchNorm1d`); a
            one-layer head (``nlayers=1``) has it after its only linear layer instead.
        nlayers: linear layers in the MLP (3).
        hidden_dim: MLP width (2048).
        bottleneck_dim: size of the normalised feature scored against the prototypes (256).
        mlp_bias: biases in the MLP linear layers.
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
    ):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.bottleneck_dim = bottleneck_dim
        self.use_bn = use_bn
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn=use_bn, bias=mlp_bias)
        self.last_layer = WeightNormalizedLinear(bottleneck_dim, out_dim)
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

    def forward_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck feature (before the prototypes)."""
        if self.use_bn and x.ndim > 2:  # BatchNorm1d wants (rows, features)
            lead = x.shape[:-1]
            x = self.mlp(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)
        else:
            x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, p=2, dim=-1, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.forward_bottleneck(x))


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
        in_dim, dino_out_dim, use_bn=use_bn, nlayers=nlayers, hidden_dim=hidden_dim,
        bottleneck_dim=bottleneck_dim, mlp_bias=mlp_bias,
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
    )
    return dino_head, ibot_head
