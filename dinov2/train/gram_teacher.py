"""The Gram teacher of Gram anchoring (DINOv3): a frozen backbone whose patch-similarity matrices
the student's are pulled towards (:class:`~dinov2.loss.GramLoss`, config section ``gram:``).

Two sources:

* the run itself (``gram.ckpt`` empty): a copy of the EMA teacher's backbone taken at iteration
  ``gram.it_first_update``, then refreshed every ``gram.update_frequency`` iterations, at most
  ``gram.max_updates`` times in all. The copy's weights and the update count are part of the
  run's checkpoint (``gram.model.*``, ``gram_state.*``), so a resumed run continues with exactly the
  Gram teacher it had;
* a file (``gram.ckpt``: any backbone source :func:`dinov2.hub.sources.load_backbone` accepts, a
  backbone file, a training output directory, a transformers folder). Its weights are not copied
  into checkpoints: the path and the SHA-256 of the weights file are, and a resumed run re-loads
  the file and refuses to continue if it changed.

The Gram teacher may run at a higher resolution than the global crops (``gram.resolution_scale``):
the crops are resized up before its forward, and its patch features are resized back to the
student's patch grid, so the two similarity matrices compare the same image regions.

"Iteration ``i``" is the iteration about to be trained after ``i`` completed ones: a Gram teacher
taken at iteration 0 is the teacher the run started with (``train.init_from_checkpoint``).
Under FSDP2 the Gram teacher's backbone is sharded like the EMA teacher's, so a refresh copies
local shards into local shards.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from dinov2.checkpoint import ModelOptimizerState
from dinov2.checkpoint.manager import file_sha256

logger = logging.getLogger("dinov2")

__all__ = [
    "GramRefreshSchedule",
    "GramTeacher",
    "GramTeacherChangedError",
    "build_gram_teacher",
    "gram_teacher_input_size",
]


class GramTeacherChangedError(RuntimeError):
    """A resumed run's file Gram teacher is not the file the run was checkpointed with."""


class GramRefreshSchedule:
    """Which iterations take a fresh copy of the EMA teacher.

    Iterations ``first, first + frequency, first + 2 * frequency, ...``; ``frequency`` 0 takes
    one copy only (at ``first``); ``max_updates`` caps the number of copies, the first included
    (0: no cap).
    """

    def __init__(self, first: int, frequency: int, max_updates: int):
        for name, value in (("it_first_update", first), ("update_frequency", frequency), ("max_updates", max_updates)):
            if int(value) < 0:
                raise ValueError(f"gram.{name} must be >= 0, got {value}")
        self.first = int(first)
        self.frequency = int(frequency)
        self.max_updates = int(max_updates)

    def update_index(self, iteration: int) -> Optional[int]:
        """``k`` when ``iteration`` takes the ``k``-th copy (0 for the first), else None."""
        offset = int(iteration) - self.first
        if offset < 0:
            return None
        if self.frequency == 0:
            index = 0 if offset == 0 else None
        else:
            index = offset // self.frequency if offset % self.frequency == 0 else None
        if index is None or (self.max_updates and index >= self.max_updates):
            return None
        return index

    def is_update(self, iteration: int) -> bool:
        return self.update_index(iteration) is not None

    def updates_before(self, iteration: int) -> int:
        """Copies taken at iterations ``< iteration``."""
        if iteration <= self.first:
            return 0
        count = 1 if self.frequency == 0 else (iteration - 1 - self.first) // self.frequency + 1
        return min(count, self.max_updates) if self.max_updates else count

    def iterations(self, until: int) -> List[int]:
        """Every copy iteration ``< until`` (for logs and docs)."""
        return [it for it in range(self.first, until) if self.is_update(it)]


def gram_teacher_input_size(crop_size: int, scale: float, patch_size: int) -> int:
    """The side of the Gram teacher's input for a global crop of ``crop_size`` px: ``scale``
    times larger, rounded to a multiple of its patch size (at least one patch)."""
    return max(patch_size, int(round(crop_size * scale / patch_size)) * patch_size)


