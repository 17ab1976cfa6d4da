"""Named entry points that build the published DINOv2 and DINOv3 architectures.

Weights are never downloaded: this codebase runs on machines without internet access, so
``pretrained=True`` needs ``pretrained_weights=PATH`` to a local file (the official
``dinov2_vits14_pretrain.pth`` and friends, or a backbone exported by our own training) or a
training output directory (its teacher export; see :func:`dinov2.hub.sources.resolve_weights_path`).
The DINOv3 entries (``dinov3_vits16`` ... ``dinov3_vit7b16``) also take the official DINOv3 hub's
``weights=PATH`` spelling, and a DINOv2 file given to one of them gets an error that says so.
"""

from functools import partial
from typing import Optional

from dinov2.models.vision_transformer import DinoVisionTransformer, make_vit
from dinov2.models.vision_transformer_v3 import DINOV3_RELEASES, DinoV3VisionTransformer, make_dinov3_release

from .sources import is_dinov3_state_dict, load_dinov3_weights, resolve_weights_path
from .weights import PathLike, WeightsError, load_backbone_weights, read_state_dict

_OFFICIAL = {
    "dinov2_vits14": "vit_small",
    "dinov2_vitb14": "vit_base",
    "dinov2_vitl14": "vit_large",
    "dinov2_vitg14": "vit_giant2",
}


def make_dinov2_model(
    arch_name: str = "vit_large",
    *,
    img_size: int = 518,
    patch_size: int = 14,
    init_values: float = 1.0,
    ffn_layer: str = "mlp",
    num_register_tokens: int = 0,
    interpolate_antialias: bool = False,
    interpolate_offset: float = 0.1,
    pretrained: bool = True,
    pretrained_weights: Optional[PathLike] = None,
    model_name: str = "dinov2",
    **kwargs,
) -> DinoVisionTransformer:
    model = make_vit(
        arch_name,
        patch_size=patch_size,
        img_size=img_size,
        init_values=init_values,
        ffn_layer=ffn_layer,
        num_register_tokens=num_register_tokens,
        interpolate_antialias=interpolate_antialias,
        interpolate_offset=interpolate_offset,
        **kwargs,
    )
    if pretrained:
        if pretrained_weights is None:
            raise ValueError(
                f"{model_name}: pretrained weights cannot be downloaded (this build never fetches "
                f"files from the internet). Pass pretrained_weights=PATH to a local copy of the "
                f"official checkpoint (e.g. {model_name}_pretrain.pth) or to a backbone exported by "
                f"dinov2 training, or pretrained=False for random initialisation."
            )
        load_backbone_weights(model, resolve_weights_path(pretrained_weights, "pretrained_weights"))
    return model


