from .attention import Attention
from .block import Block
from .drop_path import DropPath
from .layer_scale import LayerScale
from .masked_bias import LinearKMaskedBias
from .mlp import Mlp
from .patch_embed import PATCH_EMBEDS, ConvStemPatchEmbed, PatchEmbed
from .rope import RopePositionEmbedding
from .swiglu_ffn import SwiGLUFFN, SwiGLUFFNAligned, SwiGLUFFNFused

__all__ = [
    "PATCH_EMBEDS",
    "Attention",
    "Block",
    "ConvStemPatchEmbed",
    "DropPath",
    "LayerScale",
    "LinearKMaskedBias",
    "Mlp",
    "PatchEmbed",
    "RopePositionEmbedding",
    "SwiGLUFFN",
    "SwiGLUFFNAligned",
    "SwiGLUFFNFused",
]
