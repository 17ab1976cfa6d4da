"""The students one training loop trains, and what every rank must agree on about them.

Pretraining trains one student, the :class:`~dinov2.train.ssl_meta_arch.SSLMetaArch` itself.
Distillation trains one per ``distillation.students`` entry, each with its own optimizer, schedules
and output folder (docs/distillation.md). With students on subsets of ranks
(``distillation.students[].ranks``) this rank holds only its own students, but every rank knows
every student's schedules (so the loop has the same length everywhere) and every student's logged
figures (gathered, so every rank takes the same skip / stop decisions and rank 0 logs them all).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from dinov2 import distributed
from dinov2.optim import build_optimizer, build_schedules, scaled_learning_rate
from dinov2.optim.schedules import TrainingSchedules

__all__ = ["StudentRoster", "TrainedStudent"]


@dataclass
class TrainedStudent:
    """One student the loop trains, with its own optimizer and schedules.

    Pretraining has one: ``arch`` is the :class:`SSLMetaArch`. Distillation has one per student:
    ``arch`` is a :class:`~dinov2.train.distill_meta_arch.DistillStudent` (both expose ``student``,
    ``teacher`` (the EMA that is exported), ``update_teacher`` and ``zero_last_layer_grads``).
    ``output_dir`` receives its exports (and, beside several students, its ``config.yaml``).
    """

    name: str
    arch: torch.nn.Module
    cfg: DictConfig
    optimizer: torch.optim.Optimizer
    schedules: TrainingSchedules
    output_dir: Path


class StudentRoster:
    """This rank's students (:attr:`units`) and the run-wide view of all of them.

    Args:
        model: the :class:`SSLMetaArch`, or the :class:`~dinov2.train.distill_meta_arch.DistillMetaArch`
            of a distillation run (already sharded: optimizers are built on its parameters).
        lr: pretraining's peak learning rate (distillation students scale their own by their batch).
    """

    def __init__(self, model: torch.nn.Module, cfg: DictConfig, output_dir: Path, distill: bool, lr: float):
        self.model, self.cfg, self.output_dir, self.distill = model, cfg, Path(output_dir), distill
        self.units: List[TrainedStudent] = self._build(lr)
        self.rank_subsets = bool(distill and model.rank_subsets)
        if self.rank_subsets:
            names = model.student_cfgs.items()
            self.schedules = {name: build_schedules(scfg, self._student_lr(name)) for name, scfg in names}
        else:
            self.schedules = {unit.name: unit.schedules for unit in self.units}
        self.several = len(self.schedules) > 1
        # Rank subsets: where each of this rank's optimizer parameter groups sits in a checkpoint.
        self.param_group_indices = self._checkpoint_param_group_indices() if self.rank_subsets else None

    # ------------------------------------------------------------------ set-up
    def output_dir_of(self, name: str) -> Path:
        """Where a distillation student's exports (and, beside others, its config.yaml) go."""
        several = len(self.model.student_cfgs) > 1
        return self.output_dir / "students" / name if several else self.output_dir

    def _student_lr(self, name: str) -> float:
        """A distillation student's peak learning rate, scaled by its own batch: its ranks x
        ``train.batch_size_per_gpu`` (every rank's without rank subsets)."""
        student_cfg = self.model.student_cfgs[name]
        batch = int(self.cfg.train.batch_size_per_gpu) * len(self.model.student_ranks[name])
        return scaled_learning_rate(float(student_cfg.optim.base_lr), batch, student_cfg.optim.scaling_rule)

    def _build(self, lr: float) -> List[TrainedStudent]:
        if not self.distill:
            parts = [("student", self.model, self.cfg, self.output_dir, lr)]
        else:
            parts = [
                (name, arch, self.model.student_cfgs[name], self.output_dir_of(name), self._student_lr(name))
                for name, arch in self.model.students.items()
            ]
        units = []
        for name, arch, unit_cfg, unit_dir, unit_lr in parts:
            optimizer = build_optimizer(arch.student, arch.student["backbone"].n_blocks, unit_cfg.optim)
            schedules = build_schedules(unit_cfg, unit_lr)
            units.append(TrainedStudent(name, arch, unit_cfg, optimizer, schedules, Path(unit_dir)))
        return units

    def _checkpoint_param_group_indices(self) -> List[int]:
        """The checkpoint index of each of this rank's optimizer parameter groups, numbered over
        every student's in student order, as a single process holding all students numbers them
        (so the checkpoint reshards onto any placement)."""
        counts: Dict[str, int] = {}
        for local in distributed.all_gather_object({u.name: len(u.optimizer.param_groups) for u in self.units}):
            counts.update(local)
        offsets, offset = {}, 0
        for name in self.model.student_cfgs:
            offsets[name], offset = offset, offset + counts[name]
        return [offsets[u.name] + i for u in self.units for i in range(len(u.optimizer.param_groups))]

    # ------------------------------------------------------------ run-wide view
    @property
    def total_iterations(self) -> int:
        """The loop's length: the longest schedule of any student (on any rank)."""
        return max(schedules.total_iters for schedules in self.schedules.values())

    def group(self, unit: TrainedStudent):
        """The process group of ``unit``'s ranks with rank subsets; None (all ranks) otherwise."""
        return self.model.student_groups.get(unit.name) if self.distill else None

    def active(self, iteration: int) -> List[TrainedStudent]:
        """This rank's students trained at ``iteration``: all of them, except that beside other
        students one whose schedule has ended stops (its last export stays as it was written)."""
        if not self.several:
            return self.units
        return [unit for unit in self.units if iteration < unit.schedules.total_iters]

    def scheduled_values(self, iteration: int) -> Dict[str, Dict[str, float]]:
        """``{name: lr, wd, momentum, ...}`` at ``iteration`` of every student still training,
        with rank subsets also of those other ranks train (every rank logs the same figures)."""
        return {
            name: schedules.at(iteration)
            for name, schedules in self.schedules.items()
            if not self.several or iteration < schedules.total_iters
        }

    def owned_checkpoint_modules(self) -> Optional[List[str]]:
        """With rank subsets a checkpoint holds every student, each rank reading and writing only
        its own (``students.<name>``); None: the whole model is every rank's."""
        return [f"students.{unit.name}" for unit in self.units] if self.rank_subsets else None

    def refuse_unlisted_students(self, path, keys: List[str], remedy: str) -> None:
        """Refuse checkpoint ``path`` (its flattened ``keys``) when it holds a student that the
        config no longer lists. Needed with rank subsets only: each rank then reads just its own
        students' entries, so no rank would notice one that nobody trains any more (without
        subsets the load itself refuses the unexpected entries)."""
        if not self.rank_subsets:
            return
        stored = {key.split(".")[3] for key in keys if key.startswith("train.model.students.")}
        unknown = sorted(stored - set(self.model.student_cfgs))
        if unknown:
            raise ValueError(
                f"checkpoint {path} holds student(s) {unknown} that distillation.students no longer lists "
                f"({list(self.model.student_cfgs)}); list them again, or {remedy}"
            )

    def configs_with_own_folder(self) -> Iterator[Tuple[DictConfig, Path]]:
        """(config, folder) of each distillation student that has a folder of its own (several
        students), also of those other ranks train: the folders evaluation reads."""
        if not self.distill:
            return
        for name, unit_cfg in self.model.student_cfgs.items():
            unit_dir = self.output_dir_of(name)
            if unit_dir != self.output_dir:
                yield unit_cfg, unit_dir

    def means_over_ranks(self, local: Dict[str, float]) -> Dict[str, float]:
        """Rank subsets: ``{key: value}`` of this rank's students -> every student's values on
        every rank, each the mean over the ranks that reported it (its student's ranks), in
        student order. One object all-gather; a NaN on any rank stays NaN in the mean."""
        gathered = distributed.all_gather_object(local)
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        for values in gathered:  # rank order: the same sums on every rank
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
        order = {name: index for index, name in enumerate(self.model.student_cfgs)}
        keys = sorted(sums, key=lambda key: order.get(key.split("/")[0], len(order)))  # stable within a student
        return {key: sums[key] / counts[key] for key in keys}

    def preview_backbone(self) -> Optional[torch.nn.Module]:
        """The EMA backbone whose PCA map is logged: the (first) student's; with rank subsets the
        first student that rank 0 (which logs) trains, None on ranks that do not train it (its
        ranks render it together)."""
        if not self.rank_subsets:
            return self.model.teacher["backbone"]
        name = next(name for name, ranks in self.model.student_ranks.items() if 0 in ranks)
        if name not in self.model.students:
            return None
        return self.model.students[name].teacher["backbone"]
