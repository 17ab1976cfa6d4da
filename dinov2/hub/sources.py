"""One backbone loader for every place that needs "a backbone from somewhere": evaluation
(:mod:`dinov2.eval.setup`), classifiers, warm start, consolidation's check and the hub entry points.

A *source* is one of

* ``random`` - a randomly initialised ViT (``arch`` and shape options), for training from scratch;
* ``hub:<entry>`` - an official architecture (``dinov2_vits14``, ``dinov2_vitb14_reg``, ...) with
  its weights from ``weights=PATH`` (nothing is downloaded);
* a training output directory (``<dir>/config.yaml`` + ``<dir>/exports/teacher_backbone_latest.pth``,
  or another export named by ``weights``);
* a weights file (``.pth``/``.pt``/``.safetensors``): our consolidated export or an official DINOv2
  checkpoint. A file in a training output's ``exports/`` is built from that run's ``config.yaml``
  (unless ``num_heads`` is given), as the directory would be. Elsewhere the architecture is read
  off the tensor shapes; only ``num_heads`` and the position-embedding resize rule cannot be, so
  the heads default to ``embed_dim // 64`` (true for every released ViT) unless given. A DINOv3 file (our
  export of a DINOv3-style run, or an official DINOv3 checkpoint) is recognised by its RoPE buffer
  ``rope_embed.periods`` and built as a :class:`~dinov2.models.vision_transformer_v3.DinoV3VisionTransformer`,
  whose head width the buffer gives (4 x its length), so nothing needs guessing;
* ``timm:<name>`` - any ``timm`` model (optional dependency), randomly initialised unless
  ``weights=PATH``;
* a transformers DINOv2 or DINOv3 folder (``config.json`` + ``model.safetensors``: ``Dinov2Model``,
  ``Dinov2WithRegistersModel``, ``DINOv3ViTModel``), read by :func:`dinov2.hub.interop.load_transformers_backbone`.

Besides the module, :func:`load_backbone` returns a *build spec*: a dict of plain values from which
:func:`build_backbone_from_spec` rebuilds the same architecture without weights (for a training
output it also holds ``normalization``, the run's ``crops.mean`` / ``crops.std``). Classifier files
store it so that loading them never needs the original source.

The pieces are public for callers that name the architecture themselves:
:func:`resolve_weights_path` (the backbone file behind a file or training output directory; a
sharded checkpoint is refused unread with the command that consolidates it) and
:func:`load_backbone_from_config` (the teacher backbone a training config describes).
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from dinov2.layers import ConvStemPatchEmbed
from dinov2.models.vision_transformer import ARCHITECTURES, DinoVisionTransformer, make_vit
from dinov2.models.vision_transformer_v3 import DINOV3_RELEASES, DinoV3VisionTransformer, make_dinov3_release

from .weights import PathLike, check_state_dict, load_backbone_weights, load_weights_only, read_state_dict

TRAINING_EXPORT = Path("exports") / "teacher_backbone_latest.pth"
EXPORT_NAME = TRAINING_EXPORT.name
_WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")


class BackboneSourceError(ValueError):
    """A backbone source that cannot be resolved; the message names it."""


def _ffn_layer_name(module: nn.Module) -> str:
    from dinov2.layers import Mlp, SwiGLUFFN, SwiGLUFFNFused

    if isinstance(module, SwiGLUFFNFused):
        return "swiglufused"
    if isinstance(module, SwiGLUFFN):
        return "swiglu_unfused"
    if isinstance(module, Mlp):
        return "mlp"
    raise BackboneSourceError(f"unknown feed-forward module {type(module).__name__}")


def vit_kwargs_of(model: DinoVisionTransformer) -> Dict[str, Any]:
    """Constructor arguments that rebuild ``model``'s architecture (weights aside)."""
    block = model.blocks[0]
    grid = model.pos_embed.shape[1] - 1
    ffn = _ffn_layer_name(block.mlp)
    if ffn == "mlp":
        mlp_ratio = block.mlp.fc1.out_features / model.embed_dim
        ffn_bias = block.mlp.fc1.bias is not None
    else:
        hidden = block.mlp.w3.in_features
        # The fused variant shrinks the nominal width by 2/3; invert that for the stored ratio.
        mlp_ratio = hidden * 3 / 2 / model.embed_dim if ffn == "swiglufused" else hidden / model.embed_dim
        ffn_bias = block.mlp.w12.bias is not None
    ls = getattr(block.ls1, "gamma", None)
    return dict(
        img_size=int(round(math.sqrt(grid))) * model.patch_size,
        patch_size=int(model.patch_size),
        in_chans=int(model.patch_embed.in_chans),
        embed_dim=int(model.embed_dim),
        depth=int(model.n_blocks),
        num_heads=int(model.num_heads),
        mlp_ratio=float(mlp_ratio),
        qkv_bias=block.attn.qkv.bias is not None,
        proj_bias=block.attn.proj.bias is not None,
        ffn_bias=bool(ffn_bias),
        init_values=None if ls is None else 1.0,
        ffn_layer=ffn,
        num_register_tokens=int(model.num_register_tokens),
        interpolate_antialias=bool(model.interpolate_antialias),
        interpolate_offset=float(model.interpolate_offset),
        **({"patch_embed": "conv_stem"} if isinstance(model.patch_embed, ConvStemPatchEmbed) else {}),
    )


