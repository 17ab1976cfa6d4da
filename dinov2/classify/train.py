"""Classifier training: linear probe, partial or full fine-tuning, and LP-FT with LoRA.

``python -m dinov2.classify.train [--config-file x.yaml] key=value ...`` (options:
:mod:`dinov2.classify.config`). Single process: one device, no torch.distributed.

Modes (``optim.mode``):

* ``probe``   - backbone frozen (and in eval mode), heads trained;
* ``partial`` - the last ``optim.unfreeze_last_k`` blocks and the final norm train with the heads;
* ``full``    - everything trains;
* ``lpft``    - stage 1 is a probe for ``lpft.probe_epochs`` epochs; stage 2 injects LoRA
  adapters into the attention (and with ``lpft.mlp`` the MLP) projections and trains adapters +
  heads for the remaining epochs.

Backbone parameters get ``optim.backbone_lr`` times ``layer_decay ** (depth + 1 - layer)``, heads
``optim.head_lr``; every stage has linear warm-up then cosine decay, stepped per iteration.

Output directory::

    config.yaml           merged options
    metrics.jsonl         one JSON object per epoch (losses, lr, validation accuracy per task)
    checkpoints/epoch_<n>.pth   resume states (weights, optimizer, scaler, best so far)
    model_best.pth        classifier file of the best validation epoch (mean top-1 over tasks)
    model_final.pth       classifier file after the last epoch
    summary.json          final and best validation metrics, trainable-parameter fractions

A run restarted with the same ``output_dir`` resumes from the newest resume state; each epoch
reseeds the data order and augmentations from ``(seed, epoch)``, so the resumed run continues the
same sequence.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from dinov2.data.image_io import SKIPPED_KEY, SkipBadSamples
from dinov2.eval.metrics import classification_metrics
from dinov2.hub.sources import load_backbone
from dinov2.optim.param_groups import param_multipliers
from dinov2.optim.schedules import CosineSchedule
from dinov2.utils.config import save_config
from dinov2.utils.io import atomic_torch_save

from .checkpoint import ClassifierConfig, read_resume_state, save_classifier
from .config import load_classify_config
from .data import make_task_dataset, split_indices, subsample
from .device import select_device
from .heads import HeadSpec, MultiHeadClassifier
from .lora import add_lora, has_lora, lora_settings, merge_lora, trainable_fraction
from .losses import MISSING_LABEL, multitask_loss
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, preprocessing_settings, train_transform

logger = logging.getLogger("dinov2")

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_RE = re.compile(r"^epoch_(\d+)\.pth$")


# ----------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Stage:
    name: str  # probe | partial | full | lora
    first_epoch: int
    epochs: int


def plan_stages(cfg: DictConfig) -> List[Stage]:
    mode, epochs = cfg.optim.mode, cfg.optim.epochs
    if mode != "lpft":
        return [Stage(mode, 0, epochs)]
    stages = []
    if cfg.lpft.probe_epochs:
        stages.append(Stage("probe", 0, cfg.lpft.probe_epochs))
    stages.append(Stage("lora", cfg.lpft.probe_epochs, epochs - cfg.lpft.probe_epochs))
    return stages


def stage_of(stages: Sequence[Stage], epoch: int) -> Stage:
    for stage in stages:
        if stage.first_epoch <= epoch < stage.first_epoch + stage.epochs:
            return stage
    raise IndexError(f"epoch {epoch} is outside the training plan")


def set_trainable(model: MultiHeadClassifier, stage: str, unfreeze_last_k: int = 0) -> None:
    """requires_grad for a stage: heads always; backbone all, last k blocks, adapters or none."""
    backbone = model.backbone
    for name, param in backbone.named_parameters():
        if stage == "full":
            param.requires_grad = True
        elif stage == "lora":
            param.requires_grad = "lora_" in name
        else:
            param.requires_grad = False
    if stage == "partial":
        blocks = getattr(backbone, "blocks", None)
        if blocks is None or not 0 < unfreeze_last_k <= len(blocks):
            raise ValueError(
                f"optim.unfreeze_last_k={unfreeze_last_k} but the backbone has "
                f"{'no blocks' if blocks is None else f'{len(blocks)} blocks'}"
            )
        for block in list(blocks)[-unfreeze_last_k:]:
            block.requires_grad_(True)
        norm = getattr(backbone, "norm", None)
        if norm is not None:
            norm.requires_grad_(True)
    for param in model.heads.parameters():
        param.requires_grad = True


def build_optimizer(
    model: MultiHeadClassifier, head_lr: float, backbone_lr: float, layer_decay: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over trainable parameters; each group remembers its peak lr as ``base_lr``."""
    blocks = getattr(model.backbone, "blocks", None)
    depth = len(blocks) if blocks is not None else 0
    groups: Dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("heads."):
            lr, wd = head_lr, (0.0 if param.ndim == 1 else weight_decay)
        else:
            # Same layer ids and no-decay rules as SSL training (names start with "backbone.").
            mult = param_multipliers(name, depth, layer_decay, patch_embed_lr_mult=1.0)
            lr, wd = backbone_lr * mult["lr_multiplier"], weight_decay * mult["wd_multiplier"]
        group = groups.setdefault((lr, wd), {"params": [], "lr": lr, "base_lr": lr, "weight_decay": wd})
        group["params"].append(param)
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    return torch.optim.AdamW(list(groups.values()), betas=(0.9, 0.999))


