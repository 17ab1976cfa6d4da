"""Options of the evaluations (k-NN, linear, logistic regression, patch PCA), loaded like training's.

Each method's defaults are YAML files under ``configs/eval/``: ``common.yaml`` (the backbone,
device and tracking), ``data.yaml`` (datasets, output directory; not for PCA) and the method's
own file (``knn.yaml``, ...). On top come an ``--eval-config`` file, then the command-line flags,
then ``key=value`` overrides, through :func:`dinov2.utils.config.load_task_config`: unknown keys,
wrong types and bad values (:data:`SCHEMAS`) are errors naming the key (and its flag), checked
once at load; the config is read-only afterwards.

Each flag is another spelling of one key (:data:`FLAGS`, the only table of them): ``--nb-knn 1 5``
gives the same config as ``knn.nb_knn=[1,5]``. A positional ``key=value`` whose first part is a
section of the evaluation config (``knn.temperature=0.1``) sets that option; any other
(``student.arch=vit_small``) overrides the training config that describes the backbone, as it
always did, and together they replace ``backbone.overrides``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from dinov2.hub.backbones import ENTRY_POINTS
from dinov2.utils.config import (
    ConfigError,
    ConfigSchema,
    ExistingPath,
    Length,
    OneOf,
    Range,
    load_task_config,
    parse_value,
)
from dinov2.utils.tracking import WANDB_MODES

METHODS = ("knn", "linear", "log_regression", "pca")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # backbone.precision: autocast dtype
FEATURE_MODES = ("cached", "online")
EVAL_CONFIG_FILE_NAME = "eval_config.yaml"  # the merged options, beside results.json


@dataclass(frozen=True)
class Flag:
    """A command-line flag and the config key it sets.

    ``kind``: ``value`` is read like the value of a ``key=value`` override (numbers, lists);
    ``text`` is kept as typed (paths, dataset specs, names); ``switch`` is ``--x`` / ``--no-x``;
    ``on`` is ``--x`` for true.
    """

    name: str
    key: str
    help: str
    kind: str = "value"
    nargs: Optional[str] = None  # "+": one or more values, a list

    @property
    def dest(self) -> str:
        """The attribute argparse stores the flag's value in."""
        return self.name[2:].replace("-", "_")

    def value(self, given):
        if self.kind == "value":
            return [parse_value(v) for v in given] if self.nargs else parse_value(given)
        return given


