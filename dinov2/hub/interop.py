"""A DINOv2 or DINOv3 backbone in other libraries' formats, and a transformers folder back as a backbone.

DINOv3 backbones (:class:`DinoV3VisionTransformer`) are dispatched to :mod:`dinov2.hub.interop_dinov3`
(``DINOv3ViTModel``, timm's DINOv3 ``Eva``, RoPE tables fixed in the ONNX graph); what follows
describes the DINOv2 layouts.

* :func:`export_transformers` - a Hugging Face folder (``config.json``, ``model.safetensors``,
  ``preprocessor_config.json``) that ``transformers.AutoModel.from_pretrained(folder)`` loads as ``Dinov2Model`` (or
  ``Dinov2WithRegistersModel`` for a model with registers). The weights use the key names of the
  published ``facebook/dinov2-*`` folders, which transformers 4.x reads as they are and 5.x
  converts on load (its ``q_proj``/``gate_proj`` layout); :func:`load_transformers_backbone`
  reads both layouts.
* :func:`export_timm` - a timm folder (``config.json`` + ``model.safetensors``) that
  ``timm.create_model("local-dir:" + folder, pretrained=True)`` loads, whose state dict also loads
  strictly into ``timm.create_model(architecture, **model_args)``.
* :func:`dinov2.hub.interop_onnx.export_onnx` - an ONNX graph ``images (B, 3, H, W) -> cls_token
  (B, D), patch_tokens (B, N, D)`` with a dynamic batch and a fixed image size (the position
  embedding is resized once, at export, and stored in the graph); :func:`export_backbone` and the
  command line dispatch to it.

The exported formats cannot say how the position embedding is resized for other image sizes, so
features agree exactly at the size the model was built for (518 px for the published shapes) and
elsewhere as closely as the two resizing rules do: see docs/interop.md for the measured figures.
None of transformers, timm, onnx or onnxruntime is needed except by the function that uses it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from dinov2.data.transforms import IMAGENET_DEFAULT_STD as IMAGENET_STD
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.vision_transformer_v3 import DinoV3VisionTransformer
from dinov2.utils.io import atomic_path, atomic_write_text

from .sources import vit_kwargs_of
from .weights import PathLike, WeightsError, check_state_dict, load_safetensors_file, load_weights_only

FORMATS = ("hf", "timm", "onnx")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# The widths of the published DINOv2 shapes, by timm's name for them.
_TIMM_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}


class InteropError(ValueError):
    """A model that a target format cannot represent, or a folder that is not a DINOv2 / DINOv3 model."""


# ------------------------------------------------------------------------------------ helpers
def _is_dinov3(model: nn.Module) -> bool:
    return isinstance(model, DinoV3VisionTransformer)


def _architecture(model: DinoVisionTransformer) -> Dict[str, Any]:
    if not isinstance(model, DinoVisionTransformer):
        raise InteropError(
            f"only DinoVisionTransformer and DinoV3VisionTransformer backbones can be exported, got {type(model).__name__}"
        )
    return vit_kwargs_of(model)


def _refuse_conv_stem(arch: Dict[str, Any], target: str) -> None:
    if arch.get("patch_embed", "linear") != "linear":
        raise InteropError(
            f"{target} has only the strided patch convolution; this model has patch_embed={arch['patch_embed']!r} "
            "(export it to ONNX instead)"
        )


def _ffn_hidden(model: DinoVisionTransformer) -> int:
    mlp = model.blocks[0].mlp
    return mlp.fc1.out_features if hasattr(mlp, "fc1") else mlp.w3.in_features


def _fused_swiglu_hidden(embed_dim: int, mlp_ratio: float) -> int:
    # The hidden-width rule of the released ViT-g (and of transformers' Dinov2SwiGLUFFN).
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def _image_size(model: DinoVisionTransformer, image_size) -> Tuple[int, int]:
    if image_size is None and _is_dinov3(model):
        height, width = model.patch_embed.img_size  # the nominal size; RoPE has no table to read it from
        return int(height), int(width)
    if image_size is None:
        side = int(round(math.sqrt(model.pos_embed.shape[1] - 1))) * model.patch_size
        return side, side
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def _save_safetensors(state: Mapping[str, torch.Tensor], path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _prepare_folder(folder: PathLike) -> Path:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InteropError(f"output {folder} exists and is not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------- transformers
def transformers_config(model: DinoVisionTransformer) -> Dict[str, Any]:
    """The ``config.json`` of ``model`` as a transformers ``Dinov2Config`` (or the registers one;
    ``DINOv3ViTConfig`` for a DINOv3 backbone)."""
    if _is_dinov3(model):
        from . import interop_dinov3  # builds on this module

        return interop_dinov3.transformers_config(model)
    arch = _architecture(model)
    _refuse_conv_stem(arch, "transformers' Dinov2")
    unsupported = [name for name in ("proj_bias", "ffn_bias") if not arch[name]]
    if unsupported:
        raise InteropError(f"transformers' Dinov2 always has biases; this model has none in {unsupported}")
    hidden, dim = _ffn_hidden(model), arch["embed_dim"]
    swiglu = arch["ffn_layer"] != "mlp"
    if swiglu:
        # transformers knows only the fused width rule: some integer ratio must reproduce the width.
        ratio = next((r for r in range(1, 17) if _fused_swiglu_hidden(dim, r) == hidden), None)
    else:
        ratio = hidden // dim if hidden % dim == 0 else None
    if ratio is None:
        raise InteropError(
            f"feed-forward width {hidden} for embed_dim {dim} ({arch['ffn_layer']}) has no integer mlp_ratio, "
            "which transformers' Dinov2Config needs"
        )
    registers = arch["num_register_tokens"]
    config = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": arch["embed_dim"],
        "num_hidden_layers": arch["depth"],
        "num_attention_heads": arch["num_heads"],
        "mlp_ratio": ratio,
        "hidden_act": "silu" if swiglu else "gelu",  # unused by the SwiGLU feed-forward
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": arch["img_size"],
        "patch_size": arch["patch_size"],
        "num_channels": int(model.patch_embed.in_chans),
        "qkv_bias": arch["qkv_bias"],
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": swiglu,
        "torch_dtype": "float32",
    }
    if registers:
        config["num_register_tokens"] = registers
    else:
        config["use_mask_token"] = True
    return config


_ONE_TO_ONE = (
    # (our key pattern, transformers key) for every tensor copied unchanged; qkv is split apart.
    (r"cls_token", "embeddings.cls_token"),
    (r"mask_token", "embeddings.mask_token"),
    (r"pos_embed", "embeddings.position_embeddings"),
    (r"register_tokens", "embeddings.register_tokens"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"encoder.layer.\1.\2.\3"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"blocks\.(\d+)\.ls(1|2)\.gamma", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.w12\.(weight|bias)", r"encoder.layer.\1.mlp.weights_in.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"encoder.layer.\1.mlp.weights_out.\2"),
)
_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_QKV_PARTS = ("query", "key", "value")


def _transformers_name(key: str) -> Optional[str]:
    for pattern, target in _ONE_TO_ONE:
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", target, key)
    return None


def transformers_state_dict(model: DinoVisionTransformer) -> Dict[str, torch.Tensor]:
    """``model``'s weights under the key names of the published transformers DINOv2 (or DINOv3) folders."""
    if _is_dinov3(model):
        from . import interop_dinov3

        return interop_dinov3.transformers_state_dict(model)
    out = {}
    for key, value in model.state_dict().items():
        qkv = _QKV.fullmatch(key)
        if qkv:
            block, kind = qkv.groups()
            for name, part in zip(_QKV_PARTS, value.chunk(3, dim=0)):
                out[f"encoder.layer.{block}.attention.attention.{name}.{kind}"] = part
            continue
        name = _transformers_name(key)
        if name is None:
            raise InteropError(f"no transformers name for tensor {key!r}")
        out[name] = value
    if "encoder.layer.0.layer_scale1.lambda1" not in out:
        # transformers' Dinov2 always has LayerScale: a model without it scales by exactly 1.
        for i in range(model.n_blocks):
            for n in (1, 2):
                out[f"encoder.layer.{i}.layer_scale{n}.lambda1"] = torch.ones(model.embed_dim)
    return out


