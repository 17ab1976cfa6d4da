"""Distillation (``distillation.enabled``): smaller students trained on a frozen teacher's targets.

The same trainer, data path, FSDP2 sharding, checkpoints and exports as pretraining; only the
source of the targets changes. :class:`DistillMetaArch` holds

* the **frozen teacher** (:class:`FrozenTeacher`): a backbone from any source
  :mod:`dinov2.hub.sources` loads, with its DINO / iBOT heads when the source has them (a training
  output directory or one of its checkpoints). It is *not* a submodule: its weights never reach a
  ``state_dict``, so never a checkpoint; checkpoints record only its path and SHA-256
  (:class:`TeacherReference`), checked on resume;
* one :class:`DistillStudent` per student (``students.<name>.*`` in checkpoints). A student is an
  :class:`~dinov2.train.ssl_meta_arch.SSLMetaArch` of its own shape: backbone and heads, its own
  EMA (``students.<name>.teacher.*``: the student's EMA, what is exported and what the k-NN monitor
  evaluates, as upstream keeps it), its own centres, KoLeo on its CLS tokens. Only its targets
  differ: they are the frozen teacher's head outputs instead of its EMA's.

Targets. With the teacher's own heads, the frozen teacher's logits (computed once per batch) are
centred and sharpened per student exactly as pretraining does with its EMA teacher's. A bare
backbone file has no heads, so they are learned during distillation: the student's heads sit on a
linear ``adapter`` that maps its tokens into the teacher's width, and the teacher-side heads are
the student EMA's heads applied to the frozen teacher's tokens. That is DINO's own mechanism with
the teacher backbone frozen: the target head moves slowly (EMA), centring and the sharp teacher
temperature keep it from collapsing, and the targets can only describe what the frozen features
hold. See docs/distillation.md.

Several students (``distillation.students``) share one frozen-teacher forward per batch; each has
its own optimizer and schedules (built by the trainer from the student's config) and its own
exports under ``<output>/students/<name>/``. By default all ranks train all students; a student
entry's ``ranks`` places it on a subset of the ranks (:func:`student_ranks`). Each rank then
computes the frozen-teacher forward of its own batch once and trains only its students; a
student's data-parallel group is its ranks: it is FSDP2-sharded over a DeviceMesh of them, and
every collective of its step (gradient reduction and norm, its heads' BatchNorm statistics,
centring, Sinkhorn-Knopp, KoLeo) runs over that group, so its batch is ``len(ranks) x
train.batch_size_per_gpu`` images.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dinov2 import distributed
from dinov2.checkpoint.consolidate import read_teacher_state, resolve_checkpoint
from dinov2.checkpoint.manager import MARKER, CheckpointManager, file_sha256
from dinov2.checkpoint.metadata import METADATA_FILE
from dinov2.fsdp import mixed_precision_policy, shard_backbone, shard_ssl_meta_arch, subset_mesh
from dinov2.train.ssl_meta_arch import SSLMetaArch, _precision

logger = logging.getLogger("dinov2")

__all__ = [
    "DistillMetaArch",
    "DistillStudent",
    "FrozenTeacher",
    "TeacherChangedError",
    "TeacherReference",
    "load_frozen_teacher",
    "student_configs",
    "student_ranks",
    "SINGLE_STUDENT_NAME",
]

# The name of the one student of a run without ``distillation.students``.
SINGLE_STUDENT_NAME = "main"
_STUDENT_ENTRY_KEYS = ("name", "student", "optim", "ranks")


class TeacherChangedError(RuntimeError):
    """The frozen teacher's file differs from the one the run's checkpoints were trained against."""


@dataclass(frozen=True)
class TeacherReference:
    """What a checkpoint records about the frozen teacher: where it was read and its checksum
    (of the weights file, or of a checkpoint's ``COMPLETE`` marker, which lists the SHA-256 of
    each of its verified files)."""

    path: str
    sha256: str

    def checkpoint_entries(self) -> Dict[str, str]:
        return {"distill_teacher_path": self.path, "distill_teacher_sha256": self.sha256}

    def verify(self, stored: Mapping[str, Any], checkpoint) -> None:
        """Refuse to continue a run whose checkpoint was trained against another teacher file."""
        sha256 = str(stored["distill_teacher_sha256"])
        if sha256 != self.sha256:
            raise TeacherChangedError(
                f"distillation.teacher: {self.path} has changed since checkpoint {checkpoint} was written "
                f"(its SHA-256 is now {self.sha256}; the checkpoint was trained against {stored['distill_teacher_path']} "
                f"with SHA-256 {sha256}). Restore that file, or start a new run in another output directory"
            )


@dataclass
class TeacherOutputs:
    """One frozen-teacher forward of the global crops, shared by every student of the step."""

    cls_tokens: torch.Tensor
    masked_tokens: Optional[torch.Tensor]
    dino_logits: Optional[torch.Tensor]  # None without the teacher's own heads
    ibot_logits: Optional[torch.Tensor]


class FrozenTeacher(nn.Module):
    """The teacher backbone, and its heads when its source had them; never trained.

    Args:
        backbone: any backbone with the DINOv2 forward (``is_training=True`` gives
            ``x_norm_clstoken`` / ``x_norm_patchtokens``).
        heads: ``dino_head`` (and ``ibot_head`` when the teacher trained a separate one), or None.
        head_prototypes: prototype counts of the DINO and iBOT heads (with heads only).
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: Optional[Dict[str, nn.Module]] = None,
        head_prototypes: Tuple[int, int] = (0, 0),
    ):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads or {})
        self.head_prototypes = head_prototypes
        self.requires_grad_(False)
        for module in self.heads.modules():
            if isinstance(module, nn.BatchNorm1d):
                # DINOHead normalises with the batch's statistics in every mode (as in pretraining);
                # not tracking them keeps the stored running statistics, like every weight, untouched.
                module.track_running_stats = False
        self.eval()

    @property
    def has_heads(self) -> bool:
        return "dino_head" in self.heads

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_size)

    def train(self, mode: bool = True):
        return super().train(False)  # no stochastic depth or dropout, ever

    @torch.no_grad()
    def outputs(self, global_crops: torch.Tensor, mask_indices: torch.Tensor, dtype: torch.dtype) -> TeacherOutputs:
        autocast = (
            contextlib.nullcontext()
            if dtype == torch.float32
            else torch.autocast(device_type=global_crops.device.type, dtype=dtype)
        )
        with autocast:
            out = self.backbone(global_crops, is_training=True)
            cls_tokens = out["x_norm_clstoken"]
            masked = torch.index_select(out["x_norm_patchtokens"].flatten(0, 1), 0, mask_indices)
            dino_logits = ibot_logits = None
            if self.has_heads:
                if "ibot_head" in self.heads:
                    dino_logits = self.heads["dino_head"]([cls_tokens])[0]
                    ibot_logits = self.heads["ibot_head"](masked)
                else:  # the teacher scored its patch tokens with its DINO head (one call, as in training)
                    dino_logits, ibot_logits = self.heads["dino_head"]([cls_tokens, masked])
        return TeacherOutputs(cls_tokens, masked, dino_logits, ibot_logits)


