"""A backbone as an ONNX graph, and its check against PyTorch in ONNX Runtime.

:func:`export_onnx` writes ``images (B, 3, H, W) -> cls_token (B, D), patch_tokens (B, N, D)`` with
a dynamic batch and a fixed image size: the position embedding (DINOv2) or the RoPE tables
(DINOv3, :class:`FixedSizeFeaturesV3`) are computed once, at export, and
stored in the graph. :func:`export_module_onnx` is the exporter that classifier exports use too.
Needs the optional ``onnx`` / ``onnxscript`` / ``onnxruntime`` packages (``dinov2[interop]``).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.vision_transformer_v3 import DinoV3VisionTransformer
from dinov2.utils.io import atomic_path

from .interop import InteropError, _architecture, _image_size, _is_dinov3
from .weights import PathLike

__all__ = [
    "FixedSizeFeatures",
    "FixedSizeFeaturesV3",
    "compare_onnx",
    "export_module_onnx",
    "export_onnx",
    "fixed_size_features",
    "onnx_session",
]


class _FixedSize(nn.Module):
    """A backbone traced at one image size (a multiple of its patch size)."""

    def __init__(self, backbone: nn.Module, height: int, width: int):
        super().__init__()
        patch = backbone.patch_size
        if height % patch or width % patch:
            raise InteropError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
        self.backbone = backbone
        self.height, self.width = int(height), int(width)


class FixedSizeFeatures(_FixedSize):
    """``images (B, 3, H, W) -> (cls_token (B, D), patch_tokens (B, N, D))`` at one image size.

    The position embedding is resized here, once, by the backbone's own rule, and kept as a
    buffer: the exported graph then holds no resize (the offset rule is a scale factor, not a size,
    and ONNX Runtime's antialiased cubic is not PyTorch's), and its features equal the backbone's.
    """

    def __init__(self, backbone: DinoVisionTransformer, height: int, width: int):
        super().__init__(backbone, height, width)
        patch = backbone.patch_size
        tokens = torch.zeros(1, 1 + (height // patch) * (width // patch), backbone.embed_dim)
        with torch.no_grad():
            pos_embed = backbone.interpolate_pos_encoding(tokens, height, width).detach().clone()
        self.register_buffer("pos_embed", pos_embed, persistent=False)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        x = b.patch_embed(images)
        x = torch.cat((b.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed.to(x.dtype)
        if b.register_tokens is not None:
            x = torch.cat((x[:, :1], b.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        for block in b.blocks:
            x = block(x)
        x = b.norm(x)
        return x[:, 0], x[:, 1 + b.num_register_tokens :]


class FixedSizeFeaturesV3(_FixedSize):
    """``images (B, 3, H, W) -> (cls_token (B, D), patch_tokens (B, N, D))`` at one image size.

    The RoPE tables are computed here, once, for the fixed patch grid (without the training-time
    coordinate augmentation) and kept as buffers, so the graph holds only the rotation."""

    def __init__(self, backbone: DinoV3VisionTransformer, height: int, width: int):
        super().__init__(backbone, height, width)
        patch = backbone.patch_size
        rope = backbone.rope_embed
        was_training = rope.training
        rope.eval()  # no coordinate augmentation in the tables
        try:
            with torch.no_grad():
                sin, cos = rope(height // patch, width // patch)
        finally:
            rope.train(was_training)
        self.register_buffer("rope_sin", sin.detach().clone(), persistent=False)
        self.register_buffer("rope_cos", cos.detach().clone(), persistent=False)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        x = b.prepare_tokens_with_masks(images)
        rope = (self.rope_sin, self.rope_cos)
        for block in b.blocks:
            x = block(x, rope)
        head, patches = b._normalize(x)
        return head[:, 0], patches


def fixed_size_features(model: nn.Module, height: int, width: int) -> nn.Module:
    """The ``images -> (cls_token, patch_tokens)`` module that ONNX export traces, for either generation."""
    if _is_dinov3(model):
        return FixedSizeFeaturesV3(model, height, width)
    _architecture(model)
    return FixedSizeFeatures(model, height, width)


# Above this the weights go to an external data file beside the graph (protobuf caps a file at 2 GiB).
_ONNX_INLINE_LIMIT = 1 << 30


def export_module_onnx(module: nn.Module, example: torch.Tensor, path: PathLike, output_names: Sequence[str]) -> Path:
    """Export ``module`` (one image-batch input, ``images``) to ONNX with a dynamic batch dimension.

    Uses torch's default exporter, ``torch.onnx.export(dynamo=True)`` (torch.export, translated by
    onnxscript), which works offline. Written beside ``path`` and renamed over it when complete.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise InteropError("ONNX export needs the optional packages: pip install 'dinov2[interop]'") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            input_names=["images"],
            output_names=list(output_names),
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    if size <= _ONNX_INLINE_LIMIT:
        with atomic_path(path) as tmp:
            program.save(str(tmp), external_data=False)
        return path
    # The graph names its data file after itself: write both under the final names in a scratch
    # folder beside ``path``, then move the data file and, last, the graph into place.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        program.save(str(Path(scratch) / path.name), external_data=True)
        written = sorted(Path(scratch).iterdir(), key=lambda f: f.name == path.name)
        for file in written:
            os.replace(file, path.parent / file.name)
    return path


