"""The SSL training loop.

:class:`SSLTrainer` builds everything from a config and exposes it as attributes, so launchers and
tests can reach in:

* ``model`` (:class:`SSLMetaArch`), ``optimizer`` (AdamW), ``schedules``, ``scaler`` (fp16 only);
* ``roster`` (:class:`~dinov2.train.students.StudentRoster`: this rank's students, ``units``);
* ``loader`` (a :class:`~dinov2.data.loaders.ResumableDataLoader`), ``dataset``;
* ``checkpointer`` (:class:`~dinov2.checkpoint.CheckpointManager`), ``metrics``, ``knn_monitor``;
* ``iteration`` (completed optimizer iterations), ``max_iterations``.

One iteration: set lr / wd from the schedules -> ``forward_backward`` -> (replicated multi-rank
runs: average gradients) -> mean loss terms over ranks, stop on non-finite values -> clip
gradients -> zero the prototype gradients while frozen -> optimizer step -> EMA teacher update.
Then, by period: k-NN monitor, metrics line, teacher export, checkpoint. Distillation students
on subsets of ranks (``distillation.students[].ranks``) are trained, reduced, clipped, monitored
and exported over their own ranks; their figures are gathered so every rank takes the same
decisions and rank 0 logs them all.

Non-finite steps guard what is written: while any step since the previous checkpoint boundary
(written or skipped) was non-finite, teacher exports and checkpoints write nothing, so a run that
blows up cannot replace a good state by a damaged one, and one that recovers writes again after
its next clean checkpoint window. The newest checkpoint written before the latest non-finite step
is protected from retention (its iteration travels in the checkpoint's ``extra`` state, so a
resumed run protects it too).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from dinov2 import distributed
from dinov2.checkpoint import CheckpointManager, ModelOptimizerState, RNGState, seed_all
from dinov2.checkpoint.manager import checkpoint_keys, checkpoint_name, validate_checkpoint
from dinov2.fsdp import mixed_precision_policy, shard_backbone, shard_ssl_meta_arch
from dinov2.optim import (
    apply_optim_scheduler,
    clip_student_gradients,
    scaled_learning_rate,
)
from dinov2.train.compile import compile_for_training
from dinov2.train.data import build_train_data_loader
from dinov2.train.distill_meta_arch import DistillMetaArch
from dinov2.train.export import LATEST_EXPORT_NAME, export_path, export_teacher_backbone
from dinov2.train.gram_teacher import build_gram_teacher
from dinov2.train.knn_monitor import KnnMonitor
from dinov2.train.metrics import MetricsLogger, WindowAverager
from dinov2.train.pca_preview import PCA_IMAGE_TAG, PcaPreview
from dinov2.train.ssl_meta_arch import PRECISIONS, SSLMetaArch
from dinov2.train.students import StudentRoster, TrainedStudent
from dinov2.utils.config import save_config

logger = logging.getLogger("dinov2")

__all__ = ["NonFiniteLossError", "SSLTrainer", "TrainedStudent"]  # TrainedStudent lives in dinov2.train.students


class NonFiniteLossError(RuntimeError):
    """Too many consecutive iterations with a non-finite loss term or gradient norm."""


class DataExhaustedError(RuntimeError):
    """The training data ended before the last iteration (a stream that does not repeat)."""


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def _all_reduce_gradients(module: torch.nn.Module, group=None) -> None:
    """Average gradients over the ranks of ``group`` (None: all; multi-rank runs without FSDP: a
    replicated student)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    distributed.all_reduce_mean(flat, group=group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _as_float(value) -> float:
    full_tensor = getattr(value, "full_tensor", None)
    if full_tensor is not None:
        value = full_tensor()
    return float(value)


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _warn_if_bf16_is_emulated(param_dtype: str, device: torch.device) -> None:
    # Without AVX512-BF16 or AMX, bf16 matmuls are emulated: 1024^3 products took 80x the fp32
    # time on an AVX2-only AMD EPYC (7.8 s vs 0.09 s), so a bf16 recipe step took 12.9 s, not 0.18 s.
    if device.type == "cpu" and param_dtype == "bf16" and not cpu_has_bf16_matmul():
        logger.warning(
            "compute_precision.param_dtype=bf16 on a CPU without AVX512-BF16 or AMX (capability %s): bf16 "
            "matmuls are emulated there, tens of times slower than fp32; set compute_precision.param_dtype=fp32",
            torch.backends.cpu.get_cpu_capability(),
        )


class SSLTrainer:
    def __init__(
        self,
        cfg: DictConfig,
        output_dir=None,
        dataset: Optional[Dataset] = None,
        device: Optional[torch.device] = None,
    ):
        """Build model, optimizer, schedules and data for ``cfg`` (``config.yaml`` is written by
        :meth:`resume`, once it is known that the run's checkpoint fits this config).

        Args:
            output_dir: overrides ``train.output_dir``.
            dataset: a map-style dataset used instead of ``train.dataset_path`` (without transform).
            device: defaults to ``dinov2.distributed.get_device()`` (CUDA when available).
        """
        self.cfg = cfg
        distributed.enable(cfg.distributed.backend)
        self.rank = distributed.get_rank()
        self.world_size = distributed.get_world_size()
        self.is_main = distributed.is_main_process()
        self.device = device if device is not None else distributed.get_device()
        # Derived values live here, not in cfg (read-only as loaded): config.yaml records the
        # config as given, with train.output_dir set to where the run was written.
        self.output_dir = Path(output_dir if output_dir is not None else cfg.train.output_dir)

        self.global_batch_size = int(cfg.train.batch_size_per_gpu) * self.world_size
        self.lr = scaled_learning_rate(float(cfg.optim.base_lr), self.global_batch_size, cfg.optim.scaling_rule)
        logger.info(
            "rank %d/%d on %s; global batch %d, lr %.3g",
            self.rank,
            self.world_size,
            self.device,
            self.global_batch_size,
            self.lr,
        )

        # The same seed on every rank for the weights (ranks must start identical), then a
        # per-rank seed for everything random during training (stochastic depth).
        self.seed = int(cfg.train.seed)
        seed_all(self.seed, 0, 0)
        # distillation.enabled: the same loop trains students on a frozen teacher (docs/distillation.md).
        self.distill = bool(cfg.distillation.enabled)
        self.model = (DistillMetaArch if self.distill else SSLMetaArch)(cfg).to(self.device)
        self.model.train()
        # Gram anchoring: a frozen copy of the teacher (or a file's backbone), sharded like the teacher.
        self.gram_teacher = build_gram_teacher(cfg, self.model.teacher_backbone())
        # train.compile: every block compiled before FSDP2 makes it a unit (False where it fell back).
        self.compiled = compile_for_training(cfg, [self.model, self.gram_teacher], self.device)
        seed_all(self.seed, self.rank, 0)
        self.fsdp = self._shard_model()
        # This rank's students (distillation.students[].ranks may give it only some of them).
        self.roster = StudentRoster(self.model, cfg, self.output_dir, self.distill, self.lr)
        self.units: List[TrainedStudent] = self.roster.units
        # The first student's optimizer and schedules (pretraining's only ones).
        self.optimizer, self.schedules = self.units[0].optimizer, self.units[0].schedules
        self.max_iterations = int(cfg.train.max_iterations or self.roster.total_iterations)
        if self.roster.several and self.max_iterations > self.roster.total_iterations:
            # Each student stops at the end of its own schedule: past the longest, none would train.
            raise ValueError(
                f"train.max_iterations={self.max_iterations} is past the end of every student's schedule "
                f"(the longest has {self.roster.total_iterations} iterations); lower it or leave it unset"
            )
        _warn_if_bf16_is_emulated(cfg.compute_precision.param_dtype, self.device)
        self.scaler = None
        if cfg.compute_precision.param_dtype == "fp16" and cfg.compute_precision.grad_scaler:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.clip_grad = float(cfg.optim.clip_grad)
        self.max_nonfinite_steps = int(cfg.train.max_nonfinite_steps)
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"train.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")

        patch_size = self.model.student["backbone"].patch_size
        # Pinned batches on CUDA: _to_device's non_blocking copies then overlap the previous step.
        self.loader, self.dataset = build_train_data_loader(
            cfg, patch_size, self.rank, self.world_size, dataset=dataset, pin_memory=self.device.type == "cuda"
        )
        self.knn_monitor = KnnMonitor(cfg, self.device, dataset_override=dataset)
        self.checkpointer = CheckpointManager(
            self.output_dir / "checkpoints",
            keep_last=int(cfg.checkpointing.keep_last),
            keep_every=int(cfg.checkpointing.keep_every),
        )
        self.checkpoint_period = int(cfg.checkpointing.period_iterations)
        self.export_period = int(cfg.evaluation.export_period_iterations)
        self.log_period = max(int(cfg.logging.log_period_iterations), 1)
        # logging.tensorboard / logging.wandb: the same records to TensorBoard and W&B (rank 0).
        self.metrics = MetricsLogger(
            self.output_dir,
            enabled=self.is_main,
            tracking=cfg.logging,
            run_config=OmegaConf.to_container(cfg, resolve=True),
        )
        self.pca_preview = PcaPreview(cfg, self.device, dataset_override=dataset)
        self.rng_state = RNGState(self.seed)
        self.iteration = 0
        self.nonfinite_streak = 0
        self.resumed_from: Optional[Path] = None
        self._stop_requested = False
        self._last_checkpoint_iteration = -1
        self._last_export_iteration = -1
        # Non-finite steps since the previous checkpoint boundary (written or skipped).
        self._nonfinite_since_checkpoint = 0
        # The newest checkpoint written before the latest non-finite step: retention keeps it.
        self.protected_checkpoint: Optional[int] = None

    # ------------------------------------------------------------------ set-up
    def _shard_model(self) -> bool:
        if self.world_size == 1:
            return False
        if not self.cfg.distributed.fsdp:
            logger.info("distributed.fsdp=false: replicated student, gradients averaged over ranks")
            return False
        if self.distill:
            self.model.shard(self.cfg)
        else:
            shard_ssl_meta_arch(self.model, self.cfg)
        if self.gram_teacher is not None:
            precision = self.cfg.compute_precision
            policy = mixed_precision_policy(precision.teacher_dtype, precision.reduce_dtype)
            shard_backbone(self.gram_teacher.backbone, policy, reshard_after_forward=True)  # no backward: see fsdp
        return True

    # -------------------------------------------------------------- checkpoint
    def checkpoint_state(self) -> Dict[str, Any]:
        """The ``app_state`` given to :class:`CheckpointManager`:

        * ``train``: model (student, teacher, loss centres) and optimizer, by parameter names;
        * ``extra``: ``iteration``, ``nonfinite_streak``, ``protected_checkpoint`` (the iteration
          retention keeps, -1 for none) and ``sampler`` (global samples consumed);
        * ``rng``: each rank's torch / numpy / random (/ CUDA) states;
        * ``scaler``: the fp16 GradScaler, when used;
        * ``gram`` / ``gram_state``: the Gram teacher's weights (taken from this run) and its update
          count, source and checksum, with ``gram.use_loss`` (see :mod:`dinov2.train.gram_teacher`).
        """
        extra: Dict[str, Any] = {
            "iteration": self.iteration,
            "nonfinite_streak": self.nonfinite_streak,
            "protected_checkpoint": -1 if self.protected_checkpoint is None else self.protected_checkpoint,
        }
        if self.loader.resumable:  # an infinite sampler or a WebDataset stream
            extra["sampler"] = self.loader.state_dict()
        if self.distill:
            # The frozen teacher is referenced, never stored: its path and SHA-256, checked on resume.
            extra.update(self.model.teacher_reference.checkpoint_entries())
        optimizers = self.optimizer if len(self.units) == 1 else [unit.optimizer for unit in self.units]
        state: Dict[str, Any] = {
            "train": ModelOptimizerState(
                self.model,
                optimizers,
                owned_modules=self.roster.owned_checkpoint_modules(),
                param_group_indices=self.roster.param_group_indices,
            ),
            "extra": extra,
            "rng": self.rng_state,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler
        if self.gram_teacher is not None:
            state.update(self.gram_teacher.checkpoint_entries())
        return state

    def _check_finite_state(self) -> None:
        """Refuse to checkpoint non-finite weights, on every rank: each checks its own shards, and
        all agree before the collective save (a rank raising alone would leave the others in it)."""
        bad = None
        for name, tensor in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if not torch.isfinite(local).all():
                bad = name
                break
        found = [(rank, name) for rank, name in enumerate(distributed.all_gather_object(bad)) if name is not None]
        if found:
            rank, name = found[0]
            where = f" (rank {rank}'s shard)" if distributed.get_world_size() > 1 else ""
            raise NonFiniteLossError(f"refusing to checkpoint: {name}{where} holds non-finite values")

    def save_checkpoint(self) -> Path:
        """Write ``ckpt_<iteration>`` (refused if a parameter or buffer is non-finite); retention
        keeps :attr:`protected_checkpoint`."""
        self._check_finite_state()
        protect = () if self.protected_checkpoint is None else (self.protected_checkpoint,)
        path = self.checkpointer.save(self.iteration, self.checkpoint_state(), protect=protect)
        self._last_checkpoint_iteration = self.iteration
        return path

    def last_checkpoint_path(self) -> Optional[Path]:
        """The newest checkpoint this run wrote or resumed from (None before the first one)."""
        if self._last_checkpoint_iteration < 0:
            return None
        return self.checkpointer.directory / checkpoint_name(self._last_checkpoint_iteration)

    def describe_last_checkpoint(self) -> str:
        """Where a rerun resumes from, checked on disk (for messages after non-finite steps)."""
        path = self.last_checkpoint_path()
        if path is None:
            return (
                f"no checkpoint has been written to {self.checkpointer.directory} yet (a rerun starts from iteration 0)"
            )
        problem = validate_checkpoint(path)
        if problem:
            return f"the last checkpoint written, {path}, is not usable: {problem}"
        return f"the last checkpoint, {path}, was written before these non-finite steps and is intact"

    def resume(self) -> bool:
        """Load the newest complete checkpoint of ``output_dir/checkpoints``; False if none.

        Without one, ``train.init_from_checkpoint`` (a training checkpoint directory) initialises the model
        only (a fresh run from those weights). Then metrics lines past the resumed iteration
        (all of them on a fresh start: a killed attempt's) are dropped and ``config.yaml`` is
        written; a failed load leaves both files as they were.
        """
        path = self.checkpointer.latest()
        if path is None:
            init_from = self.cfg.train.init_from_checkpoint
            if init_from:
                owned = self.roster.owned_checkpoint_modules()
                self.roster.refuse_unlisted_students(
                    init_from, checkpoint_keys(init_from), "initialise from a checkpoint without them"
                )
                self.checkpointer.load(init_from, {"train": ModelOptimizerState(self.model, owned_modules=owned)})
                logger.info("model initialised from training checkpoint %s (train.init_from_checkpoint)", init_from)
            self._record_start()
            return False
        state = self.checkpoint_state()
        keys = checkpoint_keys(path)
        if "extra.protected_checkpoint" not in keys:
            del state["extra"]["protected_checkpoint"]  # written before retention protection existed
        if self.gram_teacher is not None and "gram_state.source" not in keys:
            raise ValueError(
                f"gram.use_loss is on but checkpoint {path} was written without Gram anchoring; start the Gram "
                f"phase as a new run (another output directory) with train.init_from_checkpoint={path}"
            )
        if self.distill and "extra.distill_teacher_sha256" not in keys:
            raise ValueError(
                f"distillation.enabled is on but checkpoint {path} was not written by a distillation run; "
                "use another output directory (student.pretrained_weights starts a student from a backbone file)"
            )
        self.roster.refuse_unlisted_students(path, keys, "start a new run in another output directory")
        self.checkpointer.load(path, state)
        if self.gram_teacher is not None:
            self.gram_teacher.restore(state["gram_state"], path)
        extra = state["extra"]
        if self.distill:
            self.model.teacher_reference.verify(extra, path)
        self.iteration = int(extra["iteration"])
        self.nonfinite_streak = int(extra["nonfinite_streak"])
        protected = int(extra.get("protected_checkpoint", -1))
        self.protected_checkpoint = None if protected < 0 else protected
        if "sampler" in extra:
            self.loader.load_state_dict(extra["sampler"])
        self._last_checkpoint_iteration = self.iteration
        self.resumed_from = path
        self._record_start()
        logger.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    def _record_start(self) -> None:
        """The run's files once its starting point is known: metrics lines of iterations that
        will be redone are dropped (a killed attempt's, before or after its last checkpoint), and
        ``config.yaml`` describes the run from here on."""
        self.metrics.start(self.iteration)  # also opens TensorBoard / W&B from this iteration on
        if self.is_main:
            save_config(OmegaConf.merge(self.cfg, {"train": {"output_dir": str(self.output_dir)}}), self.output_dir)
            for unit_cfg, unit_dir in self.roster.configs_with_own_folder():  # several students: for evaluation
                save_config(OmegaConf.merge(unit_cfg, {"train": {"output_dir": str(unit_dir)}}), unit_dir)

    # -------------------------------------------------------------------- stop
    def request_stop(self) -> None:
        """Ask the loop to checkpoint and return after the current iteration (signal handlers)."""
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        if distributed.is_enabled():
            return distributed.any_rank(self._stop_requested, self.device)
        return self._stop_requested

    # -------------------------------------------------------------------- step
    def train_step(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """One optimizer iteration at ``self.iteration`` (which it does not advance).

        Returns ``{"losses": {term: float}, "finite": bool, "bad_terms": [...], "grad_norm": float|None}``
        with loss terms averaged over ranks.
        """
        it = self.iteration
        units = self.roster.active(it)
        unit_values = self.roster.scheduled_values(it)
        for unit in units:
            scheduled = unit_values[unit.name]
            apply_optim_scheduler(unit.optimizer, scheduled["lr"], scheduled["wd"], scheduled["last_layer_lr"])
            unit.optimizer.zero_grad(set_to_none=True)
        values = dict(next(iter(unit_values.values())))
        if self.roster.several:
            values.update({f"{name}/{key}": value for name, v in unit_values.items() for key, value in v.items()})
        teacher_temp = values["teacher_temp"]
        if self.distill:
            teacher_temp = {unit.name: unit_values[unit.name]["teacher_temp"] for unit in units}
        data = _to_device(batch, self.device)
        gram_targets = None
        if self.gram_teacher is not None:
            self.gram_teacher.maybe_update(it, self.model.teacher_backbone())
            if self.gram_teacher.active(it):
                gram_targets = self.model.gram_targets(self.gram_teacher, data["collated_global_crops"])
        losses = self.model.forward_backward(
            data, teacher_temp=teacher_temp, scaler=self.scaler, gram_targets=gram_targets
        )
        if self.world_size > 1 and not self.fsdp:
            for unit in units:
                _all_reduce_gradients(unit.arch.student, self.roster.group(unit))

        if self.roster.rank_subsets:
            loss_values = self.roster.means_over_ranks({name: float(value) for name, value in losses.items()})
        else:
            names = list(losses)
            stacked = torch.stack([losses[name].float().reshape(()) for name in names])
            distributed.all_reduce_mean(stacked)  # one collective; NaN on any rank is NaN everywhere
            loss_values = dict(zip(names, stacked.tolist()))
        bad = [name for name, value in loss_values.items() if not math.isfinite(value)]

        grad_norm = None
        if not bad:
            if self.scaler is not None:
                for unit in units:
                    self.scaler.unscale_(unit.optimizer)
            if self.clip_grad > 0:
                # Under FSDP2 each student's norm spans the shards of its own ranks (its DeviceMesh).
                norms = {
                    unit.name: _as_float(
                        clip_student_gradients(unit.arch.student, self.clip_grad, self.cfg.optim.clip_grad_scope)
                    )
                    for unit in units
                }
                if self.roster.rank_subsets:  # every student's norm on every rank: the same step decision everywhere
                    norms = self.roster.means_over_ranks(norms)
                norms = list(norms.values())
                grad_norm = norms[0] if len(norms) == 1 else math.sqrt(sum(norm * norm for norm in norms))
                if not math.isfinite(grad_norm) and self.scaler is None:
                    bad.append("grad_norm")

        if bad:
            # Skip the step: parameters, optimizer moments and loss centres stay as they were.
            self.model.revert_centers()
            for unit in units:
                unit.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_streak += 1
            # The next checkpoint and export boundaries write nothing; no checkpoint has been
            # written since this window began, so the last one predates the trouble: keep it.
            self._nonfinite_since_checkpoint += 1
            if self._last_checkpoint_iteration >= 0:
                self.protected_checkpoint = self._last_checkpoint_iteration
            described = ", ".join(f"{name}={loss_values.get(name, grad_norm)}" for name in bad)
            logger.warning(
                "iteration %d: non-finite %s; step skipped (%d in a row)", it + 1, described, self.nonfinite_streak
            )
            if self.nonfinite_streak >= self.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_streak} consecutive iterations with non-finite values (last at iteration "
                    f"{it + 1}: {described}); stopping without a checkpoint or export. "
                    f"{_sentence(self.describe_last_checkpoint())}. Lower optim.base_lr, raise "
                    "teacher.warmup_teacher_temp_epochs or check the data, then rerun the same command"
                )
            return {
                "losses": loss_values,
                "finite": False,
                "bad_terms": bad,
                "grad_norm": grad_norm,
                "schedules": values,
            }

        for unit in units:
            if unit.schedules.last_layer_frozen(it):
                unit.arch.zero_last_layer_grads()
            if self.scaler is not None:
                self.scaler.step(unit.optimizer)
            else:
                unit.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        for unit in units:
            unit.arch.update_teacher(unit_values[unit.name]["momentum"])
        self.nonfinite_streak = 0
        # A non-finite norm under the fp16 GradScaler is its overflow: the scaler skipped the
        # optimizer step and lowered the scale (the teacher followed the unchanged student). The
        # step is counted apart, not averaged into the logged gradient norm.
        overflow = grad_norm is not None and not math.isfinite(grad_norm)
        return {
            "losses": loss_values,
            "finite": True,
            "bad_terms": [],
            "grad_norm": None if overflow else grad_norm,
            "fp16_overflow": overflow,
            "schedules": values,
        }

    # ---------------------------------------------------------------- periodic
    def run_knn_monitor(self) -> float:
        """k-NN top-1 of the (first) student's EMA backbone; beside several students, each one's
        is also kept in :attr:`knn_by_student` (logged as ``<name>/knn_top1``)."""
        dtype = PRECISIONS[self.cfg.compute_precision.teacher_dtype]
        self.knn_by_student: Dict[str, float] = {}
        for unit in self.units:
            start = time.perf_counter()
            top1 = self.knn_monitor.evaluate(unit.arch.teacher["backbone"], dtype=dtype, group=self.roster.group(unit))
            self.knn_by_student[unit.name] = top1
            logger.info(
                "iteration %d: k-NN top-1 %.2f%%%s (%.1f s)",
                self.iteration,
                100 * top1,
                f" ({unit.name})" if self.roster.several else "",
                time.perf_counter() - start,
            )
        if self.roster.rank_subsets:  # each rank scored its own students; rank 0 logs all of them
            self.knn_by_student = self.roster.means_over_ranks(self.knn_by_student)
        return next(iter(self.knn_by_student.values()))

    def export_teacher(self) -> Path:
        """Export each student's EMA backbone (pretraining: the teacher); returns the first's path."""
        # With rank subsets each student's ranks gather it and the first of them writes.
        paths = [
            export_teacher_backbone(
                unit.arch, export_path(unit.output_dir, self.iteration), group=self.roster.group(unit)
            )
            for unit in self.units
        ]
        path = paths[0]
        self._last_export_iteration = self.iteration
        logger.info("exported the teacher backbone to %s", ", ".join(str(p) for p in paths))
        self._log_pca_preview()
        return path

    def _log_pca_preview(self) -> None:
        """The PCA map of the fixed preview images to the tracking sinks (logging.pca_images)."""
        if not self.pca_preview.enabled:
            return
        dtype = PRECISIONS[self.cfg.compute_precision.teacher_dtype]
        backbone = self.roster.preview_backbone()
        if backbone is None:  # rank subsets: a rank that does not train the previewed student
            return
        picture = self.pca_preview.render(backbone, dtype=dtype)
        if picture is not None:
            self.metrics.log_image(PCA_IMAGE_TAG, picture, self.iteration, caption=f"iteration {self.iteration}")

    def _export_boundary(self) -> Optional[Path]:
        """Export the teacher unless a step since the previous checkpoint boundary was
        non-finite (then warn and leave the previous export)."""
        if self._nonfinite_since_checkpoint:
            logger.warning(
                "iteration %d: teacher export skipped, %d non-finite step(s) since the previous checkpoint "
                "boundary; %s stays as it was",
                self.iteration,
                self._nonfinite_since_checkpoint,
                self.output_dir / "exports" / LATEST_EXPORT_NAME,
            )
            return None
        return self.export_teacher()

    def _checkpoint_boundary(self) -> Optional[Path]:
        """Checkpoint unless the window since the previous checkpoint boundary held a non-finite
        step (then warn and write nothing); a new window starts either way, so a run that
        recovers checkpoints again after one clean window."""
        skipped, self._nonfinite_since_checkpoint = self._nonfinite_since_checkpoint, 0
        if skipped:
            logger.warning(
                "iteration %d: checkpoint skipped, %d non-finite step(s) since the previous checkpoint "
                "boundary; %s (retention keeps it)",
                self.iteration,
                skipped,
                self.describe_last_checkpoint(),
            )
            return None
        return self.save_checkpoint()

    # -------------------------------------------------------------------- loop
    def train(self) -> Dict[str, Any]:
        """Resume if possible, then train until ``max_iterations`` (or a stop request).

        Returns ``{"iteration", "last_record", "stopped", "checkpoint", "checkpoint_skipped"}``:
        where it stopped, the last metrics line, whether a stop request ended it, the newest
        checkpoint (where a rerun resumes; None if there is none) and whether the final checkpoint
        was skipped because of non-finite steps.
        """
        self.resume()
        if self.iteration >= self.max_iterations:
            logger.info("nothing to do: iteration %d >= max iterations %d", self.iteration, self.max_iterations)
            self.metrics.close()
            return {
                "iteration": self.iteration,
                "last_record": None,
                "stopped": False,
                "checkpoint": self.last_checkpoint_path(),
                "checkpoint_skipped": False,
            }
        epoch_length = int(self.cfg.train.OFFICIAL_EPOCH_LENGTH)
        window = WindowAverager()
        window_seconds, window_iterations, window_images = 0.0, 0, 0
        skipped_images, nonfinite_steps, overflow_steps = 0, 0, 0
        last_record: Optional[Dict[str, Any]] = None
        stop = checkpoint_skipped = False
        data_iter = iter(self.loader)
        logger.info("training from iteration %d to %d", self.iteration, self.max_iterations)

        while self.iteration < self.max_iterations:
            start = time.perf_counter()
            batch = next(data_iter, None)  # None: a stream that does not repeat has ended
            # Every image of a batch was unreadable and skipped: all ranks skip the step together,
            # or the others would wait in the step's collectives for this one. Likewise all stop
            # when the data of any has run out.
            ended, unreadable = distributed.any_rank_each(
                [batch is None, batch is not None and "collated_global_crops" not in batch], self.device
            )
            if ended:
                raise DataExhaustedError(
                    f"the training data ran out after iteration {self.iteration} of {self.max_iterations} "
                    f"({'on this rank' if batch is None else 'on another rank'}); "
                    "a WebDataset stream ends after one pass unless train.dataset_path has :repeat=true"
                )
            skipped_images += int(batch.pop("skipped_images", 0))
            if unreadable:
                continue
            result = self.train_step(batch)
            self.iteration += 1
            window_seconds += time.perf_counter() - start
            window_iterations += 1
            window_images += int(batch["batch_size"]) * self.world_size
            if result["finite"]:
                window.add(result["losses"])
                if result["grad_norm"] is not None:
                    window.add({"grad_norm": result["grad_norm"]})
                overflow_steps += int(result["fp16_overflow"])
            else:
                nonfinite_steps += 1

            it = self.iteration
            last = it >= self.max_iterations
            stop = self._stop_agreed()
            knn_top1 = self.run_knn_monitor() if self.knn_monitor.due(it) else None

            if it % self.log_period == 0 or knn_top1 is not None or last or stop:
                seconds_per_iteration = window_seconds / max(window_iterations, 1)
                record: Dict[str, Any] = {"iteration": it, "epoch": it / epoch_length}
                record.update(window.means())
                record.update(result["schedules"])
                record["images_per_sec"] = window_images / max(window_seconds, 1e-9)
                record["eta_seconds"] = seconds_per_iteration * (self.max_iterations - it)
                record["skipped_images"] = skipped_images
                record["nonfinite_steps"] = nonfinite_steps
                if self.scaler is not None:
                    record["fp16_overflow_steps"] = overflow_steps
                if knn_top1 is not None:
                    record["knn_top1"] = knn_top1
                    if self.roster.several:
                        record.update({f"{name}/knn_top1": v for name, v in self.knn_by_student.items()})
                self.metrics.log(record)
                last_record = record
                window.reset()
                window_seconds, window_iterations, window_images = 0.0, 0, 0
                skipped_images, nonfinite_steps, overflow_steps = 0, 0, 0

            if (self.export_period > 0 and it % self.export_period == 0) or last:
                self._export_boundary()
            checkpoint_skipped = False
            if (self.checkpoint_period > 0 and it % self.checkpoint_period == 0) or last or stop:
                checkpoint_skipped = self._checkpoint_boundary() is None
            if stop:
                break
        self.metrics.close()
        return {
            "iteration": self.iteration,
            "last_record": last_record,
            "stopped": stop,
            "checkpoint": self.last_checkpoint_path(),
            "checkpoint_skipped": checkpoint_skipped,
        }