def transformers_preprocessor_config(
    model: DinoVisionTransformer, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None
) -> Dict[str, Any]:
    """A ``preprocessor_config.json`` (``BitImageProcessor``, as the published DINOv2 folders have):
    centre crop at the model's own size after resizing the short side by 256/224, bicubic, and the
    normalisation ``mean``/``std`` (ImageNet's by default)."""
    crop = _image_size(model, None)[0]
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": int(round(crop * 256 / 224))},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": crop, "width": crop},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(m) for m in (mean or IMAGENET_MEAN)],
        "image_std": [float(s) for s in (std or IMAGENET_STD)],
        "do_convert_rgb": True,
    }


def export_transformers(
    model: DinoVisionTransformer,
    folder: PathLike,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` for ``transformers.AutoModel``,
    and ``folder/preprocessor_config.json`` for ``AutoImageProcessor`` (normalisation ``mean``/``std``)."""
    config = transformers_config(model)
    folder = _prepare_folder(folder)
    _save_safetensors(transformers_state_dict(model), folder / WEIGHTS_FILE, metadata={"format": "pt"})
    preprocessor = transformers_preprocessor_config(model, mean, std)
    atomic_write_text(folder / PREPROCESSOR_FILE, json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


# transformers >= 5 names -> the published (4.x) names, so that one reader handles both.
_TRANSFORMERS_V5_NAMES = (
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.down_proj\."), ".mlp.weights_out."),
)


def _read_transformers_files(folder: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a transformers folder as stored (safetensors, or a weights-only pickle)."""
    if (folder / WEIGHTS_FILE).is_file():
        state = load_safetensors_file(folder / WEIGHTS_FILE)
    elif (folder / "pytorch_model.bin").is_file():
        state = load_weights_only(folder / "pytorch_model.bin", "transformers weights file")
        if not isinstance(state, Mapping):
            raise WeightsError(f"{folder / 'pytorch_model.bin'} holds a {type(state).__name__}, not a state dict")
    else:
        raise InteropError(
            f"{folder} holds neither {WEIGHTS_FILE} nor pytorch_model.bin (sharded folders are not read)"
        )
    return state


def _read_transformers_weights(folder: Path) -> Dict[str, torch.Tensor]:
    state = _read_transformers_files(folder)
    # A Dinov2ForImageClassification folder keeps the backbone under "dinov2."; its head is dropped.
    if any(k.startswith("dinov2.") for k in state):
        state = {k[len("dinov2.") :]: v for k, v in state.items() if k.startswith("dinov2.")}
    renamed = {}
    for key, value in state.items():
        for pattern, legacy in _TRANSFORMERS_V5_NAMES:
            key = pattern.sub(legacy, key)
        renamed[key] = value
    for i in {m.group(1) for m in (re.match(r"encoder\.layer\.(\d+)\.mlp\.gate_proj\.", k) for k in renamed) if m}:
        for p in ("weight", "bias"):
            gate = renamed.pop(f"encoder.layer.{i}.mlp.gate_proj.{p}")
            up = renamed.pop(f"encoder.layer.{i}.mlp.up_proj.{p}")
            renamed[f"encoder.layer.{i}.mlp.weights_in.{p}"] = torch.cat((gate, up), dim=0)
    return renamed


def _config_value(config: Mapping[str, Any], key: str, source: Path):
    if key not in config:
        raise InteropError(f"{source}: config has no {key!r}")
    return config[key]


def _square(value, key: str, source: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise InteropError(f"{source}: non-square {key} {list(value)} is not supported")
        value = value[0]
    return int(value)


def is_transformers_folder(path: PathLike) -> bool:
    """A directory holding a transformers model (``config.json``), not a training output
    (whose ``config.yaml`` names its own architecture)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and not (path / "config.yaml").is_file()


def transformers_normalization(folder: PathLike) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)`` of a transformers folder's ``preprocessor_config.json``; ImageNet's without one."""
    path = Path(folder) / PREPROCESSOR_FILE
    if not path.is_file():
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        return tuple(float(m) for m in config["image_mean"]), tuple(float(s) for s in config["image_std"])
    except (ValueError, KeyError, TypeError) as error:
        raise InteropError(f"{path}: cannot read image_mean / image_std ({error})") from error


def load_transformers_backbone(folder: PathLike, **vit_options) -> DinoVisionTransformer:
    """A :class:`DinoVisionTransformer` with the weights of a transformers DINOv2 folder (a
    :class:`DinoV3VisionTransformer` for a ``DINOv3ViTModel`` folder, ``model_type`` ``dinov3_vit``).

    Reads ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, weights-only) of a
    ``Dinov2Model``, ``Dinov2WithRegistersModel`` or ``Dinov2ForImageClassification`` folder;
    transformers itself is not needed. The position embedding is resized the way transformers
    resizes it (bicubic to the target grid, antialiased for the register models), so features equal
    transformers' at every image size; ``vit_options`` overrides that (``interpolate_offset=0.1``
    reproduces the original DINOv2 code for the non-register models) or other constructor options.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"transformers model folder {folder} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InteropError(f"{config_path} is not valid JSON: {error}") from error
    model_type = config.get("model_type")
    if model_type == "dinov3_vit":
        from . import interop_dinov3

        return interop_dinov3.load_transformers_backbone(
            folder, config, _read_transformers_files(folder), **vit_options
        )
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise InteropError(
            f"{config_path}: model_type {model_type!r} is not 'dinov2', 'dinov2_with_registers' or 'dinov3_vit'"
        )
    if float(config.get("layer_norm_eps", 1e-6)) != 1e-6:
        raise InteropError(f"{config_path}: layer_norm_eps {config['layer_norm_eps']} is not the 1e-6 this ViT uses")
    swiglu = bool(config.get("use_swiglu_ffn", False))
    if not swiglu and config.get("hidden_act", "gelu") != "gelu":
        raise InteropError(f"{config_path}: hidden_act {config['hidden_act']!r} is not supported (only 'gelu')")
    registers = int(config.get("num_register_tokens", 4 if model_type == "dinov2_with_registers" else 0))
    kwargs = dict(
        img_size=_square(_config_value(config, "image_size", config_path), "image_size", config_path),
        patch_size=_square(_config_value(config, "patch_size", config_path), "patch_size", config_path),
        in_chans=int(config.get("num_channels", 3)),
        embed_dim=int(_config_value(config, "hidden_size", config_path)),
        depth=int(_config_value(config, "num_hidden_layers", config_path)),
        num_heads=int(_config_value(config, "num_attention_heads", config_path)),
        mlp_ratio=float(config.get("mlp_ratio", 4)),
        qkv_bias=bool(config.get("qkv_bias", True)),
        init_values=float(config.get("layerscale_value", 1.0)),
        ffn_layer="swiglufused" if swiglu else "mlp",
        num_register_tokens=registers,
        interpolate_antialias=bool(registers),
        interpolate_offset=0.0,
    )
    kwargs.update(vit_options)
    model = DinoVisionTransformer(**kwargs)
    theirs = _read_transformers_weights(folder)
    if "embeddings.mask_token" not in theirs:
        # use_mask_token=False folders have none; masking is for pretraining only, so zeros are exact.
        theirs["embeddings.mask_token"] = torch.zeros(1, kwargs["embed_dim"])
    state = {}
    for key in model.state_dict():
        qkv = _QKV.fullmatch(key)
        if qkv:
            block, kind = qkv.groups()
            names = [f"encoder.layer.{block}.attention.attention.{part}.{kind}" for part in _QKV_PARTS]
            if all(name in theirs for name in names):
                state[key] = torch.cat([theirs.pop(name) for name in names], dim=0)
        elif _transformers_name(key) in theirs:
            state[key] = theirs.pop(_transformers_name(key))
    if theirs:
        raise WeightsError(f"{folder}: tensors that this config has no place for: {sorted(theirs)[:10]}")
    check_state_dict(model, state, source=str(folder))
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------------- timm
def timm_model_args(model: DinoVisionTransformer) -> Tuple[str, Dict[str, Any]]:
    """(timm architecture name, ``create_model`` keyword arguments) of ``model``'s shape (a DINOv3
    backbone: one of timm's DINOv3 ``Eva`` models)."""
    if _is_dinov3(model):
        from . import interop_dinov3

        return interop_dinov3.timm_model_args(model)
    arch = _architecture(model)
    _refuse_conv_stem(arch, "timm's ViT")
    if arch["proj_bias"] != arch["ffn_bias"]:
        raise InteropError("timm's ViT has one proj_bias switch for attention and MLP outputs; this model differs")
    registers = arch["num_register_tokens"]
    hidden = _ffn_hidden(model)
    swiglu = arch["ffn_layer"] != "mlp"
    # A SwiGLU model needs timm's packed SwiGLU (vit_giant_*'s mlp_layer); timm sizes fc1 to
    # int(embed_dim * mlp_ratio) with both halves packed, so the ratio is nudged up to land exactly.
    width = 2 * hidden if swiglu else hidden
    name = f"vit_{'giant' if swiglu else _TIMM_SIZES.get(arch['embed_dim'], 'small')}_patch14"
    name += "_reg4_dinov2" if registers else "_dinov2"
    args = dict(
        img_size=arch["img_size"],
        patch_size=arch["patch_size"],
        in_chans=int(model.patch_embed.in_chans),
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        mlp_ratio=(width + 0.5) / arch["embed_dim"],
        qkv_bias=arch["qkv_bias"],
        proj_bias=arch["proj_bias"],
        init_values=1.0 if arch["init_values"] else None,
        reg_tokens=registers,
        # With registers timm adds the position embedding to the patches only (the CLS token's
        # own position is folded into it by timm_state_dict), as its *_reg4_dinov2 models do.
        no_embed_class=bool(registers),
    )
    return name, args


def timm_state_dict(model: DinoVisionTransformer) -> Dict[str, torch.Tensor]:
    """``model``'s weights as timm's VisionTransformer (DINOv3: Eva) names them (no mask token: timm has none)."""
    if _is_dinov3(model):
        from . import interop_dinov3

        return interop_dinov3.timm_state_dict(model)
    out = {}
    for key, value in model.state_dict().items():
        if key == "mask_token":
            continue
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", key)
        out[key] = value
    if model.register_tokens is not None:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def export_timm(
    model: DinoVisionTransformer,
    folder: PathLike,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> Path:
    """Write a timm ``local-dir`` folder: ``config.json`` (architecture, model_args) + weights.

    ``mean``/``std`` (the normalisation the backbone was trained with, ImageNet's by default) go
    into its ``pretrained_cfg`` so that ``timm.data.resolve_data_config`` finds them.
    """
    name, args = timm_model_args(model)
    size = args["img_size"]
    height, width = (size, size) if isinstance(size, int) else size
    config = {
        "architecture": name,
        "num_classes": 0,
        "num_features": args["embed_dim"],
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [args["in_chans"], height, width],
            "fixed_input_size": not _is_dinov3(model),  # RoPE takes any size
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [float(m) for m in (mean or IMAGENET_MEAN)],
            "std": [float(s) for s in (std or IMAGENET_STD)],
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    folder = _prepare_folder(folder)
    _save_safetensors(timm_state_dict(model), folder / WEIGHTS_FILE, metadata={"format": "pt"})
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return folder


# ------------------------------------------------------------------------------- dispatch
def export_backbone(
    model: DinoVisionTransformer,
    output: PathLike,
    fmt: str,
    image_size: Optional[Union[int, Tuple[int, int]]] = None,
    normalization: Optional[Mapping[str, Sequence[float]]] = None,
) -> Path:
    """Write ``model`` in format ``fmt`` (``hf``, ``timm`` or ``onnx``) to ``output``.

    ``hf`` and ``timm`` write a folder, ``onnx`` a file whose input size ``image_size`` fixes.
    ``normalization`` (``{"mean": [...], "std": [...]}``, e.g. a training run's) goes into the
    transformers and timm preprocessing configs.
    """
    normalization = normalization or {}
    mean, std = normalization.get("mean"), normalization.get("std")
    if fmt == "hf":
        return export_transformers(model, output, mean=mean, std=std)
    if fmt == "timm":
        return export_timm(model, output, mean=mean, std=std)
    if fmt == "onnx":
        from .interop_onnx import export_onnx

        return export_onnx(model, output, image_size=image_size)
    raise InteropError(f"unknown export format {fmt!r}; valid: {list(FORMATS)}")


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        description="Write a DINOv2 or DINOv3 backbone as a transformers folder, a timm folder or an ONNX file."
    )
    parser.add_argument(
        "source", help="a weights file (.pth/.safetensors), a training output directory, or hub:<entry>"
    )
    parser.add_argument(
        "--weights", default=None, help="weights file for hub:<entry>, or another export of a training run"
    )
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads, if not embed_dim // 64")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    parser.add_argument("--output", required=True, help="folder (hf, timm) or .onnx file (onnx)")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=None,
        metavar="PX",
        help="onnx only: the fixed input size, one value or height width (default: the model's own size)",
    )
    parser.add_argument("--check", action="store_true", help="onnx only: compare with PyTorch and time both (1 thread)")
    return parser


def main(argv=None) -> int:
    import sys

    from .sources import load_backbone

    args = build_parser().parse_args(argv)
    if args.image_size is not None and len(args.image_size) not in (1, 2):
        raise SystemExit(f"--image-size takes one value or two (height width), got {args.image_size}")
    image_size = None if args.image_size is None else (args.image_size * 2)[:2]
    model, spec = load_backbone(args.source, weights=args.weights, num_heads=args.num_heads)
    normalization = spec.get("normalization")  # a training run's crops.mean / crops.std
    path = export_backbone(model.eval(), args.output, args.fmt, image_size=image_size, normalization=normalization)
    print(f"wrote {args.fmt} export of {args.source} to {path}", file=sys.stderr)
    if args.check and args.fmt == "onnx":
        from .interop_onnx import compare_onnx

        print(json.dumps(compare_onnx(model, path), indent=2))
    return 0