def export_onnx(
    model: DinoVisionTransformer, path: PathLike, image_size: Optional[Union[int, Tuple[int, int]]] = None
) -> Path:
    """Write ``model`` as ONNX: ``images`` (B, 3, H, W) -> ``cls_token`` (B, D), ``patch_tokens`` (B, N, D).

    ``image_size`` (an int or (height, width)) is fixed in the graph; the default is the size the
    model was built for. The batch dimension is dynamic.
    """
    if not _is_dinov3(model):
        _architecture(model)  # refuses any other module before its size is read
    height, width = _image_size(model, image_size)
    wrapper = fixed_size_features(model, height, width)
    example = torch.zeros(2, model.patch_embed.in_chans, height, width)
    return export_module_onnx(wrapper, example, path, ("cls_token", "patch_tokens"))


def onnx_session(path: PathLike, threads: Optional[int] = None):
    """An ``onnxruntime.InferenceSession`` on the CPU (``threads`` intra-op threads if given)."""
    try:
        import onnxruntime
    except ImportError as error:
        raise InteropError("running ONNX models needs onnxruntime: pip install 'dinov2[interop]'") from error
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_onnx(
    model: DinoVisionTransformer, path: PathLike, batch_size: int = 4, repeats: int = 3, threads: int = 1
) -> Dict[str, float]:
    """Largest feature difference between the ONNX file and ``model`` on random images, and the
    CPU latency per image of each (``threads`` threads, best of ``repeats`` runs after a warm-up)."""
    session = onnx_session(path, threads=threads)
    shape = session.get_inputs()[0].shape
    channels, height, width = int(shape[1]), int(shape[2]), int(shape[3])
    wrapper = fixed_size_features(model.eval(), height, width)
    images = torch.randn(batch_size, channels, height, width, generator=torch.Generator().manual_seed(0))
    feed = {"images": images.numpy()}

    def per_image(run) -> float:
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return 1e3 * min(times) / batch_size

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            reference = [t.numpy() for t in wrapper(images)]
            outputs = session.run(None, feed)
            torch_ms = per_image(lambda: wrapper(images))
        onnx_ms = per_image(lambda: session.run(None, feed))
    finally:
        torch.set_num_threads(previous_threads)
    diff = max(float(abs(o - r).max()) for o, r in zip(outputs, reference))
    return {
        "max_abs_diff": diff,
        "torch_ms_per_image": torch_ms,
        "onnx_ms_per_image": onnx_ms,
        "height": height,
        "width": width,
        "batch_size": batch_size,
        "threads": threads,
    }