# ------------------------------------------------------------------ loading
def _checkpoint_behind(source: Path) -> Optional[Path]:
    """The checkpoint of a training output directory or a checkpoint directory; None otherwise."""
    if (source / METADATA_FILE).is_file():
        return resolve_checkpoint(source)
    if source.is_dir() and (source / "checkpoints").is_dir():
        return CheckpointManager(source / "checkpoints").newest_verified()
    return None


def _config_of_checkpoint(checkpoint: Path) -> Optional[Path]:
    for directory in (checkpoint.parent.parent, checkpoint.parent):  # <output>/checkpoints/ckpt_x
        if (directory / "config.yaml").is_file():
            return directory / "config.yaml"
    return None


def _teacher_from_checkpoint(checkpoint: Path, config_path: Path) -> Tuple[FrozenTeacher, DictConfig]:
    from dinov2.hub.sources import load_backbone_from_config
    from dinov2.utils.config import load_saved_config

    teacher_cfg = load_saved_config(config_path)
    backbone_state, heads_state = read_teacher_state(checkpoint, with_heads=True)
    backbone, _ = load_backbone_from_config(teacher_cfg, backbone_state)
    # A distillation run's checkpoint holds its students' EMAs, whose heads may sit on an adapter
    # into another width: its backbone is a teacher, its heads are not.
    if OmegaConf.select(teacher_cfg, "distillation.enabled", default=False) or not any(
        key.startswith("dino_head.") for key in heads_state
    ):
        return FrozenTeacher(backbone), teacher_cfg
    embed_dim = int(backbone.embed_dim)
    heads = {"dino_head": SSLMetaArch._make_head(teacher_cfg.dino, embed_dim)}
    if teacher_cfg.ibot.separate_head:
        heads["ibot_head"] = SSLMetaArch._make_head(teacher_cfg.ibot, embed_dim)
    modules = nn.ModuleDict(heads)
    modules.load_state_dict(heads_state, strict=True)
    ibot_prototypes = (
        teacher_cfg.ibot.head_n_prototypes if teacher_cfg.ibot.separate_head else teacher_cfg.dino.head_n_prototypes
    )
    return FrozenTeacher(backbone, heads, (int(teacher_cfg.dino.head_n_prototypes), int(ibot_prototypes))), teacher_cfg