_BACKBONE_FLAGS = (
    Flag(
        "--config-file",
        "backbone.config_file",
        "training config describing the model: a training output's config.yaml (default: the one in "
        "--pretrained-weights when that is a training output directory) or a configs/train/*.yaml recipe",
        "text",
    ),
    Flag(
        "--pretrained-weights",
        "backbone.pretrained_weights",
        "a training output directory (its exports/teacher_backbone_latest.pth is used), a teacher export, "
        "a consolidated checkpoint or an official-format backbone file (.pth or .safetensors)",
        "text",
    ),
    Flag(
        "--arch",
        "backbone.arch",
        "official architecture name instead of --config-file, e.g. dinov2_vits14 or dinov2_vitb14_reg",
        "text",
    ),
    Flag(
        "--image-size",
        "backbone.image_size",
        "evaluation crop size (default: crops.global_crops_size, 224 with --arch)",
    ),
    Flag(
        "--resize-size",
        "backbone.resize_size",
        "short side before the centre crop (default: image size x 256/224, as for ImageNet; "
        "give the image size itself to keep whole small images such as 28 px sketches)",
    ),
    Flag("--precision", "backbone.precision", "autocast dtype for the backbone: fp32, bf16 or fp16", "text"),
    Flag("--device", "device", "torch device (default: cuda:LOCAL_RANK when available, else cpu)", "text"),
)
_DATA_FLAGS = (
    Flag(
        "--train-dataset",
        "data.train",
        "labelled train set (k-NN: the bank), e.g. ImageFolder:root=/data/train",
        "text",
    ),
    Flag("--val-dataset", "data.val", "validation dataset spec", "text"),
    Flag("--test-dataset", "data.test", "test dataset spec", "text"),
    Flag("--task", "data.task", "label column to use for multi-task CSV datasets", "text"),
    Flag("--positive-class", "data.positive_class", "binary tasks: name or index of the positive class"),
    Flag("--batch-size", "data.batch_size", "images per forward pass during feature extraction"),
    Flag(
        "--num-workers",
        "data.num_workers",
        "data-loading worker processes (default: 4, or the number of CPUs if fewer)",
    ),
    Flag(
        "--output-dir",
        "output_dir",
        "where results.json, summary.txt and plots go (default: <training dir>/eval/<method> when "
        "--pretrained-weights is a training output directory)",
        "text",
    ),
)
_METHOD_FLAGS = {
    "knn": (
        Flag("--nb-knn", "knn.nb_knn", "values of k", nargs="+"),
        Flag("--temperature", "knn.temperature", "voting temperature T (weights exp(sim/T))"),
        Flag("--query-chunk-size", "knn.query_chunk_size", "queries per similarity block"),
        Flag("--bank-chunk-size", "knn.bank_chunk_size", "bank entries per similarity block"),
        Flag("--n-per-class", "knn.n_per_class", "few-shot: keep only this many bank samples per class"),
        Flag("--few-shot-seeds", "knn.few_shot_seeds", "few-shot: one run per seed (mean and std reported)", nargs="+"),
        Flag("--plot-k", "knn.plot_k", "k whose confusion matrix is drawn (default: 20 if evaluated)"),
    ),
    "linear": (
        Flag("--learning-rates", "linear.learning_rates", "base learning rates (scaled by batch*world/256)", nargs="+"),
        Flag("--n-last-blocks", "linear.n_last_blocks", "block counts whose CLS tokens are concatenated", nargs="+"),
        Flag(
            "--avgpool",
            "linear.avgpool",
            "append the average patch token: both variants, always or never (both, yes, no)",
        ),
        Flag("--epochs", "linear.epochs", "training epochs of the heads"),
        Flag("--train-batch-size", "linear.train_batch_size", "samples per rank per step"),
        Flag(
            "--eval-period-iterations",
            "linear.eval_period_iterations",
            "validate every N steps (default: once per epoch)",
        ),
        Flag(
            "--feature-mode",
            "linear.feature_mode",
            "cached: extract train features once; online: backbone every step",
            "text",
        ),
        Flag(
            "--augment",
            "linear.augment",
            "online mode: random-resized crop + flip (default on; cached mode never augments)",
            "switch",
        ),
        Flag(
            "--val-fraction",
            "linear.val_fraction",
            "without --val-dataset: share of the train set held out for selection",
        ),
        Flag("--seed", "linear.seed", "seed of the held-out split and the head training"),
    ),
    "log_regression": (
        Flag("--c-values", "log_regression.c_values", "inverse regularisation strengths to sweep", nargs="+"),
        Flag("--max-iter", "log_regression.max_iter", "L-BFGS iterations per fit"),
        Flag("--standardize", "log_regression.standardize", "standardise features", "switch"),
        Flag("--l2-normalize", "log_regression.l2_normalize", "L2-normalise features first", "switch"),
        Flag(
            "--features",
            "log_regression.features",
            "CLS token (cls), or CLS + average patch token (cls_avgpool)",
            "text",
        ),
        Flag(
            "--val-fraction",
            "log_regression.val_fraction",
            "without --val-dataset: share of train held out for the sweep",
        ),
        Flag("--seed", "log_regression.seed", "seed of the held-out split and the solver"),
    ),
    "pca": (
        Flag("--images", "pca.images", "image files and/or folders (searched recursively)", "text", nargs="+"),
        Flag("--max-images", "pca.max_images", "at most this many images"),
        Flag("--output", "pca.output", "PNG file to write", "text"),
        Flag("--foreground-threshold", "pca.foreground_threshold", "mask background patches (e.g. 0.5)"),
        Flag("--invert-foreground", "pca.invert_foreground", "the foreground is the low side of PC1", "on"),
    ),
}
# Every flag of each method, mapped onto its key: the one table (docs/evaluation.md shows it).
FLAGS: Dict[str, Tuple[Flag, ...]] = {
    method: _BACKBONE_FLAGS + (() if method == "pca" else _DATA_FLAGS) + _METHOD_FLAGS[method] for method in METHODS
}


