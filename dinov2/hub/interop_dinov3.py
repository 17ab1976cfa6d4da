"""A DINOv3 backbone (:class:`DinoV3VisionTransformer`) in transformers', timm's and ONNX formats,
and a transformers DINOv3 folder back as a backbone.

:mod:`dinov2.hub.interop` dispatches here for DINOv3 models, so ``export_transformers``,
``export_timm``, ``export_onnx`` and ``load_transformers_backbone`` take either generation; this
module holds only what differs (key names, configs, the refusals).

* transformers: ``DINOv3ViTModel`` (``model_type`` ``dinov3_vit``), weights under the key names of
  the published ``facebook/dinov3-*`` folders (``layer.<i>.attention.q_proj``, ...), which
  transformers 5.x renames to its ``model.layer.<i>`` layout on load; the reader takes both.
* timm: the DINOv3 ``Eva`` models of ``timm/models/eva.py`` (``vit_small_patch16_dinov3``, ...),
  ``rope_type="dinov3"``, whose RoPE (0.5-centred coordinates scaled per axis to [-1, 1], periods
  ``rope_temperature ** (4 j / head_dim)``, rotate-half pairs) is ours.
* ONNX: :class:`dinov2.hub.interop_onnx.FixedSizeFeaturesV3` (beside the DINOv2 wrapper), the RoPE
  tables computed once for the fixed input size.

Neither target keeps a periods buffer (both recompute the periods from one base, in float32) nor
has a separate CLS norm, so RoPE settings other than a base with per-axis coordinates, periods
that do not follow the base, and ``cls_norm`` are refused with the option named; so are the
options that one of them lacks (see ``timm_model_args``). Training-only parts are left out as they never
change inference: the mask token (timm), ``local_cls_norm`` and the key-bias mask buffer.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from dinov2.layers.rope import rope_periods
from dinov2.models.vision_transformer_v3 import DinoV3VisionTransformer

from .interop import InteropError
from .sources import infer_dinov3_kwargs, load_dinov3_weights

# Periods rounded to bfloat16 (relative error <= 2**-9; timm notes that the released files store
# them so) are accepted: transformers and timm use the float32 formula instead, a small change
# that docs/dinov3.md quantifies. Anything further from the formula is refused.
_PERIODS_RTOL = 2.0**-8
# timm's DINOv3 architecture names by width (the shape itself travels in model_args).
_TIMM_SIZES = {384: "small", 768: "base", 1024: "large", 1280: "huge_plus", 4096: "7b"}
_TIMM_QKVB_SIZES = ("small", "small_plus", "base", "large", "huge_plus")  # those with a *_qkvb variant


# ------------------------------------------------------------------------------------ helpers
def _ffn_hidden(model: DinoV3VisionTransformer) -> int:
    mlp = model.blocks[0].mlp
    return mlp.fc1.out_features if hasattr(mlp, "fc1") else mlp.w1.out_features


def _gated(model: DinoV3VisionTransformer) -> bool:
    return model.architecture["ffn_layer"] != "mlp"


def _has_layerscale(model: DinoV3VisionTransformer) -> bool:
    return hasattr(model.blocks[0].ls1, "gamma")


def _check_common(model: DinoV3VisionTransformer, target: str) -> Dict[str, Any]:
    """The architecture, after refusing what neither transformers nor timm can express."""
    arch = model.architecture
    rope = model.rope_embed
    if rope.base is None:
        raise InteropError(
            f"{target} takes one RoPE base (rope_base); this model uses rope_min_period={rope.min_period} / "
            f"rope_max_period={rope.max_period}"
        )
    if rope.normalize_coords != "separate":
        raise InteropError(
            f"{target} scales RoPE coordinates per axis only; this model has "
            f"rope_normalize_coords={rope.normalize_coords!r} (needs 'separate')"
        )
    expected = rope_periods(rope.head_dim, rope.base)
    periods = rope.periods.detach().float().cpu()
    if not torch.allclose(periods, expected, rtol=_PERIODS_RTOL, atol=0.0):
        raise InteropError(
            f"{target} recomputes the RoPE periods as rope_base ** (4 j / head_dim) with rope_base={rope.base:g}; "
            f"this model's rope_embed.periods {periods.tolist()[:4]}... do not follow it"
        )
    if model.cls_norm is not None:
        raise InteropError(
            f"{target} has one final norm for every token; this model has untie_cls_and_patch_norms=True (cls_norm)"
        )
    if tuple(model.patch_embed.patch_size) != (model.patch_size, model.patch_size):
        raise InteropError(f"non-square patch size {tuple(model.patch_embed.patch_size)} is not supported")
    return arch


def _image_size(model: DinoV3VisionTransformer):
    height, width = model.patch_embed.img_size
    return int(height) if height == width else [int(height), int(width)]


def _placeholder_pattern(template: str) -> str:
    # "blocks.{i}.norm1.{p}" -> a regex with named groups, so one table renames both ways.
    pattern = re.escape(template)
    return (
        pattern.replace(r"\{i\}", r"(?P<i>\d+)")
        .replace(r"\{p\}", r"(?P<p>weight|bias)")
        .replace(r"\{n\}", r"(?P<n>[12])")
    )


def _rename(key: str, pairs: Sequence[Tuple[str, str]], reverse: bool = False) -> Optional[str]:
    for ours, theirs in pairs:
        source, target = (theirs, ours) if reverse else (ours, theirs)
        match = re.fullmatch(_placeholder_pattern(source), key)
        if match:
            return target.format(**match.groupdict())
    return None


def _qkv_bias_parts(model_state: Mapping[str, torch.Tensor], block: str) -> Optional[Tuple[torch.Tensor, ...]]:
    """(q, k, v) biases of a block as the model applies them (the mask folded in), or None."""
    bias = model_state.get(f"{block}.attn.qkv.bias")
    if bias is None:
        return None
    mask = model_state.get(f"{block}.attn.qkv.bias_mask")
    if mask is not None:
        bias = bias * mask.to(bias.dtype)
    return bias.chunk(3, dim=0)


# Dropped on export: training-only or recomputed by the target (see the module docstring).
_NOT_EXPORTED = re.compile(r"rope_embed\.periods|local_cls_norm\..*|blocks\.\d+\.attn\.qkv\.(bias|bias_mask)")


# --------------------------------------------------------------------------- transformers
_TRANSFORMERS_COMMON = (
    # (our key, published transformers key); qkv is split apart and the mask token reshaped.
    ("cls_token", "embeddings.cls_token"),
    ("storage_tokens", "embeddings.register_tokens"),
    ("mask_token", "embeddings.mask_token"),
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.{p}"),
    ("norm.{p}", "norm.{p}"),
    ("blocks.{i}.norm1.{p}", "layer.{i}.norm1.{p}"),
    ("blocks.{i}.norm2.{p}", "layer.{i}.norm2.{p}"),
    ("blocks.{i}.attn.proj.{p}", "layer.{i}.attention.o_proj.{p}"),
    ("blocks.{i}.ls{n}.gamma", "layer.{i}.layer_scale{n}.lambda1"),
)
_TRANSFORMERS_MLP = (
    ("blocks.{i}.mlp.fc1.{p}", "layer.{i}.mlp.up_proj.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "layer.{i}.mlp.down_proj.{p}"),
)
_TRANSFORMERS_GATED = (
    ("blocks.{i}.mlp.w1.{p}", "layer.{i}.mlp.gate_proj.{p}"),
    ("blocks.{i}.mlp.w2.{p}", "layer.{i}.mlp.up_proj.{p}"),
    ("blocks.{i}.mlp.w3.{p}", "layer.{i}.mlp.down_proj.{p}"),
)
_QKV_WEIGHT = re.compile(r"blocks\.(\d+)\.attn\.qkv\.weight")
_PROJ = ("q_proj", "k_proj", "v_proj")


def _transformers_pairs(gated: bool) -> Tuple[Tuple[str, str], ...]:
    return _TRANSFORMERS_COMMON + (_TRANSFORMERS_GATED if gated else _TRANSFORMERS_MLP)


def transformers_config(model: DinoV3VisionTransformer) -> Dict[str, Any]:
    """The ``config.json`` of ``model`` as a transformers ``DINOv3ViTConfig``."""
    arch = _check_common(model, "transformers' DINOv3ViTConfig")
    qkv_bias = model.blocks[0].attn.qkv.bias is not None
    gated = _gated(model)
    rope = model.rope_embed
    return {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "hidden_size": model.embed_dim,
        "intermediate_size": _ffn_hidden(model),
        "num_hidden_layers": model.n_blocks,
        "num_attention_heads": model.num_heads,
        "hidden_act": "silu" if gated else "gelu",
        "use_gated_mlp": gated,
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": float(arch["norm_eps"]),
        "rope_theta": float(rope.base),
        "image_size": _image_size(model),
        "patch_size": model.patch_size,
        "num_channels": int(model.patch_embed.proj.in_channels),
        # A masked key bias is no key bias; an unmasked one transformers has too.
        "query_bias": qkv_bias,
        "key_bias": qkv_bias and not arch["mask_k_bias"],
        "value_bias": qkv_bias,
        "proj_bias": model.blocks[0].attn.proj.bias is not None,
        "mlp_bias": bool(arch["ffn_bias"]),
        "layerscale_value": float(arch["init_values"]) if _has_layerscale(model) else 1.0,
        "num_register_tokens": model.num_storage_tokens,
        # Training-time coordinate augmentation (transformers applies it in train mode only, as we do).
        "pos_embed_shift": rope.shift_coords,
        "pos_embed_jitter": rope.jitter_coords,
        "pos_embed_rescale": rope.rescale_coords,
        "torch_dtype": "float32",
    }


def transformers_state_dict(model: DinoV3VisionTransformer) -> Dict[str, torch.Tensor]:
    """``model``'s weights under the key names of the published transformers DINOv3 folders."""
    transformers_config(model)  # the refusals
    state = model.state_dict()
    pairs = _transformers_pairs(_gated(model))
    key_bias = model.blocks[0].attn.qkv.bias is not None and not model.architecture["mask_k_bias"]
    out = {}
    for key, value in state.items():
        qkv = _QKV_WEIGHT.fullmatch(key)
        if qkv:
            block = qkv.group(1)
            for name, part in zip(_PROJ, value.chunk(3, dim=0)):
                out[f"layer.{block}.attention.{name}.weight"] = part
            biases = _qkv_bias_parts(state, f"blocks.{block}")
            if biases is not None:
                for name, part in zip(_PROJ, biases):
                    if name != "k_proj" or key_bias:
                        out[f"layer.{block}.attention.{name}.bias"] = part
            continue
        if _NOT_EXPORTED.fullmatch(key):
            continue
        name = _rename(key, pairs)
        if name is None:
            raise InteropError(f"no transformers DINOv3 name for tensor {key!r}")
        out[name] = value.reshape(1, 1, -1) if key == "mask_token" else value
    if model.storage_tokens is None:
        out["embeddings.register_tokens"] = torch.zeros(1, 0, model.embed_dim)
    if not _has_layerscale(model):
        # transformers' DINOv3 always has LayerScale: a model without it scales by exactly 1.
        for i in range(model.n_blocks):
            for n in (1, 2):
                out[f"layer.{i}.layer_scale{n}.lambda1"] = torch.ones(model.embed_dim)
    return out