def _weights_file(source: Path) -> Path:
    """The file whose checksum identifies a bare-backbone teacher source."""
    from dinov2.hub.interop import is_transformers_folder
    from dinov2.hub.sources import resolve_weights_path

    if is_transformers_folder(source):
        return source / "model.safetensors"
    return resolve_weights_path(source, "distillation.teacher")


def load_frozen_teacher(source: Union[str, Path], num_heads: int = 0) -> Tuple[FrozenTeacher, TeacherReference]:
    """The frozen teacher of ``distillation.teacher`` and its reference.

    * a training output directory with checkpoints, or one checkpoint directory: the teacher
      backbone *and heads* of the newest intact checkpoint (or that one), built from the run's
      ``config.yaml``;
    * anything else :func:`dinov2.hub.sources.load_backbone` reads (a consolidated export, an
      official DINOv2 or DINOv3 file, a training output with exports only, a transformers folder):
      the backbone alone; the heads are then learned (see the module docstring). ``num_heads``
      (0: ``embed_dim // 64``) is the attention head count of a file that cannot tell.
    """
    from dinov2.hub.sources import load_backbone

    if not str(source):
        raise ValueError("distillation.enabled is true but distillation.teacher is empty: name the teacher's source")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"distillation.teacher: {path} does not exist")
    checkpoint = _checkpoint_behind(path)
    if checkpoint is not None:
        config_path = _config_of_checkpoint(checkpoint)
        if config_path is None:
            raise FileNotFoundError(
                f"distillation.teacher: checkpoint {checkpoint} has no config.yaml beside it (looked in "
                f"{checkpoint.parent.parent} and {checkpoint.parent}), so its architecture is unknown"
            )
        teacher, _ = _teacher_from_checkpoint(checkpoint, config_path)
        reference = TeacherReference(str(checkpoint), file_sha256(checkpoint / MARKER))
    else:
        backbone, _ = load_backbone(str(path), num_heads=num_heads or None)
        teacher = FrozenTeacher(backbone)
        weights = _weights_file(path)
        reference = TeacherReference(str(weights), file_sha256(weights))
    logger.info(
        "distillation teacher %s (SHA-256 %s): width %d, %s",
        reference.path,
        reference.sha256[:16],
        teacher.embed_dim,
        "with its DINO/iBOT heads" if teacher.has_heads else "backbone only: heads learned during distillation",
    )
    return teacher, reference