def _default_num_workers() -> int:
    return min(4, os.cpu_count() or 1)


def _check_backbone(cfg: DictConfig) -> None:
    b = cfg.backbone
    if b.config_file and b.arch:
        raise ConfigError("give either --config-file (backbone.config_file) or --arch (backbone.arch), not both")
    if b.image_size is not None and b.resize_size is not None and b.resize_size < b.image_size:
        raise ConfigError(
            f"--resize-size (backbone.resize_size) {b.resize_size} is smaller than the {b.image_size} px evaluation "
            "crop (backbone.image_size)"
        )


def _check_knn(cfg: DictConfig) -> None:
    if not cfg.data.val and not cfg.data.test:
        raise ConfigError("give --val-dataset and/or --test-dataset (data.val, data.test): the k-NN queries")


def _check_linear(cfg: DictConfig) -> None:
    if cfg.linear.feature_mode == "cached" and cfg.linear.augment:
        raise ConfigError(
            "--augment needs --feature-mode online (linear.augment=true with linear.feature_mode=cached: "
            "cached features are extracted once, without augmentation)"
        )


_POSITIVE = Range(0, low_open=True)
_COMMON_RULES = {
    "backbone.pretrained_weights": ExistingPath(),  # a typo stops the run before any process group is joined
    "backbone.arch": OneOf(tuple(sorted(ENTRY_POINTS))),
    "backbone.image_size": Range(1),
    "backbone.resize_size": Range(1),
    "backbone.precision": OneOf(tuple(PRECISIONS)),
    "logging.wandb.mode": OneOf(WANDB_MODES),
}
_DATA_RULES = {"data.batch_size": Range(1), "data.num_workers": Range(0)}
_HELD_OUT_SHARE = Range(0, 1, low_open=True, high_open=True)
_METHOD_RULES = {
    "knn": {
        "knn.nb_knn": (Length(1, at_least=True), Range(1, integer=True)),
        "knn.temperature": _POSITIVE,
        "knn.query_chunk_size": Range(1),
        "knn.bank_chunk_size": Range(1),
        "knn.n_per_class": Range(1),
        "knn.few_shot_seeds": (Length(1, at_least=True), Range(0, integer=True)),
        "knn.plot_k": Range(1),
    },
    "linear": {
        "linear.learning_rates": (Length(1, at_least=True), _POSITIVE),
        "linear.n_last_blocks": (Length(1, at_least=True), Range(1, integer=True)),
        "linear.avgpool": OneOf(("both", True, False)),  # yes / no are YAML booleans
        "linear.epochs": Range(1),
        "linear.train_batch_size": Range(1),
        "linear.eval_period_iterations": Range(1),
        "linear.feature_mode": OneOf(FEATURE_MODES),
        "linear.val_fraction": _HELD_OUT_SHARE,
    },
    "log_regression": {
        "log_regression.c_values": (Length(1, at_least=True), _POSITIVE),
        "log_regression.max_iter": Range(1),
        "log_regression.features": OneOf(("cls", "cls_avgpool")),
        "log_regression.val_fraction": _HELD_OUT_SHARE,
    },
    "pca": {"pca.images": Length(1, at_least=True), "pca.max_images": Range(1)},
}
_NULL_TYPES = {
    "backbone.pretrained_weights": "str",
    "backbone.config_file": "str",
    "backbone.arch": "str",
    "backbone.image_size": "int",
    "backbone.resize_size": "int",
    "device": "str",
    "data.train": "str",
    "data.val": "str",
    "data.test": "str",
    "data.task": "str",
    "data.positive_class": "scalar",
    "data.num_workers": "int",
    "output_dir": "str",
    "knn.n_per_class": "int",
    "knn.plot_k": "int",
    "linear.eval_period_iterations": "int",
    "linear.augment": "bool",
    "linear.avgpool": "scalar",  # both, or yes / no (read as true / false, by a flag as by a key=value)
    "pca.output": "str",
    "pca.foreground_threshold": "float",
}


