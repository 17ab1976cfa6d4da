"""The classifier training run: data, model and plan, the epoch loop, resume, exports.

See :mod:`dinov2.classify.train` (the command line) for the modes and the output directory.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from dinov2.data.image_io import SkipBadSamples
from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from dinov2.hub.sources import load_backbone
from dinov2.train.metrics import MetricsLogger
from dinov2.utils.config import save_config
from dinov2.utils.io import atomic_write_text

from .checkpoint import ClassifierConfig, save_classifier
from .data import build_datasets
from .device import select_device
from .epoch import train_one_epoch
from .evaluation import describe_validation, evaluate
from .feature_cache import FeatureDataset, cache_features
from .heads import HeadSpec, MultiHeadClassifier
from .lora import add_lora, has_lora, lora_settings, merge_lora, trainable_fraction
from .optimization import stage_optimizer, stage_schedule
from .resume import latest_resume_state, read_resume_state, set_aside_resume_states, write_resume_state
from .stages import Stage, plan_stages, set_trainable, stage_of
from .transforms import preprocessing_settings

logger = logging.getLogger("dinov2")

METRICS_FILE = "metrics.jsonl"  # one line per epoch, written by the core's MetricsLogger
SUMMARY_FILE = "summary.json"


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
            mean=d.mean or normalization.get("mean", IMAGENET_DEFAULT_MEAN),
            std=d.std or normalization.get("std", IMAGENET_DEFAULT_STD),
            interpolation=d.interpolation,
        )
        self.train_set, self.val_set, self.tasks = build_datasets(cfg, self.preprocessing)
        self.head_specs = [HeadSpec(t, tuple(c), cfg.heads.pooling) for t, c in self.tasks.items()]
        self.model = MultiHeadClassifier(backbone, self.head_specs, dropout=cfg.heads.dropout).to(self.device)
        self.stages = plan_stages(cfg)
        self.lora = (
            lora_settings(cfg.lpft.r, cfg.lpft.alpha, cfg.lpft.dropout, cfg.lpft.mlp)
            if cfg.optim.mode == "lpft"
            else None
        )
        # logging.tensorboard / logging.wandb: the epoch records also go to TensorBoard and W&B.
        self.metrics = MetricsLogger(
            self.output_dir,
            file_name=METRICS_FILE,
            step_key="epoch",
            describe=self._describe,
            tracking=cfg.get("logging"),
            run_config=OmegaConf.to_container(cfg, resolve=True),
            job_type="classify",
        )

    # -- set-up
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

    def _loader(self, dataset: Dataset, train: bool, epoch: int = 0) -> DataLoader:
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
            head_dropout=self.cfg.heads.dropout,
            lora=self.lora if with_lora else None,
            extra={"mode": self.cfg.optim.mode, "backbone_source": self.cfg.backbone.source},
        )

    def export(self, path: Path) -> Path:
        """Write a classifier file of the current weights (adapters merged unless told not to)."""
        model = self.model
        if has_lora(model) and self.cfg.lpft.merge_on_export:
            model = merge_lora(copy.deepcopy(model))
        return save_classifier(path, model, self.classifier_config(with_lora=has_lora(model)))

    def _configure_stage(self, stage: Stage):
        if stage.name == "lora" and not has_lora(self.model):
            # The adapters' random start from a seed of the stage: a run resumed at the stage
            # boundary draws the same ones as an uninterrupted run (the epoch loop reseeds after).
            torch.manual_seed(self.cfg.seed * 100_003 + 50_021 + stage.first_epoch)
            add_lora(self.model.backbone, self.lora)
            self.model.backbone.to(self.device)
        set_trainable(self.model, stage.name, self.cfg.optim.unfreeze_last_k)
        optimizer = stage_optimizer(self.model, stage, self.cfg)
        o = self.cfg.optim
        schedule = stage_schedule(stage, self.steps_per_epoch(), o.warmup_epochs, o.min_lr_ratio)
        params = trainable_fraction(self.model)
        logger.info(
            "classify: stage %s (epochs %d-%d): %d of %d parameters trainable (%.4f%%)",
            stage.name,
            stage.first_epoch + 1,
            stage.first_epoch + stage.epochs,
            params["trainable"],
            params["total"],
            100 * params["fraction"],
        )
        return optimizer, schedule, params

    def _resume(self) -> Optional[dict]:
        """Load the newest resume state into the model (adapters first, if it has them)."""
        if not self.cfg.checkpointing.resume:
            replaced = set_aside_resume_states(self.output_dir)
            if replaced is not None:
                logger.warning(
                    "classify: checkpointing.resume=false: the earlier run's resume states are now in %s", replaced
                )
            return None
        path = latest_resume_state(self.output_dir)
        if path is None:
            return None
        state = read_resume_state(path)
        if state.get("lora") is not None and not has_lora(self.model):
            add_lora(self.model.backbone, state["lora"])
        self.model.load_state_dict(state["model"], strict=True)
        self.model.to(self.device)
        logger.info("classify: resumed from %s after epoch %d", path, int(state["epoch"]))
        return state

    def _cache_features(self) -> None:
        started, d = time.time(), self.cfg.data

        def cached(dataset: Dataset, desc: str) -> FeatureDataset:
            return cache_features(
                self.model,
                dataset,
                self.device,
                self.cfg.optim.amp,
                d.eval_batch_size or d.batch_size,
                d.num_workers,
                desc,
            )

        self.train_set = cached(self.train_set, "train features")
        if self.val_set is not None:
            self.val_set = cached(self.val_set, "val features")
        logger.info("classify: cached backbone features in %.1f s", time.time() - started)

    def _describe(self, record: Dict) -> str:
        line = (
            f"classify: epoch {record['epoch']}/{self.cfg.optim.epochs} ({record['stage']}) "
            f"train loss {record['train'].get('loss', float('nan')):.4f}"
        )
        return f"{line}; validation {describe_validation(record['val'])}" if "val" in record else line

    # -- the loop
    def run(self) -> Dict[str, object]:
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.output_dir)
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.optim.amp == "fp16")
        state = self._resume()
        start_epoch = int(state["epoch"]) if state else 0
        best, best_epoch = (state["best_metric"], state["best_epoch"]) if state else (None, None)
        # Epochs after the resume state are trained again: their lines (and tracked points) go.
        self.metrics.start(start_epoch)
        if cfg.optim.cache_features and start_epoch < cfg.optim.epochs:
            self._cache_features()

        stage_params: Dict[str, dict] = {}
        stage, optimizer, schedule = None, None, None
        epoch_report: Dict[str, object] = {}
        for epoch in range(start_epoch, cfg.optim.epochs):
            current = stage_of(self.stages, epoch)
            if current != stage:
                stage = current
                optimizer, schedule, stage_params[stage.name] = self._configure_stage(stage)
                if state is not None and state.get("stage") == stage.name and epoch > stage.first_epoch:
                    optimizer.load_state_dict(state["optimizer"])
                    scaler.load_state_dict(state["scaler"])
            torch.manual_seed(cfg.seed * 100_003 + epoch)  # augmentations drawn in the main process
            batches = self._loader(self.train_set, train=True, epoch=epoch)
            epoch_report = train_one_epoch(
                self.model, batches, epoch, self.steps_per_epoch(), stage, optimizer, schedule, scaler, self.device, cfg
            )
            last_epoch = epoch + 1 == cfg.optim.epochs
            if self.val_set is not None and (last_epoch or (epoch + 1) % cfg.data.val_period_epochs == 0):
                val = evaluate(self.model, self._loader(self.val_set, train=False), self.device, cfg.optim.amp)
                epoch_report["val"] = val
                if val["mean_top1"] is not None and (best is None or val["mean_top1"] > best):
                    best, best_epoch = float(val["mean_top1"]), epoch + 1
                    self.export(self.output_dir / "model_best.pth")
            epoch_report["trainable_params"] = stage_params[stage.name]
            self.metrics.log(epoch_report)
            if last_epoch or (epoch + 1) % cfg.checkpointing.period_epochs == 0:
                resume_state = {
                    "epoch": epoch + 1,
                    "stage": stage.name,
                    "lora": self.lora if has_lora(self.model) else None,
                    "model": self.model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "best_metric": best,
                    "best_epoch": best_epoch,
                }
                write_resume_state(self.output_dir, resume_state, keep=cfg.checkpointing.keep_last)
        final_path = self.export(self.output_dir / "model_final.pth")
        summary = {
            "final": epoch_report.get("val") if epoch_report else None,
            "best_mean_top1": best,
            "best_epoch": best_epoch,
            "trainable_params": stage_params,
            "model_final": str(final_path),
            "model_best": str(self.output_dir / "model_best.pth") if best_epoch else None,
        }
        atomic_write_text(self.output_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
        self.metrics.close()
        return summary


def train_classifier(cfg: DictConfig) -> Dict[str, object]:
    """Train (or resume) a classifier as configured; returns the summary also written to disk."""
    return ClassifierTrainer(cfg).run()