def _config_option(config: Mapping[str, Any], key: str, default, source: Path):
    value = config.get(key, default)
    if value is None and default is not None:
        raise InteropError(f"{source}: config has {key}=null")
    return value


def load_transformers_backbone(
    folder: Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], **vit_options
) -> DinoV3VisionTransformer:
    """A :class:`DinoV3VisionTransformer` with the weights ``state`` of the transformers
    ``DINOv3ViTModel`` folder ``folder`` whose ``config.json`` is ``config`` (either key layout)."""
    source = folder / "config.json"
    gated = bool(config.get("use_gated_mlp", False))
    act = config.get("hidden_act", "gelu")
    if act != ("silu" if gated else "gelu"):
        kind = "gated (SwiGLU)" if gated else "plain"
        raise InteropError(f"{source}: hidden_act {act!r} with a {kind} MLP is not supported (silu / gelu)")
    query_bias, key_bias = bool(config.get("query_bias", True)), bool(config.get("key_bias", False))
    if query_bias != bool(config.get("value_bias", True)) or (key_bias and not query_bias):
        raise InteropError(
            f"{source}: query_bias={query_bias}, key_bias={key_bias}, value_bias={config.get('value_bias', True)}: "
            "this ViT has one qkv bias, with or without its key part"
        )
    theirs = {re.sub(r"^model\.layer\.", "layer.", k): v for k, v in state.items()}  # 5.x layout -> published
    pairs = _transformers_pairs(gated)
    ours: Dict[str, torch.Tensor] = {}
    for key in list(theirs):
        name = _rename(key, pairs, reverse=True)
        if name is not None:
            ours[name] = theirs.pop(key)
    if "mask_token" in ours:
        ours["mask_token"] = ours["mask_token"].reshape(1, -1)
    if "storage_tokens" in ours and ours["storage_tokens"].shape[1] == 0:
        del ours["storage_tokens"]
    depth = int(config.get("num_hidden_layers", 0))
    for i in range(depth):
        names = [f"layer.{i}.attention.{p}" for p in _PROJ]
        if not all(f"{n}.weight" in theirs for n in names):
            raise InteropError(f"{folder}: block {i} lacks one of {[f'{n}.weight' for n in names]}")
        ours[f"blocks.{i}.attn.qkv.weight"] = torch.cat([theirs.pop(f"{n}.weight") for n in names], dim=0)
        if query_bias:
            biases = [f"{n}.bias" for n in (names if key_bias else names[::2])]
            missing = [b for b in biases if b not in theirs]
            if missing:
                raise InteropError(
                    f"{folder}: block {i} lacks {missing}, which config.json's query_bias={query_bias} / "
                    f"key_bias={key_bias} (true when absent) call for"
                )
            q, v = theirs.pop(f"{names[0]}.bias"), theirs.pop(f"{names[2]}.bias")
            k = theirs.pop(f"{names[1]}.bias") if key_bias else torch.zeros_like(q)
            ours[f"blocks.{i}.attn.qkv.bias"] = torch.cat((q, k, v))
            if not key_bias:
                ours[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat((torch.ones_like(q), k, torch.ones_like(v)))
    if theirs:
        raise InteropError(f"{folder}: tensors that a DINOv3 backbone has no place for: {sorted(theirs)[:10]}")
    dim, heads = int(config.get("hidden_size", 0)), int(config.get("num_attention_heads", 0))
    if not dim or not heads or dim % heads:
        raise InteropError(f"{source}: hidden_size {dim} / num_attention_heads {heads} is not a ViT shape")
    rope_theta = float(_config_option(config, "rope_theta", 100.0, source))
    ours["rope_embed.periods"] = rope_periods(dim // heads, rope_theta)
    try:
        kwargs = infer_dinov3_kwargs(ours)
    except ValueError as error:
        raise InteropError(f"{folder}: {error}") from error
    image_size = config.get("image_size", 224)
    kwargs.update(
        img_size=tuple(image_size) if isinstance(image_size, (list, tuple)) else int(image_size),
        norm_eps=float(_config_option(config, "layer_norm_eps", 1e-5, source)),
        rope_base=rope_theta,
        rope_min_period=None,
        rope_max_period=None,
        rope_normalize_coords="separate",
        rope_shift_coords=config.get("pos_embed_shift"),
        rope_jitter_coords=config.get("pos_embed_jitter"),
        rope_rescale_coords=config.get("pos_embed_rescale", 2.0),
        init_values=float(config.get("layerscale_value", 1.0)),
    )
    kwargs.update(vit_options)
    return load_dinov3_weights(partial(DinoV3VisionTransformer, **kwargs), ours, source=str(folder))


# ----------------------------------------------------------------------------------- timm
_TIMM_NAMES = (
    # (our key, timm Eva key); qkv's bias is split into q_bias / v_bias.
    ("cls_token", "cls_token"),
    ("storage_tokens", "reg_token"),
    ("patch_embed.proj.{p}", "patch_embed.proj.{p}"),
    ("norm.{p}", "norm.{p}"),
    ("blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
    ("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
    ("blocks.{i}.attn.qkv.weight", "blocks.{i}.attn.qkv.weight"),
    ("blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"),
    ("blocks.{i}.ls{n}.gamma", "blocks.{i}.gamma_{n}"),
    ("blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("blocks.{i}.mlp.w1.{p}", "blocks.{i}.mlp.fc1_g.{p}"),
    ("blocks.{i}.mlp.w2.{p}", "blocks.{i}.mlp.fc1_x.{p}"),
    ("blocks.{i}.mlp.w3.{p}", "blocks.{i}.mlp.fc2.{p}"),
)


def timm_model_args(model: DinoV3VisionTransformer) -> Tuple[str, Dict[str, Any]]:
    """(timm architecture name, ``create_model`` keyword arguments) of ``model``'s shape."""
    arch = _check_common(model, "timm's DINOv3 (Eva)")
    block = model.blocks[0]
    if block.attn.proj.bias is None or not arch["ffn_bias"]:
        raise InteropError(
            "timm's Eva blocks always have output biases; this model has "
            f"proj_bias={block.attn.proj.bias is not None}, ffn_bias={arch['ffn_bias']}"
        )
    if float(arch["norm_eps"]) != 1e-5:
        # The epsilon is a norm_layer partial in timm's DINOv3 entry points, which config.json cannot carry.
        raise InteropError(
            f"timm's DINOv3 models have LayerNorm epsilon 1e-5; this model has norm_eps={arch['norm_eps']}"
        )
    gated, hidden, dim = _gated(model), _ffn_hidden(model), model.embed_dim
    qkv_bias = block.attn.qkv.bias is not None
    if qkv_bias and not arch["mask_k_bias"]:
        # Not the no-op it is without RoPE: the key bias is rotated with each patch's key, so it
        # shifts a query's logits by a different amount for every key position.
        raise InteropError(
            "timm's DINOv3 attention has no key bias (k_bias is a zero buffer); this model has qkv_bias=True "
            "with mask_k_bias=False (a key bias that RoPE makes position-dependent)"
        )
    size = _TIMM_SIZES.get(dim, "small")
    if gated and size == "small":
        size = "small_plus"
    if qkv_bias and size not in _TIMM_QKVB_SIZES:
        size = "small_plus" if gated else "small"
    name = f"vit_{size}_patch16_dinov3" + ("_qkvb" if qkv_bias else "")
    rope = model.rope_embed
    args = dict(
        img_size=_image_size(model),
        patch_size=model.patch_size,
        in_chans=int(model.patch_embed.proj.in_channels),
        embed_dim=dim,
        depth=model.n_blocks,
        num_heads=model.num_heads,
        # timm sizes the hidden layer int(embed_dim * mlp_ratio) (no 2/3 rule), then rounds it up to
        # swiglu_align_to; our widths are multiples of 8 already, so the ratio lands on them exactly.
        mlp_ratio=(hidden + 0.5) / dim,
        swiglu_mlp=gated,
        swiglu_align_to=8 if gated else 0,
        qkv_bias=qkv_bias,
        # timm.create_model drops None arguments (the entry point's 1e-5 would stay): without
        # LayerScale, timm_state_dict scales by exactly 1 instead.
        init_values=float(arch["init_values"]) if _has_layerscale(model) else 1.0,
        num_reg_tokens=model.num_storage_tokens,
        rope_temperature=float(rope.base),
        rope_shift_coords=rope.shift_coords,
        rope_jitter_coords=rope.jitter_coords,
        rope_rescale_coords=rope.rescale_coords,
        dynamic_img_size=True,
    )
    return name, args


def timm_state_dict(model: DinoV3VisionTransformer) -> Dict[str, torch.Tensor]:
    """``model``'s weights as timm's DINOv3 Eva names them (the masked key bias, zero, is left out:
    timm's ``k_bias`` is a zero buffer)."""
    timm_model_args(model)  # the refusals
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        if key == "mask_token" or _NOT_EXPORTED.fullmatch(key):
            continue
        name = _rename(key, _TIMM_NAMES)
        if name is None:
            raise InteropError(f"no timm DINOv3 name for tensor {key!r}")
        out[name] = value
    for i in range(model.n_blocks):
        biases = _qkv_bias_parts(state, f"blocks.{i}")
        if biases is not None:
            out[f"blocks.{i}.attn.q_bias"], _, out[f"blocks.{i}.attn.v_bias"] = biases
        if not _has_layerscale(model):
            for n in (1, 2):
                out[f"blocks.{i}.gamma_{n}"] = torch.ones(model.embed_dim)
    return out


def timm_pretrained_cfg_overrides() -> Dict[str, Any]:
    """What a DINOv3 timm folder's ``pretrained_cfg`` says differently: RoPE takes any input size."""
    return {"fixed_input_size": False}