# ----------------------------------------------------------------- students
def student_configs(cfg: DictConfig) -> List[Tuple[str, DictConfig]]:
    """(name, config) of each student: ``distillation.students`` entries merged over ``cfg``
    (``student:`` and ``optim:`` keys), or ``cfg`` itself as the one student ``main``."""
    entries = list(cfg.distillation.students or [])
    if not entries:
        return [(SINGLE_STUDENT_NAME, cfg)]
    result, seen = [], set()
    for index, entry in enumerate(entries):
        where = f"distillation.students[{index}]"
        if not isinstance(entry, Mapping) and not OmegaConf.is_dict(entry):
            raise ValueError(f"{where} must be a mapping {{name, student, optim, ranks}}, got {entry!r}")
        entry = OmegaConf.to_container(entry) if OmegaConf.is_config(entry) else dict(entry)
        unknown = sorted(set(entry) - set(_STUDENT_ENTRY_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {list(_STUDENT_ENTRY_KEYS)}")
        name = str(entry.get("name", ""))
        if not name.isidentifier():
            raise ValueError(f"{where}.name must be a non-empty identifier (it names files and metrics), got {name!r}")
        if hasattr(nn.ModuleDict(), name):
            raise ValueError(f"{where}.name {name!r} is taken by a torch.nn.Module attribute; choose another name")
        if name in seen:
            raise ValueError(f"{where}.name {name!r} is used twice")
        seen.add(name)
        _entry_ranks(entry, where)
        update: Dict[str, Any] = {}
        for section in ("student", "optim"):
            values = entry.get(section) or {}
            bad = sorted(set(values) - set(cfg[section]))
            if bad:
                raise ValueError(f"{where}.{section}: unknown key(s) {bad} (valid: the keys of the {section}: section)")
            update[section] = values
        student_cfg = OmegaConf.merge(cfg, update)
        OmegaConf.set_readonly(student_cfg, True)
        result.append((name, student_cfg))
    return result


def _entry_ranks(entry: Mapping[str, Any], where: str) -> Tuple[int, ...]:
    """The ``ranks`` of a student entry as given (``()``: all ranks), checked for type and duplicates."""
    ranks = entry.get("ranks")
    ranks = [] if ranks is None else ranks
    if not isinstance(ranks, (list, tuple)) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise ValueError(f"{where}.ranks must be a list of rank numbers (e.g. [0, 1]; [] for all ranks), got {ranks!r}")
    duplicates = sorted({r for r in ranks if list(ranks).count(r) > 1})
    if duplicates:
        raise ValueError(f"{where}.ranks lists rank(s) {duplicates} more than once: {list(ranks)}")
    negative = [r for r in ranks if r < 0]
    if negative:
        raise ValueError(f"{where}.ranks: rank numbers are >= 0, got {negative}")
    return tuple(sorted(ranks))


def student_ranks(cfg: DictConfig, world_size: int) -> Dict[str, Tuple[int, ...]]:
    """The ranks that train each student (in ``student_configs`` order), for ``world_size`` ranks.

    A ``distillation.students`` entry without ``ranks`` (or with ``[]``) is trained by every rank.
    Refused: a rank that does not exist in this world size, and a rank that would train no
    student (it would only compute teacher forwards).
    """
    names = [name for name, _ in student_configs(cfg)]
    entries = list(cfg.distillation.students or [])
    everyone = tuple(range(world_size))
    placement: Dict[str, Tuple[int, ...]] = {}
    for index, name in enumerate(names):
        where = f"distillation.students[{index}]"
        given = _entry_ranks(OmegaConf.to_container(entries[index]), where) if entries else ()
        beyond = [r for r in given if r >= world_size]
        if beyond:
            raise ValueError(
                f"{where}.ranks {list(given)}: rank(s) {beyond} do not exist in a run of {world_size} rank(s) "
                f"(ranks 0..{world_size - 1}); fix the list or launch more processes"
            )
        placement[name] = given or everyone
    idle = sorted(set(everyone) - {r for ranks in placement.values() for r in ranks})
    if idle:
        raise ValueError(
            f"distillation.students: rank(s) {idle} of {world_size} train no student (each rank computes teacher "
            "forwards for its own students only); add them to a student's ranks, or launch fewer processes"
        )
    return placement


class DistillStudent(SSLMetaArch):
    """One student: an :class:`SSLMetaArch` of its own shape whose targets come from the frozen
    teacher's outputs of the step (:class:`TeacherOutputs`) instead of its EMA's forward.

    Without the teacher's heads, ``student.adapter`` (a linear map to the teacher's width) feeds
    the student's heads, and the EMA's heads (``teacher.dino_head`` / ``teacher.ibot_head``) score
    the frozen teacher's tokens. The frozen teacher itself is not held here (it is not part of
    this module's state).
    """

    def __init__(self, cfg: DictConfig, teacher: FrozenTeacher, process_group=None):
        # Read by _make_head during SSLMetaArch.__init__: learned heads take the teacher's width.
        self._head_in_dim = None if teacher.has_heads else teacher.embed_dim
        super().__init__(cfg, process_group=process_group)
        if self.student["backbone"].patch_size != teacher.patch_size:
            raise ValueError(
                f"student.patch_size {self.student['backbone'].patch_size} differs from the teacher's patch size "
                f"{teacher.patch_size}: iBOT compares patch tokens position by position, so both need the same grid"
            )
        if teacher.has_heads:
            dino_prototypes, ibot_prototypes = teacher.head_prototypes
            own_ibot = cfg.ibot.head_n_prototypes if self.separate_ibot_head else cfg.dino.head_n_prototypes
            if self.do_dino and int(cfg.dino.head_n_prototypes) != dino_prototypes:
                raise ValueError(
                    f"dino.head_n_prototypes is {cfg.dino.head_n_prototypes} but the teacher's DINO head has "
                    f"{dino_prototypes} prototypes; set dino.head_n_prototypes={dino_prototypes}"
                )
            if self.do_ibot and int(own_ibot) != ibot_prototypes:
                raise ValueError(
                    f"the student's iBOT head has {own_ibot} prototypes but the teacher's has {ibot_prototypes}; "
                    "set ibot.head_n_prototypes (and ibot.separate_head) to match the teacher's run"
                )
        else:
            adapter = nn.Linear(self.embed_dim, teacher.embed_dim)
            self.student["adapter"] = adapter
            ema_adapter = nn.Linear(self.embed_dim, teacher.embed_dim).to(adapter.weight.dtype)
            ema_adapter.load_state_dict(adapter.state_dict())
            ema_adapter.requires_grad_(False)
            self.teacher["adapter"] = ema_adapter
        self._step_outputs: Optional[TeacherOutputs] = None

    def _make_head(self, head_cfg: DictConfig, embed_dim: int):
        return SSLMetaArch._make_head(head_cfg, self._head_in_dim or embed_dim, self.process_group)

    def _head_logits(self, modules, cls_groups, masked_tokens, with_bottleneck=False):
        if modules is self.student and "adapter" in modules:
            # One adapter call for every group (an FSDP unit is then gathered once).
            groups = list(cls_groups) + ([masked_tokens] if masked_tokens is not None else [])
            if groups:
                mapped = modules["adapter"](torch.cat(groups)).split([g.shape[0] for g in groups])
                cls_groups = list(mapped[: len(cls_groups)])
                masked_tokens = mapped[-1] if masked_tokens is not None else None
        return super()._head_logits(modules, cls_groups, masked_tokens, with_bottleneck)

    @torch.no_grad()
    def _teacher_logits(self, global_crops, mask_indices):
        shared = self._step_outputs
        if shared is None:
            raise RuntimeError("DistillStudent is driven by DistillMetaArch.forward_backward (no teacher outputs set)")
        if shared.dino_logits is not None:
            return (shared.dino_logits if self.do_dino else None), (shared.ibot_logits if self.do_ibot else None)
        cls_groups = [shared.cls_tokens] if self.do_dino else []
        masked = shared.masked_tokens if self.do_ibot else None
        with self._autocast(self.teacher_dtype, global_crops.device):
            dino_groups, ibot_logits, _ = self._head_logits(self.teacher, cls_groups, masked)
        return (dino_groups[0] if dino_groups else None), ibot_logits

    def forward_with(self, outputs: TeacherOutputs, data: dict, teacher_temp: float, scaler=None):
        """:meth:`SSLMetaArch.forward_backward` against ``outputs`` of the frozen teacher."""
        self._step_outputs = outputs
        try:
            return self.forward_backward(data, teacher_temp, scaler=scaler)
        finally:
            self._step_outputs = None


class DistillMetaArch(nn.Module):
    """The frozen teacher and the students of a distillation run (see the module docstring).

    ``state_dict()`` (so checkpoints) holds ``students.<name>.*`` only; the frozen teacher follows
    the module's device and dtype moves (``_apply``) without being registered.

    With rank subsets (:attr:`rank_subsets`) ``students`` holds only this rank's students;
    :attr:`student_cfgs` and :attr:`student_ranks` describe all of them, and
    :attr:`student_groups` / :attr:`student_meshes` hold this rank's students' process groups and
    DeviceMeshes (empty without subsets: every collective then spans all ranks, as before).
    """

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.gram.use_loss:
            raise ValueError("gram.use_loss and distillation.enabled cannot be combined: distil first, then anchor")
        teacher, reference = load_frozen_teacher(cfg.distillation.teacher, int(cfg.distillation.teacher_num_heads))
        # Kept outside the module tree on purpose: no teacher tensor in any state_dict.
        self.__dict__["frozen_teacher"] = teacher
        self.teacher_reference = reference
        self.teacher_dtype = _precision(cfg.compute_precision.teacher_dtype, "teacher_dtype")
        self.student_cfgs: Dict[str, DictConfig] = dict(student_configs(cfg))
        world_size, rank = distributed.get_world_size(), distributed.get_rank()
        self.student_ranks: Dict[str, Tuple[int, ...]] = student_ranks(cfg, world_size)
        self.rank_subsets = any(len(ranks) < world_size for ranks in self.student_ranks.values())
        self.student_meshes: Dict[str, Any] = {}
        self.student_groups: Dict[str, Any] = {}
        if not self.rank_subsets:
            self.students = nn.ModuleDict(
                {name: self._build_student(index, scfg) for index, (name, scfg) in enumerate(self.student_cfgs.items())}
            )
            return
        if cfg.compute_precision.param_dtype == "fp16" and cfg.compute_precision.grad_scaler:
            raise ValueError(
                "distillation.students with ranks: the fp16 GradScaler keeps one loss scale for all ranks, which "
                "students on different ranks cannot share; use compute_precision.param_dtype=bf16 or fp32"
            )
        device = distributed.get_device()
        students = {}
        for index, (name, scfg) in enumerate(self.student_cfgs.items()):
            ranks = self.student_ranks[name]
            mesh = subset_mesh(ranks, device)  # collective: every rank creates every student's group
            if rank not in ranks:
                continue
            self.student_meshes[name], self.student_groups[name] = mesh, mesh.get_group()
            students[name] = self._build_student(index, scfg, self.student_groups[name])
        self.students = nn.ModuleDict(students)
        logger.info(
            "distillation students on rank subsets: %s; rank %d trains %s",
            ", ".join(f"{name} on {list(ranks)}" for name, ranks in self.student_ranks.items()),
            rank,
            ", ".join(students),
        )

    def _build_student(self, index: int, scfg: DictConfig, process_group=None) -> DistillStudent:
        """Student ``index`` of the list, from its own seed (``train.seed`` and its position): its
        initial weights do not depend on which other students a rank builds, so it starts the same
        on all of its ranks and whichever ranks it is placed on."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.cfg.train.seed) + 1000 * (index + 1))
            return DistillStudent(scfg, self.frozen_teacher, process_group=process_group)

    @property
    def frozen_teacher(self) -> FrozenTeacher:
        return self.__dict__["frozen_teacher"]

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.frozen_teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen_teacher.eval()
        return self

    def forward(self, *args, **kwargs):
        raise RuntimeError("DistillMetaArch is driven by forward_backward(data, teacher_temp), not forward()")

    @property
    def primary(self) -> DistillStudent:
        """The first student (of this rank's): its backbone shapes the data pipeline (patch size)."""
        return next(iter(self.students.values()))

    @property
    def student(self) -> nn.ModuleDict:
        """The first student's trainable modules, under pretraining's name (data set-up, previews)."""
        return self.primary.student

    @property
    def teacher(self) -> nn.ModuleDict:
        """The first student's *EMA* (not the frozen teacher), under the name pretraining gives
        what it exports and monitors."""
        return self.primary.teacher

    def teacher_backbone(self) -> nn.Module:
        """The first student's EMA backbone (what pretraining calls the teacher backbone)."""
        return self.primary.teacher["backbone"]

    def shard(self, cfg: DictConfig) -> None:
        """FSDP2: each student as pretraining shards its model; the frozen teacher like an EMA teacher."""
        for name, student in self.students.items():
            shard_ssl_meta_arch(student, cfg, mesh=self.student_meshes.get(name))
        precision = cfg.compute_precision
        policy = mixed_precision_policy(precision.teacher_dtype, precision.reduce_dtype)
        from torch.distributed.fsdp import fully_shard

        # No backward through the frozen teacher: it always reshards (see shard_ssl_meta_arch).
        shard_backbone(self.frozen_teacher.backbone, policy, reshard_after_forward=True)
        for head in self.frozen_teacher.heads.values():
            fully_shard(head, mp_policy=policy, reshard_after_forward=True)

    def forward_backward(
        self, data: dict, teacher_temp: Union[float, Mapping[str, float]], scaler=None, gram_targets=None
    ) -> Dict[str, torch.Tensor]:
        """One frozen-teacher forward, then each student's losses and backward.

        Args:
            teacher_temp: one temperature for every student, or ``{name: temperature}`` of the
                students to train at this step (each from its own schedule; others are skipped).
            gram_targets: always None (Gram anchoring is refused with distillation).

        Returns:
            With one student, the loss terms of :meth:`SSLMetaArch.forward_backward`; with several,
            the same terms as ``<name>/<term>`` (with rank subsets: of this rank's students, each
            the mean over this rank's batch only).
        """
        temps = dict(teacher_temp) if isinstance(teacher_temp, Mapping) else dict.fromkeys(self.students, teacher_temp)
        n_masked = int(data["n_masked_patches"])
        outputs = self.frozen_teacher.outputs(
            data["collated_global_crops"], data["mask_indices_list"][:n_masked], self.teacher_dtype
        )
        losses: Dict[str, torch.Tensor] = {}
        single = len(self.student_cfgs) == 1
        for name, temp in temps.items():
            terms = self.students[name].forward_with(outputs, data, float(temp), scaler=scaler)
            losses.update(terms if single else {f"{name}/{term}": value for term, value in terms.items()})
        return losses

    @torch.no_grad()
    def revert_centers(self) -> None:
        for student in self.students.values():
            student.revert_centers()