class GramTeacher(nn.Module):
    """A frozen backbone producing the Gram targets; see the module docstring.

    Args:
        backbone: the Gram teacher's backbone (a copy of the EMA teacher's, or loaded from a file).
        schedule: when the term is on and, for a run Gram teacher, when it is refreshed.
        source: ``""`` for the run's own EMA teacher, else the ``gram.ckpt`` it was loaded from.
        sha256: SHA-256 of the file behind ``source`` (``""`` for the run's own).
        resolution_scale: input resolution of the Gram teacher relative to the global crops.
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: GramRefreshSchedule,
        source: str = "",
        sha256: str = "",
        resolution_scale: float = 1.0,
    ):
        super().__init__()
        if resolution_scale <= 0:
            raise ValueError(f"gram.resolution_scale must be positive, got {resolution_scale}")
        self.backbone = backbone
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        self.schedule = schedule
        self.source = str(source)
        self.sha256 = str(sha256)
        self.resolution_scale = float(resolution_scale)
        self.patch_size = int(backbone.patch_size)
        #: Copies of the EMA teacher taken so far (a file Gram teacher: 0).
        self.updates = 0
        #: Iteration of the newest copy (-1: none yet).
        self.last_update = -1
        self.eval()

    @property
    def from_run(self) -> bool:
        return not self.source

    def train(self, mode: bool = True):
        # Always in eval mode: no stochastic depth or dropout in a target network.
        return super().train(False)

    def active(self, iteration: int) -> bool:
        """Whether the Gram term is computed at ``iteration`` (the same answer on every rank)."""
        if self.from_run:
            return self.updates > 0
        return iteration >= self.schedule.first

    # ------------------------------------------------------------------ refresh
    @torch.no_grad()
    def maybe_update(self, iteration: int, teacher_backbone: nn.Module) -> bool:
        """Copy ``teacher_backbone`` into the Gram teacher when ``iteration`` is a refresh
        iteration (run Gram teacher only); True when it did."""
        if not self.from_run or not self.schedule.is_update(iteration):
            return False
        if iteration == self.last_update:
            return False  # already taken for this iteration (train_step called again for it)
        self.copy_from(teacher_backbone)
        self.updates += 1
        self.last_update = int(iteration)
        logger.info("iteration %d: Gram teacher taken from the EMA teacher (copy %d)", iteration, self.updates)
        return True

    @torch.no_grad()
    def copy_from(self, teacher_backbone: nn.Module) -> None:
        """Parameters and buffers of ``teacher_backbone``, local shard by local shard."""
        sources = list(teacher_backbone.parameters()) + list(teacher_backbone.buffers())
        targets = list(self.backbone.parameters()) + list(self.backbone.buffers())
        if len(sources) != len(targets):
            raise RuntimeError("Gram teacher and EMA teacher backbones differ in their tensors")
        for source, target in zip(sources, targets):
            source_local, target_local = _local(source), _local(target)
            if source_local.shape != target_local.shape:
                raise RuntimeError(
                    f"Gram teacher and EMA teacher shards differ in shape: {tuple(source_local.shape)} "
                    f"vs {tuple(target_local.shape)}"
                )
            target_local.copy_(source_local)

    # ------------------------------------------------------------------ targets
    @torch.no_grad()
    def patch_tokens(self, global_crops: torch.Tensor, grid: tuple) -> torch.Tensor:
        """``(n, h * w, D)`` normalised patch features of ``global_crops`` on the student's patch
        grid ``(h, w)`` (resized from the Gram teacher's own grid when they differ)."""
        height, width = global_crops.shape[-2:]
        size = (
            gram_teacher_input_size(height, self.resolution_scale, self.patch_size),
            gram_teacher_input_size(width, self.resolution_scale, self.patch_size),
        )
        crops = global_crops
        if size != (height, width):
            crops = F.interpolate(global_crops, size=size, mode="bicubic", align_corners=False, antialias=True)
        tokens = self.backbone(crops, is_training=True)["x_norm_patchtokens"]
        teacher_grid = (size[0] // self.patch_size, size[1] // self.patch_size)
        if teacher_grid == tuple(grid):
            return tokens
        n, _, dim = tokens.shape
        maps = tokens.transpose(1, 2).reshape(n, dim, *teacher_grid).float()
        # Antialiased: a 2x larger grid averages each 2x2 neighbourhood instead of sampling it.
        maps = F.interpolate(maps, size=tuple(grid), mode="bilinear", align_corners=False, antialias=True)
        return maps.flatten(2).transpose(1, 2).to(tokens.dtype)

    # --------------------------------------------------------------- checkpoint
    def checkpoint_entries(self) -> Dict[str, Any]:
        """Entries added to the trainer's checkpoint ``app_state``: ``gram_state`` (update count,
        last update, source, SHA-256) and, for a run Gram teacher, ``gram`` (its weights)."""
        entries: Dict[str, Any] = {
            "gram_state": {
                "updates": self.updates,
                "last_update": self.last_update,
                "source": self.source,
                "sha256": self.sha256,
            }
        }
        if self.from_run:
            entries["gram"] = ModelOptimizerState(self.backbone)
        return entries

    def restore(self, state: Dict[str, Any], checkpoint: Path) -> None:
        """Take the loaded ``gram_state`` entry; a file Gram teacher must be the file it was."""
        source, sha256 = str(state["source"]), str(state["sha256"])
        if source != self.source:
            raise GramTeacherChangedError(
                f"checkpoint {checkpoint} was trained with the Gram teacher {source or 'of the run itself (gram.ckpt empty)'}, "
                f"but gram.ckpt is now {self.source or 'empty'}; resume with the same gram.ckpt or start a new run"
            )
        if sha256 != self.sha256:
            raise GramTeacherChangedError(
                f"the Gram teacher file {self.source} changed since checkpoint {checkpoint} was written "
                f"(SHA-256 {self.sha256}, the checkpoint recorded {sha256}); restore that file or start a new run"
            )
        self.updates = int(state["updates"])
        self.last_update = int(state["last_update"])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    data = tensor.data
    to_local = getattr(data, "to_local", None)
    return to_local() if to_local is not None else data


def _weights_file(source: str) -> Path:
    """The file whose checksum identifies the Gram teacher ``source``."""
    from dinov2.hub.interop import is_transformers_folder
    from dinov2.hub.sources import resolve_weights_path

    path = Path(source)
    if path.is_dir() and is_transformers_folder(path):
        candidates = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if len(candidates) != 1:
            raise ValueError(f"gram.ckpt: {path} holds {len(candidates)} weights files; expected one")
        return candidates[0]
    return resolve_weights_path(path, option="gram.ckpt")


def build_gram_teacher(cfg: DictConfig, teacher_backbone: nn.Module) -> Optional[GramTeacher]:
    """The Gram teacher ``cfg.gram`` describes (None with ``gram.use_loss`` off), on the device of
    ``teacher_backbone``; call before the model is sharded (it is sharded with the teacher)."""
    gram = cfg.gram
    if not gram.use_loss:
        return None
    if float(gram.loss_weight) <= 0:
        raise ValueError(f"gram.use_loss is on but gram.loss_weight is {gram.loss_weight}; it must be positive")
    schedule = GramRefreshSchedule(gram.it_first_update, gram.update_frequency, gram.max_updates)
    device = next(teacher_backbone.parameters()).device
    source = str(gram.ckpt)
    if source:
        from dinov2.hub.sources import load_backbone

        weights = _weights_file(source)
        backbone, _ = load_backbone(source)
        sha256 = file_sha256(weights)
        logger.info("Gram teacher loaded from %s (%s, SHA-256 %s)", source, weights, sha256)
        return GramTeacher(
            backbone.to(device), schedule, source=source, sha256=sha256, resolution_scale=float(gram.resolution_scale)
        )
    backbone = copy.deepcopy(teacher_backbone)
    return GramTeacher(backbone, schedule, resolution_scale=float(gram.resolution_scale))
