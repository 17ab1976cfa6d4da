"""Linear probes on frozen features: a whole grid of heads trained in one pass over the data.

Every head is ``nn.Linear`` on one of four inputs built from the same backbone outputs: the CLS
tokens of the last 1 or 4 blocks, concatenated, with or without the average patch token of the
last block (:class:`~dinov2.eval.features.BlockFeatures` computes all of them at once). The grid
is learning rates x block counts x avgpool. All heads see the same batches; each trains by SGD of
its own (momentum 0.9, no weight decay, its own learning rate) with a cosine learning-rate decay
to zero, and its weights start from a generator seeded with ``seed`` (heads of the same input
width start equal). Heads share nothing, so each head ends where a separately trained head with
the same settings, seed and data order would (up to float rounding: the heads of one input are
stacked and computed by one matmul, see :class:`HeadGrid`). The head with the best validation
top-1 at the end is evaluated on the test set.

Two ways to feed the heads:
- ``cached`` (default): train features are extracted once without augmentation and every epoch
  reuses them; only the heads are computed per step.
- ``online``: every step runs the backbone on freshly loaded (and, by default, augmented:
  random-resized crop + flip, as upstream DINOv2) training images.
Validation and test features never change, so both modes extract them once.

Under torchrun each rank trains on its own shard of the training set (``batch_size`` samples per
rank per step) and head gradients are averaged over ranks after each step, so the heads stay
identical on every rank. Learning rates are scaled by ``batch_size * world_size / 256``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from dinov2.data.image_io import SkipBadSamples
from dinov2.data.splits import split_train_val

from . import _dist
from .features import (
    BlockFeatures,
    FeatureSet,
    _Indexed,
    as_numpy,
    class_names_of,
    extract_features,
    group_ids_for,
    is_skipped_batch,
)
from .metrics import evaluation_report, summary_lines, youden_thresholds_of
from .plots import plot_confusion_matrix
from .results import track_results, write_results

logger = logging.getLogger("dinov2.eval")

DEFAULT_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DEFAULT_N_LAST_BLOCKS = (1, 4)
DEFAULT_AVGPOOL = (False, True)


@dataclass(frozen=True)
class HeadConfig:
    lr: float  # before scaling by the global batch size
    n_last_blocks: int
    avgpool: bool

    @property
    def name(self) -> str:
        return f"lr={self.lr:g}:blocks={self.n_last_blocks}:avgpool={str(self.avgpool).lower()}"


def make_head_grid(
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    n_last_blocks: Sequence[int] = DEFAULT_N_LAST_BLOCKS,
    avgpool: Sequence[bool] = DEFAULT_AVGPOOL,
) -> List[HeadConfig]:
    return [HeadConfig(float(lr), int(n), bool(a)) for n in n_last_blocks for a in avgpool for lr in learning_rates]


def linear_input(block_features: torch.Tensor, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """The head input from :class:`BlockFeatures` output (B, n_max + 1, D).

    The CLS tokens of the last ``n_last_blocks`` blocks, concatenated, then (with ``avgpool``) the
    average patch token: adjacent rows of ``block_features``, so this is a view of it (no copy)
    when it is contiguous, and a matmul reads it in place.
    """
    n_max = block_features.shape[1] - 1
    if not 1 <= n_last_blocks <= n_max:
        raise ValueError(f"n_last_blocks={n_last_blocks} but features hold the last {n_max} blocks")
    return block_features[:, n_max - n_last_blocks : n_max + int(avgpool)].flatten(1)


def cosine_factor(iteration: int, total: int) -> float:
    """Learning-rate multiplier: 1 at the start, decaying along a half cosine to 0 at ``total``."""
    return 0.5 * (1.0 + math.cos(math.pi * iteration / max(total, 1)))


MOMENTUM = 0.9  # SGD momentum of every head; no dampening, no Nesterov, no weight decay (as upstream)


class HeadGrid(nn.Module):
    """The grid's linear heads, stacked so that one step trains all of them.

    Heads that read the same input (same block count and avgpool) are stored together:
    ``weights[g]`` is (heads, classes, input width) and ``biases[g]`` (heads, classes), so one
    matmul per input computes the logits of all its heads, with no Python loop over heads. Each
    head still trains exactly as an ``nn.Linear`` with its own ``torch.optim.SGD`` would: its loss
    is the mean cross entropy over the batch, the gradient of the summed loss is each head's own
    gradient (heads share no parameters), and the update is SGD's ``buf = momentum * buf + grad;
    param -= lr * buf`` with the head's own learning rate. ``torch.optim`` takes one learning rate
    per parameter group, and a group per head would mean a tensor per head again, so that update
    is written out here with a per-head learning-rate tensor.
    """

    def __init__(
        self, configs: Sequence[HeadConfig], embed_dim: int, num_classes: int, seed: int, lr_scale: float, device
    ):
        super().__init__()
        self.configs = list(configs)
        self.lr_scale = lr_scale
        self.inputs: List[Tuple[int, bool]] = []  # (n_last_blocks, avgpool) of each stack
        members: List[List[int]] = []  # head indices (grid order) of each stack
        for index, config in enumerate(self.configs):
            key = (config.n_last_blocks, config.avgpool)
            if key not in self.inputs:
                self.inputs.append(key)
                members.append([])
            members[self.inputs.index(key)].append(index)
        self.members = members
        # head index -> (stack, slot), and the grid order of the stacks' concatenated outputs
        self._slot = {h: (g, s) for g, heads in enumerate(members) for s, h in enumerate(heads)}
        self._grid_order = torch.argsort(torch.tensor([h for heads in members for h in heads]))
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for (n_last_blocks, avgpool), heads in zip(self.inputs, members):
            in_dim = embed_dim * (n_last_blocks + int(avgpool))
            # per head, the same draw as before stacking: independent of the grid's size and order
            weight = torch.stack(
                [
                    torch.randn((num_classes, in_dim), generator=torch.Generator().manual_seed(seed)) * 0.01
                    for _ in heads
                ]
            )
            self.weights.append(nn.Parameter(weight.to(device)))
            self.biases.append(nn.Parameter(torch.zeros(len(heads), num_classes, device=device)))
        self._momentum = [torch.zeros_like(p) for p in self._params()]
        # lr * lr_scale per head (float64, as the Python floats torch.optim would be given)
        self._scaled_lrs = [
            torch.tensor([self.configs[h].lr * lr_scale for h in heads], dtype=torch.float64) for heads in members
        ]

    def __len__(self) -> int:
        return len(self.configs)

    def _params(self) -> List[nn.Parameter]:
        return [*self.weights, *self.biases]

    def stack_logits(self, block_features: torch.Tensor) -> List[torch.Tensor]:
        """(batch, heads of the stack, classes) logits of every stack."""
        out = []
        for (n_last_blocks, avgpool), weight, bias in zip(self.inputs, self.weights, self.biases):
            x = linear_input(block_features, n_last_blocks, avgpool)
            out.append(F.linear(x, weight.flatten(0, 1), bias.flatten()).unflatten(1, weight.shape[:2]))
        return out

    def head(self, index: int) -> nn.Linear:
        """Head ``index`` (grid order) as a standalone ``nn.Linear`` (a copy)."""
        stack, slot = self._slot[index]
        weight = self.weights[stack][slot].detach()
        linear = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(self.biases[stack][slot])
        return linear

    def train_step(self, block_features: torch.Tensor, labels: torch.Tensor, lr_factor: float) -> torch.Tensor:
        """One SGD step of every head; returns the per-head losses (on this rank's batch)."""
        params = self._params()
        if labels.numel():
            stack_losses = []
            for logits in self.stack_logits(block_features):
                batch, heads, classes = logits.shape
                per_sample = F.cross_entropy(
                    logits.reshape(batch * heads, classes), labels.repeat_interleave(heads), reduction="none"
                )
                stack_losses.append(per_sample.view(batch, heads).mean(dim=0))
            losses = torch.cat(stack_losses)
            grads = list(torch.autograd.grad(losses.sum(), params))  # heads share nothing: each its own gradient
            losses = losses.detach()[self._grid_order.to(losses.device)]
        else:  # a batch whose images were all skipped as unreadable: zero gradients
            losses = torch.zeros(len(self.configs), device=params[0].device)
            grads = [torch.zeros_like(p) for p in params]
        if _dist.get_world_size() > 1:
            grads = self._average_gradients(grads)
        self._sgd_step(grads, lr_factor)
        return losses

    @torch.no_grad()
    def _sgd_step(self, grads: List[torch.Tensor], lr_factor: float) -> None:
        # torch.optim.SGD starts the momentum buffer at the first gradient; 0.9 * 0 + grad is
        # exactly that gradient, so zero-initialised buffers give the same updates.
        lrs = [(scaled * lr_factor).to(torch.float32) for scaled in self._scaled_lrs]
        for param, grad, buf, lr in zip(self._params(), grads, self._momentum, lrs + lrs):  # weights, then biases
            buf.mul_(MOMENTUM).add_(grad)
            lr = lr.to(param.device).view(-1, *([1] * (param.ndim - 1)))
            param.addcmul_(buf, lr, value=-1.0)

    @staticmethod
    def _average_gradients(grads: List[torch.Tensor]) -> List[torch.Tensor]:
        flat = _dist.all_reduce_sum(torch.cat([g.flatten() for g in grads])) / _dist.get_world_size()
        return [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]

    @torch.no_grad()
    def correct_counts(self, features: FeatureSet, batch_size: int = 1024) -> torch.Tensor:
        """Top-1 hits of every head (grid order) on (this rank's share of) a feature set."""
        hits = torch.zeros(len(self.configs), dtype=torch.long)
        for start in range(0, len(features), batch_size):
            chunk = features.features[start : start + batch_size]
            labels = features.labels[start : start + batch_size]
            per_stack = [(logits.argmax(dim=2) == labels[:, None]).sum(dim=0) for logits in self.stack_logits(chunk)]
            hits += torch.cat(per_stack).cpu()[self._grid_order]
        return hits

    @torch.no_grad()
    def probabilities(self, head: int, features: FeatureSet, batch_size: int = 1024) -> torch.Tensor:
        config, linear = self.configs[head], self.head(head)
        rows = []
        for start in range(0, len(features), batch_size):
            chunk = linear_input(features.features[start : start + batch_size], config.n_last_blocks, config.avgpool)
            rows.append(torch.softmax(linear(chunk), dim=1))
        return torch.cat(rows)


# ----------------------------------------------------------------------------- data order
def batch_positions(
    num_local: int,
    num_global: int,
    batch_size: int,
    epochs: int,
    seed: int,
    rank: int,
    world_size: Optional[int] = None,
) -> List[np.ndarray]:
    """This rank's batches (positions in its shard) for the whole run.

    Each epoch is a permutation of the shard seeded by (seed, rank, epoch); epochs are
    concatenated and cut into ``batch_size`` pieces (a batch may straddle two epochs). The number
    of steps, ``epochs * ceil(num_global / (batch_size * world_size))``, is the same on every rank.
    """
    world_size = world_size or _dist.get_world_size()
    if num_local < 1:
        raise ValueError(f"rank {rank} has no training samples")
    steps = epochs * math.ceil(num_global / (batch_size * world_size))
    needed = steps * batch_size
    stream, epoch = [], 0
    while sum(len(s) for s in stream) < needed:
        stream.append(np.random.default_rng([seed, rank, epoch]).permutation(num_local))
        epoch += 1
    flat = np.concatenate(stream)[:needed]
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


class CachedTrainSource:
    """Training batches from features extracted once."""

    def __init__(self, features: FeatureSet):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def batches(self, positions: List[np.ndarray]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for pos in positions:
            index = torch.as_tensor(pos, device=self.features.features.device)
            yield self.features.features[index], self.features.labels[index]


class OnlineTrainSource:
    """Training batches computed by the backbone from (augmented) images at every step."""

    def __init__(
        self,
        model,
        dataset,
        local_indices: Sequence[int],
        n_last_blocks: int,
        device,
        task=None,
        num_workers=4,
        autocast_dtype=None,
    ):
        self.model, self.dataset, self.local_indices = model, dataset, [int(i) for i in local_indices]
        self.feature_fn = BlockFeatures(n_last_blocks)
        self.device, self.task, self.num_workers, self.autocast_dtype = (
            torch.device(device),
            task,
            num_workers,
            autocast_dtype,
        )

    def __len__(self) -> int:
        return len(self.local_indices)

    def batches(self, positions: List[np.ndarray]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(
            _Indexed(self.dataset, self.local_indices, self.task),
            batch_sampler=[p.tolist() for p in positions],
            num_workers=self.num_workers,
            collate_fn=SkipBadSamples(),
        )
        for batch in loader:
            if is_skipped_batch(batch):
                # Every image of this batch was unreadable (bad_images=skip). Still take the step,
                # with no samples, so that all ranks keep the same number of steps.
                width = self.feature_fn.n_last_blocks + 1
                yield (
                    torch.zeros(0, width, self.model.embed_dim, device=self.device),
                    torch.zeros(0, dtype=torch.long, device=self.device),
                )
                continue
            images, labels, indices = batch
            if (labels < 0).any():
                bad = indices[labels < 0][:5].tolist()
                raise ValueError(f"unlabelled training samples (dataset indices {bad}) in the online linear probe")
            autocast = (
                torch.autocast(self.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype
                else contextlib.nullcontext()
            )
            with torch.no_grad(), autocast:  # no_grad, not inference_mode: heads train on these tensors
                features = self.feature_fn(self.model, images.to(self.device, non_blocking=True))
            yield features.float(), labels.to(self.device)


@dataclass
class GridResult:
    grid: HeadGrid
    val_accuracy: List[float]  # final, per head
    history: List[dict]  # {"iteration", "val_top1": [...per head]}
    best_head: int
    iterations: int
    train_seconds: float


def train_linear_grid(
    source,
    val: FeatureSet,
    num_classes: int,
    configs: Sequence[HeadConfig],
    embed_dim: int,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    seed: int = 0,
    eval_period_iterations: Optional[int] = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> GridResult:
    """Train every head of the grid on ``source`` and pick the best on ``val`` (this rank's share)."""
    world_size, rank = _dist.get_world_size(), _dist.get_rank()
    num_global = int(_dist.all_reduce_sum(torch.tensor([len(source)])).item())
    positions = batch_positions(len(source), num_global, batch_size, epochs, seed, rank)
    total = len(positions)
    steps_per_epoch = max(1, total // max(epochs, 1))
    period = eval_period_iterations or steps_per_epoch
    lr_scale = batch_size * world_size / 256.0
    grid = HeadGrid(configs, embed_dim, num_classes, seed, lr_scale, device)
    val_count = int(_dist.all_reduce_sum(torch.tensor([len(val)])).item())
    history = []
    start = time.perf_counter()

    def evaluate(iteration: int) -> List[float]:
        hits = _dist.all_reduce_sum(grid.correct_counts(val))
        accuracy = (hits.double() / max(val_count, 1)).tolist()
        history.append({"iteration": iteration, "val_top1": accuracy})
        best = int(np.argmax(accuracy))
        logger.info(
            "iteration %d/%d: best val top-1 %.2f%% (%s)", iteration, total, 100 * accuracy[best], configs[best].name
        )
        return accuracy

    bar = tqdm(
        total=total,
        desc="linear heads",
        unit="it",
        disable=not (progress and _dist.is_main_process()),
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    accuracy = None
    for iteration, (features, labels) in enumerate(source.batches(positions)):
        grid.train_step(features, labels, cosine_factor(iteration, total))
        bar.update(1)
        done = iteration + 1
        if done % period == 0 or done == total:
            accuracy = evaluate(done)
    bar.close()
    if accuracy is None:
        accuracy = evaluate(0)
    best = int(np.argmax(accuracy))  # first head of the grid order on ties
    return GridResult(grid, accuracy, history, best, total, time.perf_counter() - start)


# ----------------------------------------------------------------------------------- CLI
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Flags and ``key=value`` options of :data:`dinov2.eval.config.FLAGS` ``["linear"]``."""
    from .config import build_parser

    return build_parser(
        "linear", "dinov2 linear evaluation", description="grid of linear probes on frozen features", add_help=add_help
    )


def _labels_of(dataset, task) -> Optional[np.ndarray]:
    getter = getattr(dataset, "get_targets", None)
    if getter is None:
        return None
    targets = np.asarray(getter())
    if targets.ndim == 2:
        names = list(getattr(dataset, "task_names", []))
        if task is None or task not in names:
            raise SystemExit(f"the dataset has label columns {names}: choose one with --task")
        return targets[:, names.index(task)]
    return targets


def run_linear(cfg: DictConfig) -> dict:
    """The evaluation of a loaded config (:func:`dinov2.eval.config.parse_config`)."""
    from dinov2.data.transforms import make_classification_train_transform

    from .cli import check_same_classes, load_dataset, resolve_positive_class, setup_eval

    ctx = setup_eval(cfg, "linear")
    data, options = cfg.data, cfg.linear
    augment = options.feature_mode == "online" and options.augment is not False
    model, backbone = ctx.backbone.model, ctx.backbone
    n_max = max(options.n_last_blocks)
    if n_max > model.n_blocks:
        raise SystemExit(f"--n-last-blocks {n_max} but the backbone has {model.n_blocks} blocks")
    feature_fn = BlockFeatures(n_max)
    eval_transform = ctx.transform()
    train = load_dataset(data.train, eval_transform, "train")
    if isinstance(train, IterableDataset):
        raise SystemExit(
            f"--train-dataset {data.train!r} is a stream: the linear probe samples the train set by index, "
            "so it needs a map-style dataset (ImageFolder, CSV, Industrial, QuickDraw, ImageNet)"
        )
    class_names = class_names_of(train, data.task)
    common = ctx.extraction_options(data)

    all_train = np.arange(len(train))
    known = _labels_of(train, data.task)
    if known is not None:
        all_train = all_train[known[all_train] >= 0]
    val_dataset, val_indices = None, None
    if data.val:
        val_dataset = load_dataset(data.val, eval_transform, "val")
        check_same_classes(class_names, class_names_of(val_dataset, data.task), "val")
        train_indices = all_train
    else:
        groups = group_ids_for(train, torch.as_tensor(all_train))
        keep, held = split_train_val(len(all_train), options.val_fraction, options.seed, groups)
        train_indices, val_indices = all_train[keep], all_train[held]
        val_dataset = train
        logger.info(
            "no --val-dataset: holding out %d of %d train samples for selection", len(val_indices), len(all_train)
        )

    if options.feature_mode == "cached":
        cached = extract_features(
            model, train, feature_fn=feature_fn, indices=train_indices, desc="train features", **common
        ).labelled()
        source = CachedTrainSource(cached)
    else:
        train_aug = load_dataset(
            data.train,
            make_classification_train_transform(backbone.image_size, mean=backbone.mean, std=backbone.std)
            if augment
            else eval_transform,
            "train",
        )
        local = train_indices[_dist.get_rank() :: _dist.get_world_size()]
        source = OnlineTrainSource(
            model, train_aug, local, n_max, ctx.device, data.task, data.num_workers, ctx.autocast_dtype
        )

    evals = {
        "val": (
            val_dataset,
            extract_features(
                model, val_dataset, feature_fn=feature_fn, indices=val_indices, desc="val features", **common
            ).labelled(),
        )
    }
    if data.test:
        test_dataset = load_dataset(data.test, eval_transform, "test")
        check_same_classes(class_names, class_names_of(test_dataset, data.task), "test")
        evals["test"] = (
            test_dataset,
            extract_features(model, test_dataset, feature_fn=feature_fn, desc="test features", **common).labelled(),
        )
    num_classes = len(class_names) if class_names else _max_label(source, evals) + 1
    positive = resolve_positive_class(data.positive_class, class_names)

    configs = make_head_grid(
        options.learning_rates,
        options.n_last_blocks,
        {"both": (False, True), True: (True,), False: (False,)}[options.avgpool],
    )
    result = train_linear_grid(
        source,
        evals["val"][1],
        num_classes,
        configs,
        model.embed_dim,
        epochs=options.epochs,
        batch_size=options.train_batch_size,
        seed=options.seed,
        eval_period_iterations=options.eval_period_iterations,
        device=ctx.device,
    )
    best = configs[result.best_head]
    reports = {}
    for role, (dataset, features) in evals.items():
        probs = result.grid.probabilities(result.best_head, features)
        full_probs = _dist.all_gather_cat(probs)
        full_labels = _dist.all_gather_cat(features.labels)
        full_indices = _dist.all_gather_cat(features.indices)
        order = torch.argsort(full_indices)
        thresholds = youden_thresholds_of(reports["val"]) if role == "test" else None
        reports[role] = evaluation_report(
            as_numpy(full_labels[order]),
            as_numpy(full_probs[order]),
            class_names,
            group_ids_for(dataset, full_indices[order]),
            positive,
            thresholds,
        )

    results = {
        "method": "linear",
        "backbone": {
            "description": backbone.description,
            "weights": str(backbone.weights_path),
            "image_size": backbone.image_size,
        },
        "datasets": {
            "train": data.train,
            "val": data.val or f"{options.val_fraction:g} of train",
            "test": data.test,
            "task": data.task,
        },
        "settings": {
            "feature_mode": options.feature_mode,
            "augment": augment,
            "epochs": options.epochs,
            "batch_size": options.train_batch_size,
            "world_size": _dist.get_world_size(),
            "lr_scale": result.grid.lr_scale,
            "iterations": result.iterations,
            "seed": options.seed,
            "train_seconds": result.train_seconds,
        },
        "class_names": class_names,
        "best_head": {**asdict(best), "name": best.name, "val_top1": result.val_accuracy[result.best_head]},
        "heads": [{**asdict(c), "name": c.name, "val_top1": a} for c, a in zip(configs, result.val_accuracy)],
        "history": result.history,
        **reports,
    }
    if _dist.is_main_process():
        _write(ctx.output_dir, results, result.grid, class_names)
        track_results(ctx.output_dir, cfg, results, "linear")  # logging.tensorboard / logging.wandb
    _dist.barrier()
    return results


def _max_label(source, evals) -> int:
    local = [int(f.labels.max()) for _, f in evals.values() if len(f)]
    if isinstance(source, CachedTrainSource) and len(source):
        local.append(int(source.features.labels.max()))
    return int(_dist.all_gather_cat(torch.tensor([max(local)])).max())


def _write(output_dir, results: dict, grid: HeadGrid, class_names) -> None:
    from dinov2.hub.weights import save_state_dict

    best = results["best_head"]
    lines = [
        f"linear evaluation of {results['backbone']['description']} ({results['backbone']['weights']})",
        f"{len(results['heads'])} heads, {results['settings']['iterations']} iterations, {results['settings']['feature_mode']} features",
        f"best head on val: {best['name']} (val top-1 {100 * best['val_top1']:.2f}%)",
    ]
    for role in ("val", "test"):
        if role in results:
            lines.extend(summary_lines(role, results[role]))
    ranked = sorted(results["heads"], key=lambda h: -h["val_top1"])[:5]
    lines.append("top heads on val: " + ", ".join(f"{h['name']} {100 * h['val_top1']:.2f}%" for h in ranked))
    path = write_results(output_dir, results, lines)
    index = [h["name"] for h in results["heads"]].index(best["name"])
    save_state_dict(grid.head(index).state_dict(), output_dir / "best_linear_head.pth")
    role = "test" if "test" in results else "val"
    plot_confusion_matrix(
        results[role]["confusion_matrix"],
        output_dir / f"confusion_matrix_{role}.png",
        class_names,
        title=f"linear probe on {role}",
    )
    print("\n".join(lines))
    print(f"results written to {path}")


def main(argv: Optional[Iterable[str]] = None) -> int:
    from .config import parse_config

    cfg = parse_config("linear", get_args_parser(), argv)
    return _dist.run_then_destroy(run_linear, cfg)


if __name__ == "__main__":
    raise SystemExit(main())