def autocast_context(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"optim.amp=fp16 needs a CUDA device (got {device.type}); use bf16")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class FeatureDataset(Dataset):
    """Pooled backbone features and their targets, stored once for a frozen-backbone probe."""

    def __init__(self, features: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor]):
        self.features, self.targets = features, targets
        self.length = len(next(iter(targets.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return (
            {k: v[index] for k, v in self.features.items()},
            {k: v[index] for k, v in self.targets.items()},
        )


@torch.no_grad()
def extract_features(model: MultiHeadClassifier, loader: DataLoader, device: torch.device, amp: str = "none") -> FeatureDataset:
    """Run the (frozen) backbone once over a loader; keep pooled features on the CPU."""
    model.eval()
    features: Dict[str, list] = {"cls": [], "mean": []}
    targets: Dict[str, list] = {t: [] for t in model.task_names}
    for batch in loader:
        if isinstance(batch, dict):  # an all-unreadable batch (skip policy)
            continue
        images, batch_targets = batch
        with autocast_context(device, amp):
            pooled = model.features(images.to(device, non_blocking=True))
        for key in features:
            features[key].append(pooled[key].float().cpu())
        for task in targets:
            targets[task].append(batch_targets[task])
    if not targets[model.task_names[0]]:
        raise ValueError("no readable images to extract features from")
    return FeatureDataset({k: torch.cat(v) for k, v in features.items()}, {t: torch.cat(v) for t, v in targets.items()})


def _forward(model: MultiHeadClassifier, inputs, device: torch.device) -> Dict[str, torch.Tensor]:
    """Logits from images, or from stored pooled features (a dict) when probing on cached features."""
    if isinstance(inputs, dict):
        return model.forward_from_features({k: v.to(device, non_blocking=True) for k, v in inputs.items()})
    return model(inputs.to(device, non_blocking=True))


def _move_targets(targets: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {task: t.to(device, non_blocking=True) for task, t in targets.items()}


@torch.no_grad()
def collect_probabilities(
    model: MultiHeadClassifier, loader: DataLoader, device: torch.device, amp: str = "none"
) -> tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """({task: (N, C) probabilities}, {task: (N,) labels, -1 = missing}) over a loader."""
    model.eval()
    probs: Dict[str, list] = {t: [] for t in model.task_names}
    labels: Dict[str, list] = {t: [] for t in model.task_names}
    for batch in loader:
        if isinstance(batch, dict):  # every sample of the batch was an unreadable image (skip policy)
            continue
        images, targets = batch
        with autocast_context(device, amp):
            logits = _forward(model, images, device)
        for task in model.task_names:
            probs[task].append(logits[task].float().softmax(dim=-1).cpu().numpy())
            labels[task].append(targets[task].numpy())
    return (
        {t: np.concatenate(p) if p else np.zeros((0, 0)) for t, p in probs.items()},
        {t: np.concatenate(l) if l else np.zeros((0,), dtype=np.int64) for t, l in labels.items()},
    )


def evaluate(
    model: MultiHeadClassifier, loader: DataLoader, device: torch.device, amp: str = "none"
) -> Dict[str, object]:
    """Per task: top-1 and balanced accuracy over the labelled samples; ``mean_top1`` over tasks."""
    probs, labels = collect_probabilities(model, loader, device, amp)
    report: Dict[str, object] = {"tasks": {}}
    top1s = []
    for spec in model.head_specs:
        valid = labels[spec.name] != MISSING_LABEL
        if not valid.any():
            report["tasks"][spec.name] = {"num_labelled": 0, "top1": None, "balanced_accuracy": None}
            continue
        metrics = classification_metrics(labels[spec.name][valid], probs[spec.name][valid], list(spec.classes))
        report["tasks"][spec.name] = {
            "num_labelled": int(valid.sum()),
            "top1": metrics["top1"],
            "balanced_accuracy": metrics["balanced_accuracy"],
        }
        top1s.append(metrics["top1"])
    report["mean_top1"] = float(np.mean(top1s)) if top1s else None
    return report


# ----------------------------------------------------------------------------- checkpoints
def latest_resume_state(output_dir: Path) -> Optional[Path]:
    directory = output_dir / CHECKPOINT_DIR
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), directory / n) for n in os.listdir(directory) if (m := _CHECKPOINT_RE.match(n))]
    return max(found)[1] if found else None


def _prune_resume_states(output_dir: Path, keep: int) -> None:
    directory = output_dir / CHECKPOINT_DIR
    found = sorted((int(m.group(1)), n) for n in os.listdir(directory) if (m := _CHECKPOINT_RE.match(n)))
    for _, name in found[: max(0, len(found) - max(keep, 1))]:
        (directory / name).unlink()


# ----------------------------------------------------------------------------- trainer
class ClassifierTrainer:
    """Holds the data, model and plan of one run; :meth:`run` trains and exports."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.device = select_device(cfg.device)
        torch.manual_seed(cfg.seed)
        backbone = self._build_backbone()
        d = cfg.data
        normalization = self.backbone_spec.get("normalization", {})
        self.preprocessing = preprocessing_settings(
            crop_size=d.crop_size,
            resize_size=d.resize_size,
            mean=d.mean or normalization.get("mean", IMAGENET_MEAN),
            std=d.std or normalization.get("std", IMAGENET_STD),
            interpolation=d.interpolation,
        )
        self._build_data()
        self.head_specs = [HeadSpec(t, tuple(c), cfg.heads.pooling) for t, c in self.tasks.items()]
        self.model = MultiHeadClassifier(backbone, self.head_specs, dropout=cfg.heads.dropout).to(self.device)
        self.stages = plan_stages(cfg)
        self.lora = (
            lora_settings(cfg.lpft.r, cfg.lpft.alpha, cfg.lpft.dropout, cfg.lpft.mlp) if cfg.optim.mode == "lpft" else None
        )

    # -- set-up
    def _build_data(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        eval_tf = eval_transform(self.preprocessing)
        if cfg.optim.cache_features:  # features are computed once, so without augmentation
            train_tf = eval_tf
        else:
            train_tf = train_transform(self.preprocessing, min_scale=d.min_scale, hflip=d.hflip)
        wanted = list(cfg.heads.tasks) if cfg.heads.tasks else None
        single = cfg.heads.single_task_name
        train_set, self.tasks = make_task_dataset(d.train, train_tf, wanted=wanted, single_task_name=single)
        val_set = None
        if d.val:
            val_set, _ = make_task_dataset(d.val, eval_tf, tasks=self.tasks, single_task_name=single)
        elif d.val_fraction > 0:
            # Two views of the same files: augmented for training, plain for validation.
            plain, _ = make_task_dataset(d.train, eval_tf, tasks=self.tasks, single_task_name=single)
            train_idx, val_idx = split_indices(len(train_set), d.val_fraction, cfg.seed)
            train_set, val_set = Subset(train_set, train_idx.tolist()), Subset(plain, val_idx.tolist())
        self.train_set = subsample(train_set, d.max_train_samples, cfg.seed)
        self.val_set = subsample(val_set, d.max_val_samples, cfg.seed + 1) if val_set is not None else None
        if len(self.train_set) == 0:
            raise ValueError(f"training set {d.train} is empty")
        logger.info(
            "classify: %d training and %s validation images; tasks %s",
            len(self.train_set),
            len(self.val_set) if self.val_set is not None else "no",
            {t: len(c) for t, c in self.tasks.items()},
        )

    def _build_backbone(self):
        b, cfg = self.cfg.backbone, self.cfg
        backbone, self.backbone_spec = load_backbone(
            b.source,
            weights=b.weights,
            arch=b.arch,
            num_heads=b.num_heads,
            drop_path_rate=b.drop_path_rate,
            patch_size=b.patch_size,
            img_size=b.img_size or cfg.data.crop_size,
            embed_dim=b.embed_dim,
            depth=b.depth,
            num_register_tokens=b.num_register_tokens,
        )
        return backbone

    def _loader(self, dataset, train: bool, epoch: int = 0) -> DataLoader:
        d = self.cfg.data
        generator = torch.Generator()
        generator.manual_seed(self.cfg.seed * 100_003 + epoch)
        return DataLoader(
            dataset,
            batch_size=d.batch_size if train else (d.eval_batch_size or d.batch_size),
            shuffle=train,
            num_workers=0 if isinstance(dataset, FeatureDataset) else d.num_workers,
            collate_fn=SkipBadSamples(),
            generator=generator,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def steps_per_epoch(self) -> int:
        batches = math.ceil(len(self.train_set) / self.cfg.data.batch_size)
        cap = self.cfg.optim.max_steps_per_epoch
        return min(batches, cap) if cap else batches

    def classifier_config(self, with_lora: bool) -> ClassifierConfig:
        return ClassifierConfig(
            backbone=self.backbone_spec,
            heads=self.head_specs,
            preprocessing=self.preprocessing,
            head_dropout=float(self.cfg.heads.dropout),
            lora=self.lora if with_lora else None,
            extra={"mode": self.cfg.optim.mode, "backbone_source": str(self.cfg.backbone.source)},
        )

    def export(self, path: Path) -> Path:
        """Write a classifier file of the current weights (adapters merged unless told not to)."""
        model = self.model
        if has_lora(model) and self.cfg.lpft.merge_on_export:
            model = merge_lora(copy.deepcopy(model))
        return save_classifier(path, model, self.classifier_config(with_lora=has_lora(model)))

    def _configure_stage(self, stage: Stage):
        o = self.cfg.optim
        if stage.name == "lora" and not has_lora(self.model):
            add_lora(self.model.backbone, self.lora)
            self.model.backbone.to(self.device)
        set_trainable(self.model, stage.name, o.unfreeze_last_k)
        if stage.name == "lora":
            head_lr = self.cfg.lpft.head_lr if self.cfg.lpft.head_lr is not None else o.head_lr / 10
            optimizer = build_optimizer(self.model, head_lr, self.cfg.lpft.lr, o.layer_decay, o.weight_decay)
        else:
            optimizer = build_optimizer(self.model, o.head_lr, o.backbone_lr, o.layer_decay, o.weight_decay)
        total = stage.epochs * self.steps_per_epoch()
        warmup = min(int(round(o.warmup_epochs * self.steps_per_epoch())), total)
        schedule = CosineSchedule(base_value=1.0, final_value=o.min_lr_ratio, total_iters=total, warmup_iters=warmup)
        params = trainable_fraction(self.model)
        logger.info(
            "classify: stage %s (epochs %d-%d): %d of %d parameters trainable (%.4f%%)",
            stage.name, stage.first_epoch + 1, stage.first_epoch + stage.epochs,
            params["trainable"], params["total"], 100 * params["fraction"],
        )
        return optimizer, schedule, params

    # -- the loop
    def run(self) -> Dict[str, object]:
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.output_dir)
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.optim.amp == "fp16")
        start_epoch, best, best_epoch, state = 0, None, None, None
        resume_path = latest_resume_state(self.output_dir) if cfg.checkpoint.resume else None
        if resume_path is not None:
            state = read_resume_state(resume_path)
            if state.get("lora") is not None and not has_lora(self.model):
                add_lora(self.model.backbone, state["lora"])
            self.model.load_state_dict(state["model"], strict=True)
            self.model.to(self.device)
            start_epoch, best, best_epoch = int(state["epoch"]), state["best_metric"], state["best_epoch"]
            logger.info("classify: resumed from %s after epoch %d", resume_path, start_epoch)
        if cfg.optim.cache_features and start_epoch < cfg.optim.epochs:
            started = time.time()
            self.train_set = extract_features(self.model, self._loader(self.train_set, train=False), self.device, cfg.optim.amp)
            if self.val_set is not None:
                self.val_set = extract_features(self.model, self._loader(self.val_set, train=False), self.device, cfg.optim.amp)
            logger.info("classify: cached backbone features in %.1f s", time.time() - started)

        stage_params: Dict[str, dict] = {}
        stage, optimizer, schedule = None, None, None
        history = []
        epoch_report: Dict[str, object] = {}
        for epoch in range(start_epoch, cfg.optim.epochs):
            current = stage_of(self.stages, epoch)
            if current != stage:
                stage = current
                optimizer, schedule, stage_params[stage.name] = self._configure_stage(stage)
                if state is not None and state.get("stage") == stage.name and epoch > stage.first_epoch:
                    optimizer.load_state_dict(state["optimizer"])
                    scaler.load_state_dict(state["scaler"])
            epoch_report = self._train_epoch(epoch, stage, optimizer, schedule, scaler)
            if self.val_set is not None:
                val = evaluate(self.model, self._loader(self.val_set, train=False), self.device, cfg.optim.amp)
                epoch_report["val"] = val
                if val["mean_top1"] is not None and (best is None or val["mean_top1"] > best):
                    best, best_epoch = float(val["mean_top1"]), epoch + 1
                    self.export(self.output_dir / "model_best.pth")
                logger.info("classify: epoch %d validation %s", epoch + 1, _short(val))
            epoch_report["trainable_params"] = stage_params[stage.name]
            history.append(epoch_report)
            _append_jsonl(self.output_dir / "metrics.jsonl", epoch_report)
            last = epoch + 1 == cfg.optim.epochs
            if last or (epoch + 1) % cfg.checkpoint.every_epochs == 0:
                atomic_torch_save(
                    {
                        "epoch": epoch + 1,
                        "stage": stage.name,
                        "lora": self.lora if has_lora(self.model) else None,
                        "model": self.model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "best_metric": best,
                        "best_epoch": best_epoch,
                    },
                    self.output_dir / CHECKPOINT_DIR / f"epoch_{epoch + 1:04d}.pth",
                )
                _prune_resume_states(self.output_dir, cfg.checkpoint.keep)
        final_path = self.export(self.output_dir / "model_final.pth")
        summary = {
            "final": epoch_report.get("val") if epoch_report else None,
            "best_mean_top1": best,
            "best_epoch": best_epoch,
            "trainable_params": stage_params,
            "model_final": str(final_path),
            "model_best": str(self.output_dir / "model_best.pth") if best_epoch else None,
        }
        tmp = self.output_dir / f".summary.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        os.replace(tmp, self.output_dir / "summary.json")
        return summary

    def _train_epoch(self, epoch, stage, optimizer, schedule, scaler) -> Dict[str, object]:
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # augmentations drawn in the main process
        self.model.train()
        if self.model.backbone_is_frozen():
            self.model.backbone.eval()  # no dropout / stochastic depth in a frozen feature extractor
        steps = self.steps_per_epoch()
        weights = dict(cfg.heads.loss_weights)
        totals: Dict[str, float] = {}
        count, skipped, started = 0, 0, time.time()
        for i, batch in enumerate(self._loader(self.train_set, train=True, epoch=epoch)):
            if i >= steps:
                break
            if isinstance(batch, dict):  # all images of this batch were unreadable and skipped
                skipped += batch[SKIPPED_KEY]
                continue
            images, targets = batch
            step = (epoch - stage.first_epoch) * steps + i
            factor = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            with autocast_context(self.device, cfg.optim.amp):
                logits = _forward(self.model, images, self.device)
            loss, per_task = multitask_loss(
                logits, _move_targets(targets, self.device), weights, label_smoothing=cfg.optim.label_smoothing
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {i}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip
                )
            scaler.step(optimizer)
            scaler.update()
            count += 1
            totals["loss"] = totals.get("loss", 0.0) + loss.item()
            for task, value in per_task.items():
                totals[f"loss_{task}"] = totals.get(f"loss_{task}", 0.0) + value.item()
            if cfg.log_every and (i + 1) % cfg.log_every == 0:
                logger.info("classify: epoch %d step %d/%d loss %.4f", epoch + 1, i + 1, steps, loss.item())
        report = {
            "epoch": epoch + 1,
            "stage": stage.name,
            "steps": count,
            "lr_factor": schedule(max(0, (epoch - stage.first_epoch + 1) * steps - 1)),
            "seconds": round(time.time() - started, 2),
            "train": {k: v / max(count, 1) for k, v in totals.items()},
        }
        if skipped:
            report["skipped_images"] = skipped
        logger.info("classify: epoch %d/%d (%s) train loss %.4f", epoch + 1, cfg.optim.epochs, stage.name,
                    report["train"].get("loss", float("nan")))
        return report


def _short(val: Dict[str, object]) -> str:
    tasks = {t: (round(m["top1"], 4) if m["top1"] is not None else None) for t, m in val["tasks"].items()}
    return f"mean top-1 {val['mean_top1']}, per task {tasks}"


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train_classifier(cfg: DictConfig) -> Dict[str, object]:
    """Train (or resume) a classifier as configured; returns the summary also written to disk."""
    return ClassifierTrainer(cfg).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train classification heads on a DINOv2 backbone (probe, fine-tuning, LP-FT with LoRA).",
        epilog="Options are key=value overrides, e.g. output_dir=out data.train=CSV:path=labels.csv optim.mode=lpft",
    )
    parser.add_argument("--config-file", default=None, help="YAML file with options (see docs/classify.md)")
    parser.add_argument("overrides", nargs="*", help="key=value options applied after the file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_classify_config(args.config_file, args.overrides)
    summary = train_classifier(cfg)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
