"""Resume states of classifier training: ``<output_dir>/checkpoints/epoch_<n>.pth``.

A resume state is one weights-only-loadable torch file (``RESUME_STATE_KEYS``: the epoch, stage,
adapter settings, model, optimizer and grad-scaler states, best metric so far). Training is a
single process and a classifier small, so the state stays one file rather than a sharded DCP
checkpoint (:mod:`dinov2.checkpoint`), whose value is resharding across ranks. It is written
with the core's atomic writer (:func:`dinov2.utils.io.atomic_torch_save`: a reader sees the old
file or the new one, never half of one, and a full disk is named), its SHA-256 recorded beside it
as the SSL checkpoints record theirs (``epoch_<n>.pth.sha256``, ``sha256sum -c`` format; checked
before the state is loaded, since torch reads a file changed in place without complaint), and
pruned by the core's retention policy (:meth:`dinov2.checkpoint.CheckpointManager.to_delete`,
``checkpointing.keep_last`` newest kept; ``<= 0`` keeps all), counted in epochs.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from dinov2.checkpoint import CheckpointManager, file_sha256
from dinov2.hub.weights import WeightsError, load_weights_only
from dinov2.utils.io import atomic_torch_save, atomic_write_text

from .checkpoint import ClassifierFileError

logger = logging.getLogger("dinov2")

CHECKPOINT_DIR = "checkpoints"
RESUME_STATE_KEYS = ("epoch", "stage", "lora", "model", "optimizer", "scaler", "best_metric", "best_epoch")
_STATE_NAME = re.compile(r"^epoch_(\d+)\.pth$")
PathLike = Union[str, os.PathLike]


def resume_state_path(output_dir: PathLike, epoch: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"epoch_{int(epoch):04d}.pth"


def checksum_path(path: PathLike) -> Path:
    """Where the SHA-256 of resume state ``path`` is recorded."""
    path = Path(path)
    return path.with_name(f"{path.name}.sha256")


def verify_resume_state(path: PathLike) -> None:
    """Raise :class:`ClassifierFileError` when ``path`` does not match its recorded SHA-256.

    A state without a record (written before records were kept, or by a run killed between the
    two renames: the state itself is complete then) is loaded with a warning."""
    path, record = Path(path), checksum_path(path)
    if not record.is_file():
        logger.warning(
            "classifier resume state %s has no recorded checksum (%s): its contents are not verified", path, record.name
        )
        return
    fields = record.read_text(encoding="utf-8").split()
    if not fields or file_sha256(path) != fields[0]:
        raise ClassifierFileError(
            f"classifier resume state {path} does not match its recorded SHA-256 in {record.name} (changed or "
            f"corrupted after it was written); delete both files to resume from the previous state"
        )


def resume_states(output_dir: PathLike) -> List[Tuple[int, Path]]:
    """(epoch, path) of every resume state in ``output_dir``, oldest first."""
    directory = Path(output_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / name) for name in os.listdir(directory) if (m := _STATE_NAME.match(name))]
    return sorted(found)


def latest_resume_state(output_dir: PathLike) -> Optional[Path]:
    found = resume_states(output_dir)
    return found[-1][1] if found else None


def read_resume_state(path: PathLike) -> Dict[str, Any]:
    """A classifier training resume state, checked against its SHA-256 and read weights-only;
    errors name the file and say why."""
    if Path(path).is_file():
        verify_resume_state(path)
    try:
        state = load_weights_only(path, "classifier resume state")
    except WeightsError as error:
        raise ClassifierFileError(str(error)) from error.__cause__
    if not isinstance(state, Mapping):
        raise ClassifierFileError(f"classifier resume state {path} holds a {type(state).__name__}, not a dict")
    missing = [key for key in RESUME_STATE_KEYS if key not in state]
    if missing:
        raise ClassifierFileError(f"classifier resume state {path} lacks the entries {missing}")
    return dict(state)


def set_aside_resume_states(output_dir: PathLike) -> Optional[Path]:
    """Rename ``checkpoints/`` to ``checkpoints.replaced-<n>`` when it holds resume states (a run
    that starts over must not count an earlier run's states in its retention, nor resume from them
    later); returns the new name, or None when there was nothing to set aside. Nothing is deleted."""
    if not resume_states(output_dir):
        return None
    directory = Path(output_dir) / CHECKPOINT_DIR
    n = 1
    while directory.with_name(f"{CHECKPOINT_DIR}.replaced-{n}").exists():
        n += 1
    target = directory.with_name(f"{CHECKPOINT_DIR}.replaced-{n}")
    os.rename(directory, target)
    return target


def write_resume_state(output_dir: PathLike, state: Mapping[str, Any], keep: int) -> Path:
    """Write ``state`` (all of ``RESUME_STATE_KEYS``) as the state after ``state["epoch"]``
    atomically, then delete the older states the retention policy does not keep."""
    missing = [key for key in RESUME_STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"a classifier resume state needs the entries {missing}")
    path = resume_state_path(output_dir, state["epoch"])
    # A record left by an earlier state of this name must not outlive it (a crash before the new
    # record is written then leaves an unverified state, not a false mismatch).
    checksum_path(path).unlink(missing_ok=True)
    atomic_torch_save(dict(state), path)
    atomic_write_text(checksum_path(path), f"{file_sha256(path)}  {path.name}\n")
    found = dict(resume_states(output_dir))
    retention = CheckpointManager(Path(output_dir) / CHECKPOINT_DIR, keep_last=int(keep))
    for epoch in retention.to_delete(list(found)):
        found[epoch].unlink()
        checksum_path(found[epoch]).unlink(missing_ok=True)
    return path