def infer_vit_kwargs(state: Mapping[str, torch.Tensor], num_heads: Optional[int] = None) -> Dict[str, Any]:
    """Architecture of a DINOv2-format state dict, read off key names and tensor shapes."""
    for key in ("cls_token", "pos_embed", "blocks.0.attn.qkv.weight"):
        if key not in state:
            raise BackboneSourceError(f"not a DINOv2 ViT state dict: key {key!r} is missing")
    patch_embed, patch_size, in_chans = _patch_embed_of(state)
    embed_dim = state["cls_token"].shape[-1]
    grid = state["pos_embed"].shape[1] - 1
    side = int(round(math.sqrt(grid)))
    if side * side != grid:
        raise BackboneSourceError(f"pos_embed holds {grid} patch positions, which is not a square grid")
    depth = 1 + max(int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in state) if m)
    if num_heads is None:
        if embed_dim < 64:
            raise BackboneSourceError(f"embed_dim {embed_dim} < 64: pass num_heads explicitly")
        num_heads = embed_dim // 64
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    if "blocks.0.mlp.fc1.weight" in state:
        ffn_layer, mlp_ratio = "mlp", state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
        ffn_bias = "blocks.0.mlp.fc1.bias" in state
    elif "blocks.0.mlp.w12.weight" in state:
        hidden = state["blocks.0.mlp.w3.weight"].shape[1]
        ffn_bias = "blocks.0.mlp.w12.bias" in state
        fused_hidden = (int(4 * embed_dim * 2 / 3) + 7) // 8 * 8
        if hidden == fused_hidden:
            ffn_layer, mlp_ratio = "swiglufused", 4.0
        else:
            ffn_layer, mlp_ratio = "swiglu_unfused", hidden / embed_dim
    else:
        raise BackboneSourceError("state dict has neither mlp.fc1 nor mlp.w12 weights in block 0")
    return dict(
        img_size=side * patch_size,
        patch_size=int(patch_size),
        in_chans=int(in_chans),
        embed_dim=int(embed_dim),
        depth=int(depth),
        num_heads=int(num_heads),
        mlp_ratio=float(mlp_ratio),
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        proj_bias="blocks.0.attn.proj.bias" in state,
        ffn_bias=bool(ffn_bias),
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
        ffn_layer=ffn_layer,
        num_register_tokens=int(registers),
        # The released register models use antialiased interpolation without offset.
        interpolate_antialias=bool(registers),
        interpolate_offset=0.0 if registers else 0.1,
        **({"patch_embed": patch_embed} if patch_embed != "linear" else {}),
    )


