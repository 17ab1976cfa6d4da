"""Command-line pieces shared by the evaluation entry points (k-NN, linear, logistic regression)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dinov2.data.transforms import make_classification_eval_transform

from . import _dist
from .results import prepare_output_dir
from .setup import EvalBackbone, build_model_for_eval

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--config-file",
        default=None,
        help="training config describing the model: a training output's config.yaml (default: the one in "
        "--pretrained-weights when that is a training output directory) or a configs/train/*.yaml recipe",
    )
    group.add_argument(
        "--pretrained-weights",
        required=True,
        help="a training output directory (its exports/teacher_backbone_latest.pth is used), a teacher export, "
        "a consolidated checkpoint or an official-format backbone file (.pth or .safetensors)",
    )
    group.add_argument(
        "--arch",
        default=None,
        help="official architecture name instead of --config-file, e.g. dinov2_vits14 or dinov2_vitb14_reg",
    )
    group.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="evaluation crop size (default: crops.global_crops_size, 224 with --arch)",
    )
    group.add_argument(
        "--resize-size",
        type=int,
        default=None,
        help="short side before the centre crop (default: image size x 256/224, as for ImageNet; "
        "give the image size itself to keep whole small images such as 28 px sketches)",
    )
    group.add_argument(
        "--precision", choices=sorted(PRECISIONS), default="fp32", help="autocast dtype for the backbone"
    )
    group.add_argument(
        "--device", default=None, help="torch device (default: cuda:LOCAL_RANK when available, else cpu)"
    )
    group.add_argument(
        "opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. student.arch=vit_small"
    )


def add_data_arguments(parser: argparse.ArgumentParser, train_help: str) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--train-dataset", required=True, help=train_help + " (dataset spec, e.g. ImageFolder:root=/data/train)"
    )
    group.add_argument("--val-dataset", default=None, help="validation dataset spec")
    group.add_argument("--test-dataset", default=None, help="test dataset spec")
    group.add_argument("--task", default=None, help="label column to use for multi-task CSV datasets")
    group.add_argument(
        "--positive-class", default=None, help="binary tasks: name or index of the positive class (default: class 1)"
    )
    group.add_argument("--batch-size", type=int, default=128, help="images per forward pass during feature extraction")
    group.add_argument(
        "--num-workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="data-loading worker processes (default: 4, or the number of CPUs if fewer)",
    )
    group.add_argument(
        "--output-dir",
        default=None,
        help="where results.json, summary.txt and plots go (default: <training dir>/eval/<method> when "
        "--pretrained-weights is a training output directory)",
    )


@dataclass
class EvalContext:
    device: torch.device
    backbone: EvalBackbone
    output_dir: Path
    autocast_dtype: Optional[torch.dtype]
    resize_size: Optional[int] = None

    def transform(self):
        """Resize (``--resize-size``, default image size x 256/224), centre-crop, normalise."""
        b = self.backbone
        return make_classification_eval_transform(self.resize_size, b.image_size, mean=b.mean, std=b.std)


def configure_logging() -> None:
    level = logging.INFO if _dist.is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("dinov2").setLevel(level)


def default_output_dir(args: argparse.Namespace, method: str) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    weights = Path(args.pretrained_weights)
    if weights.is_dir():
        return weights / "eval" / method
    raise SystemExit(f"--output-dir is required when --pretrained-weights is a file ({weights})")


def setup_eval(args: argparse.Namespace, method: str) -> EvalContext:
    """Join the process group (under torchrun), pick the device, check the output directory and
    load the backbone."""
    _dist.init_from_env(torch.device(args.device) if args.device else None)
    device = torch.device(args.device) if args.device else _dist.default_device()
    configure_logging()
    output_dir = default_output_dir(args, method)
    problem = None
    if _dist.is_main_process():  # the only rank that writes results
        try:
            prepare_output_dir(output_dir)
        except OSError as error:
            problem = error
    # Every rank stops, not only the writer: the others would wait for it at the first collective.
    if _dist.all_reduce_sum(torch.tensor([int(problem is not None)])).item():
        raise SystemExit(f"--output-dir: {problem or 'the main process cannot write there'}")
    backbone = build_model_for_eval(
        args.config_file,
        args.pretrained_weights,
        device,
        arch=args.arch,
        overrides=args.opts,
        image_size=args.image_size,
    )
    logging.getLogger("dinov2.eval").info(
        "backbone %s, weights %s, %dpx, %d process(es) on %s",
        backbone.description,
        backbone.weights_path,
        backbone.image_size,
        _dist.get_world_size(),
        device,
    )
    if args.resize_size is not None and args.resize_size < backbone.image_size:
        raise SystemExit(
            f"--resize-size {args.resize_size} is smaller than the {backbone.image_size} px evaluation crop"
        )
    return EvalContext(device, backbone, output_dir, PRECISIONS[args.precision], args.resize_size)


def load_dataset(spec: Optional[str], transform, role: str):
    """``make_dataset(spec)`` with the role (train/val/test) named in errors; None for no spec."""
    if not spec:
        return None
    from dinov2.data.loaders import make_dataset

    try:
        return make_dataset(spec, transform=transform)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise SystemExit(f"--{role}-dataset {spec!r}: {error}") from error


def resolve_positive_class(value: Optional[str], class_names: Optional[list]) -> int:
    if value is None:
        return 1
    if class_names and value in class_names:
        return class_names.index(value)
    try:
        index = int(value)
    except ValueError:
        raise SystemExit(f"--positive-class {value!r} is not a class name ({class_names}) or an index") from None
    if index not in (0, 1):
        raise SystemExit(f"--positive-class must be 0 or 1 for a binary task, got {index}")
    return index


def check_same_classes(reference: Optional[list], other: Optional[list], role: str) -> None:
    if reference is not None and other is not None and list(reference) != list(other):
        raise SystemExit(
            f"--{role}-dataset has classes {other[:10]}{'...' if len(other) > 10 else ''} but the train dataset has "
            f"{reference[:10]}{'...' if len(reference) > 10 else ''}: labels would not match"
        )