def _entry(name: str, registers: bool):
    arch = _OFFICIAL[name]
    full_name = f"{name}_reg4" if registers else name

    def build(*, pretrained: bool = True, pretrained_weights: Optional[PathLike] = None, **kwargs):
        options = dict(ffn_layer="swiglufused" if arch == "vit_giant2" else "mlp")
        if registers:
            options.update(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
        options.update(kwargs)
        return make_dinov2_model(
            arch, pretrained=pretrained, pretrained_weights=pretrained_weights, model_name=full_name, **options
        )

    build.__name__ = f"{name}_reg" if registers else name
    build.__doc__ = (
        f"DINOv2 {arch} with patch size 14{' and 4 register tokens' if registers else ''} "
        f"(the published {full_name}); weights from ``pretrained_weights=PATH``."
    )
    return build


dinov2_vits14 = _entry("dinov2_vits14", registers=False)
dinov2_vitb14 = _entry("dinov2_vitb14", registers=False)
dinov2_vitl14 = _entry("dinov2_vitl14", registers=False)
dinov2_vitg14 = _entry("dinov2_vitg14", registers=False)
dinov2_vits14_reg = _entry("dinov2_vits14", registers=True)
dinov2_vitb14_reg = _entry("dinov2_vitb14", registers=True)
dinov2_vitl14_reg = _entry("dinov2_vitl14", registers=True)
dinov2_vitg14_reg = _entry("dinov2_vitg14", registers=True)


def make_dinov3_model(
    name: str = "dinov3_vitl16",
    *,
    pretrained: bool = True,
    pretrained_weights: Optional[PathLike] = None,
    weights: Optional[PathLike] = None,
    **kwargs,
) -> DinoV3VisionTransformer:
    """The published DINOv3 ViT ``name`` (a key of ``DINOV3_RELEASES``), its weights loaded strictly
    from ``pretrained_weights`` (or ``weights``, the official DINOv3 hub's name for it)."""
    if weights is not None and pretrained_weights is not None:
        raise ValueError(f"{name}: give the weights file once, as pretrained_weights= or weights=, not both")
    path = pretrained_weights if pretrained_weights is not None else weights
    if not pretrained:
        return make_dinov3_release(name, **kwargs)
    if path is None:
        raise ValueError(
            f"{name}: pretrained weights cannot be downloaded (this build never fetches files from the "
            f"internet). Pass weights=PATH to a local copy of the official checkpoint (e.g. "
            f"{name}_pretrain_lvd1689m-<hash>.pth) or to a backbone exported by DINOv3-style dinov2 training, "
            f"or pretrained=False for random initialisation."
        )
    path = resolve_weights_path(path, "weights")
    state = read_state_dict(path)
    if name == "dinov3_vitl16":
        # ViT-L/16 was released twice: LVD-1689M (one CLS norm) and SAT-493M (a local-crop CLS norm too).
        kwargs.setdefault("untie_global_and_local_cls_norm", "local_cls_norm.weight" in state)
    try:
        return load_dinov3_weights(partial(make_dinov3_release, name, **kwargs), state, str(path))
    except WeightsError as error:
        if is_dinov3_state_dict(state):
            raise
        raise WeightsError(
            f"{error}\n  {path} is a DINOv2-format file (a learned pos_embed, no rope_embed.periods): load it "
            f"with a dinov2_* entry point, or through dinov2.hub.load_backbone, which tells the two apart"
        ) from None


def _dinov3_entry(name: str):
    def build(
        *,
        pretrained: bool = True,
        pretrained_weights: Optional[PathLike] = None,
        weights: Optional[PathLike] = None,
        **kwargs,
    ):
        return make_dinov3_model(
            name, pretrained=pretrained, pretrained_weights=pretrained_weights, weights=weights, **kwargs
        )

    build.__name__ = name
    build.__doc__ = (
        f"The published DINOv3 {name[len('dinov3_') :]} ({DINOV3_RELEASES[name]['arch']}, patch 16, 4 storage "
        "tokens, RoPE); weights from ``weights=PATH`` (or ``pretrained_weights=PATH``)."
    )
    return build


dinov3_vits16 = _dinov3_entry("dinov3_vits16")
dinov3_vits16plus = _dinov3_entry("dinov3_vits16plus")
dinov3_vitb16 = _dinov3_entry("dinov3_vitb16")
dinov3_vitl16 = _dinov3_entry("dinov3_vitl16")
dinov3_vith16plus = _dinov3_entry("dinov3_vith16plus")
dinov3_vit7b16 = _dinov3_entry("dinov3_vit7b16")

ENTRY_POINTS = {
    fn.__name__: fn
    for fn in (
        dinov2_vits14,
        dinov2_vitb14,
        dinov2_vitl14,
        dinov2_vitg14,
        dinov2_vits14_reg,
        dinov2_vitb14_reg,
        dinov2_vitl14_reg,
        dinov2_vitg14_reg,
        dinov3_vits16,
        dinov3_vits16plus,
        dinov3_vitb16,
        dinov3_vitl16,
        dinov3_vith16plus,
        dinov3_vit7b16,
    )
}
