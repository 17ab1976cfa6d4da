"""Set-up shared by the evaluation entry points (k-NN, linear, logistic regression).

Their options are :mod:`dinov2.eval.config` (defaults under ``configs/eval/``, the flag table);
error messages name the flag users type, with its key where the value came from the config.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from dinov2.data.transforms import make_classification_eval_transform
from dinov2.utils.config import save_config

from . import _dist
from .config import EVAL_CONFIG_FILE_NAME, PRECISIONS
from .results import prepare_output_dir
from .setup import EvalBackbone, build_model_for_eval


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

    def extraction_options(self, data: DictConfig) -> dict:
        """Keyword arguments of :func:`dinov2.eval.features.extract_features` from the ``data``
        section: the same batching, workers, device, task and autocast for every method."""
        return dict(
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            device=self.device,
            task=data.task,
            autocast_dtype=self.autocast_dtype,
        )


def configure_logging() -> None:
    level = logging.INFO if _dist.is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("dinov2").setLevel(level)


def default_output_dir(cfg: DictConfig, method: str) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    weights = Path(cfg.backbone.pretrained_weights)
    if weights.is_dir():
        return weights / "eval" / method
    raise SystemExit(f"--output-dir (output_dir) is required when --pretrained-weights is a file ({weights})")


def setup_eval(cfg: DictConfig, method: str) -> EvalContext:
    """Join the process group (under torchrun), pick the device, check the output directory (and
    write the options there), and load the backbone."""
    b = cfg.backbone
    _dist.init_from_env(torch.device(cfg.device) if cfg.device else None)
    device = torch.device(cfg.device) if cfg.device else _dist.default_device()
    configure_logging()
    output_dir = default_output_dir(cfg, method)
    problem = None
    if _dist.is_main_process():  # the only rank that writes results
        try:
            prepare_output_dir(output_dir)
            save_config(cfg, output_dir, EVAL_CONFIG_FILE_NAME)
        except OSError as error:
            problem = error
    # Every rank stops, not only the writer: the others would wait for it at the first collective.
    if _dist.all_reduce_sum(torch.tensor([int(problem is not None)])).item():
        raise SystemExit(f"--output-dir: {problem or 'the main process cannot write there'}")
    backbone = build_model_for_eval(
        b.config_file, b.pretrained_weights, device, arch=b.arch, overrides=b.overrides, image_size=b.image_size
    )
    logging.getLogger("dinov2.eval").info(
        "backbone %s, weights %s, %dpx, %d process(es) on %s",
        backbone.description,
        backbone.weights_path,
        backbone.image_size,
        _dist.get_world_size(),
        device,
    )
    # The crop size is known here when it comes from the model (given, it is checked at load).
    if b.resize_size is not None and b.resize_size < backbone.image_size:
        raise SystemExit(f"--resize-size {b.resize_size} is smaller than the {backbone.image_size} px evaluation crop")
    return EvalContext(device, backbone, output_dir, PRECISIONS[b.precision], b.resize_size)


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