def _patch_embed_of(state: Mapping[str, torch.Tensor]) -> Tuple[str, int, int]:
    """(kind, patch size, input channels) of a state dict's patch embedding: the released strided
    convolution (``patch_embed.proj.weight``) or a ``ConvStemPatchEmbed`` (``patch_embed.proj.<i>.*``:
    one stride-2 3 x 3 convolution per halving, then a 1 x 1 one)."""
    if "patch_embed.proj.weight" in state:
        weight = state["patch_embed.proj.weight"]
        return "linear", weight.shape[-1], weight.shape[1]
    convs = [
        value
        for key, value in state.items()
        if re.fullmatch(r"patch_embed\.proj\.\d+\.weight", key) and value.ndim == 4 and value.shape[-1] == 3
    ]
    if not convs:
        raise BackboneSourceError(
            "not a DINOv2 ViT state dict: key 'patch_embed.proj.weight' (or a conv stem's patch_embed.proj.0.weight) is missing"
        )
    return "conv_stem", 2 ** len(convs), state["patch_embed.proj.0.weight"].shape[1]


# The key that only DINOv3 files have: the RoPE periods (DINOv2 files have pos_embed instead).
DINOV3_MARKER_KEY = "rope_embed.periods"
_SWIGLU_ALIGNMENTS = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}


def is_dinov3_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` is a DINOv3 ViT backbone (RoPE periods), not a DINOv2 one."""
    return DINOV3_MARKER_KEY in state


def _ratio_for_width(hidden: int, embed_dim: int) -> float:
    """A ratio whose ``int(embed_dim * ratio)`` is exactly ``hidden`` (the blocks' width rule)."""
    for ratio in (hidden / embed_dim, (hidden + 0.5) / embed_dim):
        if int(embed_dim * ratio) == hidden:
            return ratio
    raise BackboneSourceError(f"no feed-forward ratio gives width {hidden} for embed_dim {embed_dim}")


def _rope_period_kwargs(periods: torch.Tensor, head_dim: int) -> Dict[str, Any]:
    """``rope_base`` (or ``rope_min_period`` / ``rope_max_period``) that reproduce a periods buffer."""
    from dinov2.layers.rope import rope_periods

    if periods.is_meta:  # shapes only (a model built on the meta device): the releases' base
        return dict(rope_base=100.0, rope_min_period=None, rope_max_period=None)
    values = periods.detach().float().cpu()
    if values.numel() > 1 and abs(float(values[0]) - 1.0) < 1e-6:
        base = float(f"{float(values[1]) ** (head_dim / 4):.5g}")  # float32 periods: 5 digits are exact
        if torch.allclose(rope_periods(head_dim, base), values, rtol=1e-4):
            return dict(rope_base=base, rope_min_period=None, rope_max_period=None)
    low, high = float(values[0]), float(values[-1])
    if values.numel() > 1 and 0 < low < high:
        if torch.allclose(rope_periods(head_dim, None, low, high), values, rtol=1e-4):
            return dict(rope_base=None, rope_min_period=low, rope_max_period=high)
    # Periods of no known rule (or a single one, which any base gives): the releases' base. The
    # model uses the file's buffer either way; only a rebuild without weights would differ.
    return dict(rope_base=100.0, rope_min_period=None, rope_max_period=None)


def infer_dinov3_kwargs(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Architecture of a DINOv3-format state dict, read off key names and tensor shapes.

    The head width is 4 x the length of ``rope_embed.periods``. What shapes cannot tell (LayerNorm
    epsilon, RoPE coordinate options) is that of the released models (the class defaults)."""
    for key in ("cls_token", DINOV3_MARKER_KEY, "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"):
        if key not in state:
            raise BackboneSourceError(f"not a DINOv3 ViT state dict: key {key!r} is missing")
    embed_dim = int(state["cls_token"].shape[-1])
    head_dim = 4 * state[DINOV3_MARKER_KEY].numel()
    if head_dim == 0 or embed_dim % head_dim:
        raise BackboneSourceError(
            f"{DINOV3_MARKER_KEY} holds {head_dim // 4} periods (head width {head_dim}), which does not divide "
            f"embed_dim {embed_dim}"
        )
    proj = state["patch_embed.proj.weight"]
    depth = 1 + max(int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in state) if m)
    if "blocks.0.mlp.fc1.weight" in state:
        ffn_layer, hidden = "mlp", int(state["blocks.0.mlp.fc1.weight"].shape[0])
        mlp_ratio = _ratio_for_width(hidden, embed_dim)
        ffn_bias = "blocks.0.mlp.fc1.bias" in state
    elif "blocks.0.mlp.w1.weight" in state:
        from dinov2.layers.swiglu_ffn import swiglu_aligned_width

        hidden = int(state["blocks.0.mlp.w1.weight"].shape[0])
        # The nominal width whose 2/3 is the hidden width (the blocks then round it up to the alignment).
        mlp_ratio = _ratio_for_width((hidden * 3 + 1) // 2, embed_dim)
        fits = [
            name
            for name, align in _SWIGLU_ALIGNMENTS.items()
            if swiglu_aligned_width(int(embed_dim * mlp_ratio), align) == hidden
        ]
        if not fits:
            raise BackboneSourceError(
                f"SwiGLU width {hidden} does not follow the DINOv3 rule for embed_dim {embed_dim}"
            )
        ffn_layer, ffn_bias = fits[0], "blocks.0.mlp.w1.bias" in state
    else:
        raise BackboneSourceError("state dict has neither mlp.fc1 nor mlp.w1 weights in block 0")
    qkv_bias = "blocks.0.attn.qkv.bias" in state
    return dict(
        patch_size=int(proj.shape[-1]),
        in_chans=int(proj.shape[1]),
        embed_dim=embed_dim,
        depth=int(depth),
        num_heads=embed_dim // head_dim,
        mlp_ratio=float(mlp_ratio),
        qkv_bias=qkv_bias,
        ffn_bias=bool(ffn_bias),
        proj_bias="blocks.0.attn.proj.bias" in state,
        init_values=1e-5 if "blocks.0.ls1.gamma" in state else None,
        ffn_layer=ffn_layer,
        num_storage_tokens=int(state["storage_tokens"].shape[1]) if "storage_tokens" in state else 0,
        # Without a qkv bias there is nothing to mask (the released ViT-7B/16 is built with the option on).
        mask_k_bias="blocks.0.attn.qkv.bias_mask" in state or not qkv_bias,
        untie_cls_and_patch_norms="cls_norm.weight" in state,
        untie_global_and_local_cls_norm="local_cls_norm.weight" in state,
        **_rope_period_kwargs(state[DINOV3_MARKER_KEY], head_dim),
    )


def _export_hint(directory: Path) -> str:
    return (
        f"Training writes one every evaluation.export_period_iterations iterations; to make one now from the "
        f"newest checkpoint, run `python scripts/consolidate_checkpoint.py {directory} "
        f"--output {directory / TRAINING_EXPORT}` (see its --help)."
    )


