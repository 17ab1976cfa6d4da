"""Report what classifier training and inference will run on, and a batch size to start from.

    python -m dinov2.classify.check_setup [--model runs/x/model_best.pth | --arch vit_small --img-size 224] [--json]

Prints the device that will be used (CUDA, then MPS, then CPU), the versions of Python, torch,
torchvision, dinov2 and the optional extras, free memory (CUDA ``mem_get_info`` for a GPU, host
RAM from psutil or /proc/meminfo otherwise) and suggested batch sizes.

Batch-size heuristic (a starting point, not a guarantee): with ``T`` tokens per image, width
``D`` and ``L`` blocks,

* training (fine-tuning, fp32) keeps about ``34 * T * D * L * 4`` bytes of activations per image
  (the usual transformer estimate of 34 values per token and channel per block) and
  ``16`` bytes per parameter (weights, gradients, two AdamW moments);
* inference holds one block's working set, about ``16 * T * D * 4`` bytes per image, and
  ``4`` bytes per parameter;

70 % of the free memory, minus the parameter memory, divided by the per-image figure, rounded down
to a power of two and clipped to [1, 1024]. Linear probing runs the backbone without gradients, so
its batch size can be as large as the inference one.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Dict, Optional, Sequence

import torch

from .device import cpu_count, device_memory, select_device

USABLE_FRACTION = 0.7


def _version(module_name: str) -> Optional[str]:
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return str(getattr(module, "__version__", "unknown"))


def library_versions() -> Dict[str, Optional[str]]:
    import importlib.metadata

    try:
        dinov2_version = importlib.metadata.version("dinov2")
    except importlib.metadata.PackageNotFoundError:
        dinov2_version = "not installed (source tree)"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "dinov2": dinov2_version,
        "peft": _version("peft"),
        "fastapi": _version("fastapi"),
        "timm": _version("timm"),
        "xformers": _version("xformers"),
    }


def _power_of_two_floor(value: float) -> int:
    if value < 1:
        return 1
    return min(1024, 1 << (int(value).bit_length() - 1))


def suggest_batch_sizes(
    free_bytes: Optional[int], embed_dim: int, depth: int, tokens: int, num_params: int
) -> Dict[str, Optional[int]]:
    """``{"train": n, "inference": n}`` from the heuristic in the module docstring."""
    if not free_bytes:
        return {"train": None, "inference": None}
    usable = free_bytes * USABLE_FRACTION
    train_per_image = 34 * tokens * embed_dim * depth * 4
    infer_per_image = 16 * tokens * embed_dim * 4
    return {
        "train": _power_of_two_floor((usable - 16 * num_params) / train_per_image),
        "inference": _power_of_two_floor((usable - 4 * num_params) / infer_per_image),
    }


def _shape_from_arch(arch: str, img_size: int, patch_size: int) -> Dict[str, int]:
    from dinov2.models.vision_transformer import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; valid: {sorted(ARCHITECTURES)}")
    embed_dim, depth, _, mlp_ratio = ARCHITECTURES[arch]
    # Per block: qkv + proj (4 D^2) and the MLP (2 * mlp_ratio * D^2).
    params = int(depth * (4 + 2 * mlp_ratio) * embed_dim**2)
    return {"embed_dim": embed_dim, "depth": depth, "tokens": (img_size // patch_size) ** 2 + 1, "params": params}


def _shape_from_model(path: str) -> Dict[str, int]:
    from .checkpoint import read_classifier_file

    config, state, _ = read_classifier_file(path)
    kwargs = config.backbone.get("kwargs", {})
    if config.backbone.get("kind") != "vit":
        raise ValueError(f"{path}: batch-size suggestions are only computed for DINOv2 ViT backbones")
    crop = config.preprocessing["crop_size"]
    tokens = (crop // kwargs["patch_size"]) ** 2 + 1 + kwargs.get("num_register_tokens", 0)
    params = sum(t.numel() for t in state.values())
    return {"embed_dim": kwargs["embed_dim"], "depth": kwargs["depth"], "tokens": tokens, "params": params}


def setup_report(
    device: Optional[str] = None,
    model: Optional[str] = None,
    arch: str = "vit_small",
    img_size: int = 224,
    patch_size: int = 14,
) -> Dict[str, object]:
    chosen = select_device(device)
    report: Dict[str, object] = {"device": str(chosen), "device_type": chosen.type}
    if chosen.type == "cuda":
        index = chosen.index if chosen.index is not None else torch.cuda.current_device()
        report["device_name"] = torch.cuda.get_device_name(index)
        report["bf16_supported"] = torch.cuda.is_bf16_supported()
    else:
        report["device_name"] = platform.processor() or platform.machine()
        report["cpu_threads"] = cpu_count()
        report["torch_threads"] = torch.get_num_threads()
    report["versions"] = library_versions()
    memory = device_memory(chosen)
    report["memory"] = memory
    shape = _shape_from_model(model) if model else _shape_from_arch(arch, img_size, patch_size)
    report["model_shape"] = shape
    report["suggested_batch_size"] = suggest_batch_sizes(
        memory.get("available"), shape["embed_dim"], shape["depth"], shape["tokens"], shape["params"]
    )
    return report


def _gib(value) -> str:
    return "unknown" if value is None else f"{value / 2**30:.1f} GiB"


def format_report(report: Dict[str, object]) -> str:
    versions = report["versions"]
    memory = report["memory"]
    shape = report["model_shape"]
    batch = report["suggested_batch_size"]
    lines = [
        f"device:            {report['device']} ({report['device_name']})",
        "versions:          " + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None),
        "not installed:     " + (", ".join(k for k, v in versions.items() if v is None) or "-"),
        f"memory:            {_gib(memory.get('available'))} free of {_gib(memory.get('total'))}",
        f"model shape:       width {shape['embed_dim']}, {shape['depth']} blocks, {shape['tokens']} tokens/image, "
        f"{shape['params'] / 1e6:.1f} M parameters",
        f"batch size:        fine-tuning {batch['train']}, inference / linear probe {batch['inference']}",
    ]
    if "cpu_threads" in report:
        lines.insert(1, f"cpu threads:       {report['cpu_threads']} available, torch uses {report['torch_threads']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Report device, versions, free memory and a suggested batch size.")
    parser.add_argument("--device", default=None, help="device to check (default: the one that would be chosen)")
    parser.add_argument("--model", default=None, help="a classifier file: size the batch for its backbone")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = setup_report(args.device, args.model, args.arch, args.img_size, args.patch_size)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