def _schema(method: str) -> ConfigSchema:
    with_data = method != "pca"
    flags = FLAGS[method]
    sections = {"backbone", "device", "logging", method} | ({"data", "output_dir"} if with_data else set())
    return ConfigSchema(
        name=f"{method} evaluation",
        defaults=("eval/common.yaml",) + (("eval/data.yaml",) if with_data else ()) + (f"eval/{method}.yaml",),
        null_types={k: t for k, t in _NULL_TYPES.items() if k.split(".")[0] in sections},
        rules={**_COMMON_RULES, **(_DATA_RULES if with_data else {}), **_METHOD_RULES[method]},
        required=("backbone.pretrained_weights",) + (("data.train",) if with_data else ("pca.output",)),
        checks=(_check_backbone,) + {"knn": (_check_knn,), "linear": (_check_linear,)}.get(method, ()),
        aliases={f.key: f.name for f in flags},
        fill={"data.num_workers": _default_num_workers} if with_data else {},
    )


SCHEMAS: Dict[str, ConfigSchema] = {method: _schema(method) for method in METHODS}


def build_parser(method: str, prog: str, description: str, add_help: bool = True) -> argparse.ArgumentParser:
    """The method's command line: ``--eval-config``, its flags (:data:`FLAGS`) and ``key=value`` items."""
    schema = SCHEMAS[method]
    defaults = schema.default_config()
    parser = argparse.ArgumentParser(
        prog,
        add_help=add_help,
        description=description,
        epilog=f"Every option, with its default: configs/eval/{method}.yaml and the files it names; "
        "docs/evaluation.md lists the flags and their keys.",
    )
    parser.add_argument(
        "--eval-config",
        default=None,
        help=f"YAML file of evaluation options (sections {', '.join(defaults)}), applied before the flags",
    )
    group = parser.add_argument_group("options (each flag sets the config key in brackets)")
    for flag in FLAGS[method]:
        default = OmegaConf.select(defaults, flag.key)
        shown = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
        text = f"{flag.help} [{flag.key}" + (f", default {shown}]" if shown not in (None, []) else "]")
        if flag.kind == "switch":
            group.add_argument(flag.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif flag.kind == "on":
            group.add_argument(flag.name, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(flag.name, nargs=flag.nargs, default=argparse.SUPPRESS, help=text)
    parser.add_argument(
        "opts",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="evaluation options (knn.temperature=0.1, data.batch_size=64, ...); any other key is an override of "
        "the training config describing the model (student.arch=vit_small), as backbone.overrides",
    )
    return parser


def config_from_args(method: str, args: argparse.Namespace) -> DictConfig:
    """The validated, read-only config of parsed command-line ``args``."""
    schema = SCHEMAS[method]
    sections = set(schema.default_config())
    # Flags default to argparse.SUPPRESS: only those given are attributes, so defaults stay in the YAML.
    flags = {f.key: f.value(getattr(args, f.dest)) for f in FLAGS[method] if hasattr(args, f.dest)}
    eval_overrides: List[str] = []
    model_overrides: List[str] = []
    for item in args.opts:
        (eval_overrides if item.split("=", 1)[0].split(".")[0] in sections else model_overrides).append(item)
    if model_overrides:
        flags["backbone.overrides"] = model_overrides
    return load_task_config(schema, args.eval_config, eval_overrides, flags)


def parse_config(method: str, parser: argparse.ArgumentParser, argv: Optional[Iterable[str]] = None) -> DictConfig:
    """Parse ``argv`` with the method's ``parser``; a config mistake exits with its message."""
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        return config_from_args(method, args)
    except ConfigError as error:
        raise SystemExit(f"{parser.prog}: {error}") from None