def _is_sharded_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file()  # only looked at, never read: it is a pickle


def _sharded_checkpoint_message(option: str, path: Path) -> str:
    return (
        f"{option}: {path} is a sharded training checkpoint (torch.distributed.checkpoint). "
        f"Turn it into one backbone file with `python scripts/consolidate_checkpoint.py {path} --output teacher.pth` "
        f"and pass that file, or pass the training output directory once it has an export."
    )


def resolve_weights_path(path: PathLike, option: str = "--pretrained-weights") -> Path:
    """The backbone file behind ``path``: a weights file as given; for a training output directory its
    ``exports/teacher_backbone_latest.pth`` (or a ``teacher_backbone_latest.pth`` directly inside).

    A sharded training checkpoint (``torch.distributed.checkpoint``) is refused without reading
    it, naming the command that consolidates it. ``option`` names the setting in errors
    (``--pretrained-weights``, ``student.pretrained_weights``, ...)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{option}: {path} does not exist")
    if _is_sharded_checkpoint(path):
        raise ValueError(_sharded_checkpoint_message(option, path))
    for candidate in (path / TRAINING_EXPORT, path / EXPORT_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{option}: {path} is a directory without a teacher export ({path / TRAINING_EXPORT} "
        f"does not exist yet). {_export_hint(path)}"
    )


def load_backbone_from_config(
    cfg, weights: Optional[Union[PathLike, Mapping]] = None, drop_path_rate: float = 0.0
) -> Tuple[nn.Module, Dict[str, Any]]:
    """(backbone, build spec) of the teacher a training config (``DictConfig``) describes, built for
    its ``crops.global_crops_size``; ``weights`` (a file or a state dict) load strictly when given.

    The spec's ``normalization`` is the run's ``crops.mean`` / ``crops.std``: how the backbone saw
    images in training, a good default for whatever is built on it."""
    from dinov2.models import build_backbone

    model = build_backbone(cfg.student, cfg.crops.global_crops_size, drop_path_rate=drop_path_rate)
    if weights is not None:
        load_backbone_weights(model, weights)
    spec = backbone_spec(model)
    spec["normalization"] = {"mean": [float(v) for v in cfg.crops.mean], "std": [float(v) for v in cfg.crops.std]}
    return model, spec


def build_backbone_from_spec(spec: Mapping[str, Any], drop_path_rate: float = 0.0) -> nn.Module:
    """A randomly initialised module of the architecture described by ``spec``."""
    kind = spec.get("kind")
    if kind == "vit":
        return DinoVisionTransformer(drop_path_rate=drop_path_rate, **spec["kwargs"])
    if kind == "dinov3":
        return DinoV3VisionTransformer(drop_path_rate=drop_path_rate, **spec["kwargs"])
    if kind == "timm":
        return _timm_model(spec["name"], **dict(spec.get("kwargs", {})))
    raise BackboneSourceError(f"unknown backbone spec kind {kind!r} (expected 'vit', 'dinov3' or 'timm')")


def _timm_model(name: str, **kwargs) -> nn.Module:
    try:
        import timm
    except ImportError as error:
        raise BackboneSourceError(
            f"backbone 'timm:{name}' needs the optional timm package: pip install 'dinov2[timm]'"
        ) from error
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def backbone_spec(model: nn.Module) -> Dict[str, Any]:
    """The build spec of a ViT module (DINOv2 or DINOv3): :func:`build_backbone_from_spec` rebuilds its shape."""
    if isinstance(model, DinoV3VisionTransformer):
        return {"kind": "dinov3", "kwargs": dict(model.architecture)}
    return {"kind": "vit", "kwargs": vit_kwargs_of(model)}


def load_dinov3_weights(
    build: Callable[[], DinoV3VisionTransformer], state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> DinoV3VisionTransformer:
    """``build()`` with the weights of ``state``, loaded strictly (errors list every bad key).

    The model is built on the meta device and takes the loaded tensors (cast to float32) as its own,
    so no random initialisation is computed and thrown away, and a large model (ViT-7B/16: 27 GB in
    float32) is never held twice in memory."""
    with torch.device("meta"):
        model = build()
    check_state_dict(model, state, source)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def backbone_from_state_dict(
    state: Mapping[str, torch.Tensor],
    source: str = "state dict",
    num_heads: Optional[int] = None,
    drop_path_rate: float = 0.0,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """(backbone, build spec) for a backbone state dict (DINOv2 or DINOv3 format, told apart by its
    keys), loaded strictly; ``source`` names it in errors."""
    if is_dinov3_state_dict(state):
        kwargs = infer_dinov3_kwargs(state)
        if num_heads is not None and num_heads != kwargs["num_heads"]:
            raise BackboneSourceError(
                f"{source}: num_heads={num_heads} given, but its RoPE periods make {kwargs['num_heads']} heads"
            )
        model = load_dinov3_weights(
            partial(DinoV3VisionTransformer, drop_path_rate=drop_path_rate, **kwargs), state, source
        )
        return model, backbone_spec(model)
    else:
        kwargs = infer_vit_kwargs(state, num_heads=num_heads)
        model = DinoVisionTransformer(drop_path_rate=drop_path_rate, **kwargs)
        spec = {"kind": "vit", "kwargs": kwargs}
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)
    return model, spec


def load_backbone(
    source: str,
    weights: Optional[PathLike] = None,
    arch: str = "vit_small",
    num_heads: Optional[int] = None,
    drop_path_rate: float = 0.0,
    **vit_options,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """(backbone, build spec) for ``source`` (see the module docstring).

    ``arch`` and ``vit_options`` (``patch_size``, ``img_size``, ``embed_dim``, ``depth``,
    ``num_heads``, ``num_register_tokens``, ...) shape a ``random`` backbone; ``num_heads`` also
    overrides the guess for a weights file; ``drop_path_rate`` sets stochastic depth for fine-tuning.
    """
    source = str(source)
    if source == "random":
        if arch in DINOV3_RELEASES:  # a published DINOv3 shape, randomly initialised
            model = make_dinov3_release(arch, drop_path_rate=drop_path_rate)
            return model, backbone_spec(model)
        if arch not in ARCHITECTURES:
            raise BackboneSourceError(
                f"unknown arch {arch!r}; valid: {sorted(ARCHITECTURES)} or a DINOv3 shape {sorted(DINOV3_RELEASES)}"
            )
        model = make_vit(arch, num_heads=num_heads, drop_path_rate=drop_path_rate, **vit_options)
        return model, backbone_spec(model)
    if source.startswith("hub:"):
        from .backbones import ENTRY_POINTS

        entry = source[4:]
        if entry not in ENTRY_POINTS:
            raise BackboneSourceError(f"unknown hub entry {entry!r}; valid: {sorted(ENTRY_POINTS)}")
        if weights is None:
            raise BackboneSourceError(f"backbone {source!r} needs weights=PATH to a local weights file")
        model = ENTRY_POINTS[entry](pretrained=True, pretrained_weights=weights, drop_path_rate=drop_path_rate)
        return model, backbone_spec(model)
    if source.startswith("timm:"):
        name = source[5:]
        model = _timm_model(name)
        if weights is not None:
            state = load_weights_only(weights, "timm weights file")
            model.load_state_dict(state, strict=True)
        return model, {"kind": "timm", "name": name, "kwargs": {}}
    path = Path(source)
    from .interop import is_transformers_folder, load_transformers_backbone  # interop builds on this module

    if is_transformers_folder(path):
        model = load_transformers_backbone(path, drop_path_rate=drop_path_rate)
        return model, backbone_spec(model)
    if path.is_dir():
        return _from_training_output(path, weights, drop_path_rate)
    if path.is_file():
        run = _training_output_of_export(path)
        if run is not None and num_heads is None:
            # The run's config knows what the tensors do not: heads, position-embedding rule.
            return _from_training_output(run, path, drop_path_rate)
        return backbone_from_state_dict(read_state_dict(path), str(path), num_heads, drop_path_rate)
    raise BackboneSourceError(
        f"backbone source {source!r} is not 'random', 'hub:<entry>', 'timm:<name>', an existing "
        f"training output directory or an existing weights file ({', '.join(_WEIGHT_SUFFIXES)})"
    )


def _training_output_of_export(path: Path) -> Optional[Path]:
    """The training output directory a weights file was exported into (``<dir>/exports/<file>`` with
    ``<dir>/config.yaml``), or None for a file elsewhere."""
    from dinov2.utils.config import CONFIG_FILE_NAME

    run = path.resolve().parent.parent
    return run if path.resolve().parent.name == "exports" and (run / CONFIG_FILE_NAME).is_file() else None


def _from_training_output(directory: Path, weights: Optional[PathLike], drop_path_rate: float):
    from dinov2.utils.config import CONFIG_FILE_NAME, load_saved_config

    if _is_sharded_checkpoint(directory):
        raise BackboneSourceError(_sharded_checkpoint_message("backbone source", directory))
    config_path = directory / CONFIG_FILE_NAME
    if not config_path.is_file():
        raise BackboneSourceError(f"{directory} is not a training output directory: no {CONFIG_FILE_NAME}")
    cfg = load_saved_config(config_path)
    weights_path = Path(weights) if weights is not None else directory / TRAINING_EXPORT
    if not weights_path.is_absolute() and not weights_path.exists():
        weights_path = directory / weights_path
    if not weights_path.is_file():
        hint = _export_hint(directory) if weights is None else "Export one from a checkpoint first."
        raise BackboneSourceError(f"training output {directory} has no backbone export {weights_path}. {hint}")
    return load_backbone_from_config(cfg, weights_path, drop_path_rate=drop_path_rate)
