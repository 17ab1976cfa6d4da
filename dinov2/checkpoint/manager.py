"""Sharded, atomic training checkpoints with retention, through torch.distributed.checkpoint.

Layout under ``directory``::

    ckpt_00001000/            one complete checkpoint (DCP: .metadata + one __<rank>_0.distcp per rank)
        COMPLETE              JSON written last: iteration, world size, every file with its size
    .tmp_ckpt_00002000/       a checkpoint being written (never read)

Every rank writes its own shards into the temporary directory; after a barrier rank 0 records
the file sizes in ``COMPLETE`` and renames the directory. A checkpoint counts only when its name
is ``ckpt_<8 digits>``, ``COMPLETE`` is there and every listed file has its recorded size, so a
crash mid-write or a truncated file is skipped (with a warning) by :meth:`CheckpointManager.latest`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from dinov2 import distributed

from .state import WeightsOnlyLoadPlanner

logger = logging.getLogger("dinov2")

PathLike = Union[str, os.PathLike]
MARKER = "COMPLETE"
_NAME = re.compile(r"^ckpt_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the state it is loaded into."""


def checkpoint_name(iteration: int) -> str:
    return f"ckpt_{int(iteration):08d}"


def validate_checkpoint(path: PathLike) -> Optional[str]:
    """``None`` when ``path`` is a complete checkpoint, else the reason it is not."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (write interrupted)"
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        files = dict(info["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {MARKER} marker: {error}"
    if ".metadata" not in files:
        return "no DCP .metadata file recorded"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"file {name} is missing"
        actual = file.stat().st_size
        if actual != int(size):
            return f"file {name} has {actual} bytes, {size} were written (truncated?)"
    return None


def read_checkpoint_info(path: PathLike) -> Dict[str, Any]:
    """The ``COMPLETE`` marker of a checkpoint (iteration, world_size, files, time)."""
    path = Path(path)
    problem = validate_checkpoint(path)
    if problem:
        raise CheckpointError(f"{path} is not a complete checkpoint: {problem}")
    return json.loads((path / MARKER).read_text(encoding="utf-8"))


def checkpoint_keys(path: PathLike) -> List[str]:
    """Flattened keys stored in a DCP checkpoint (``model.student.backbone.cls_token``, ...)."""
    return sorted(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def _write_json_atomic(path: Path, payload: Mapping) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' single-process use even with no_dist=True; here it is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    """Save, find and load sharded checkpoints in one directory.

    Args:
        directory: where ``ckpt_<iter>`` directories live (e.g. ``<output_dir>/checkpoints``).
        keep_last: keep the newest K complete checkpoints (``<= 0``: keep all).
        keep_every: also keep every checkpoint whose iteration is a multiple of M (0: none).

    All ranks must call :meth:`save`, :meth:`latest` and :meth:`load` together.
    """

    def __init__(self, directory: PathLike, keep_last: int = 3, keep_every: int = 0):
        if keep_every < 0:
            raise ValueError(f"keep_every must be >= 0, got {keep_every}")
        self.directory = Path(directory)
        self.keep_last = int(keep_last)
        self.keep_every = int(keep_every)

    # ------------------------------------------------------------------ discovery
    def _scan(self, warn: bool) -> Tuple[List[Tuple[int, Path]], List[Tuple[Path, str]]]:
        complete, broken = [], []
        if not self.directory.is_dir():
            return complete, broken
        for entry in sorted(self.directory.iterdir()):
            match = _NAME.match(entry.name)
            if not match:
                continue
            problem = validate_checkpoint(entry)
            if problem:
                broken.append((entry, problem))
            else:
                complete.append((int(match.group(1)), entry))
        if warn:
            for entry, problem in broken:
                message = f"skipping incomplete checkpoint {entry}: {problem}"
                logger.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=3)
        complete.sort()
        return complete, broken

    def complete_checkpoints(self) -> List[Tuple[int, Path]]:
        """(iteration, path) of every complete checkpoint, oldest first (no collective)."""
        return self._scan(warn=False)[0]

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or None. Rank 0 decides; every rank gets its answer."""
        found: Optional[str] = None
        if distributed.is_main_process():
            complete, _ = self._scan(warn=True)
            found = str(complete[-1][1]) if complete else None
        found = distributed.broadcast_object(found)
        return Path(found) if found else None

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, app_state: Mapping[str, Any]) -> Path:
        """Write ``app_state`` as ``ckpt_<iteration>``; returns its path once complete on all ranks."""
        iteration = int(iteration)
        final = self.directory / checkpoint_name(iteration)
        tmp = self.directory / f".tmp_{checkpoint_name(iteration)}"
        start = time.perf_counter()
        if distributed.is_main_process():
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left over by a run that died while writing this iteration
                shutil.rmtree(tmp)
            tmp.mkdir()
        distributed.barrier()

        state = {key: (value.state_dict() if hasattr(value, "state_dict") else value) for key, value in app_state.items()}
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not distributed.is_enabled())
        distributed.barrier()  # every rank's shards are on disk

        if distributed.is_main_process():
            files = {f.name: f.stat().st_size for f in tmp.iterdir() if f.is_file()}
            _write_json_atomic(
                tmp / MARKER,
                {
                    "iteration": iteration,
                    "world_size": distributed.get_world_size(),
                    "files": files,
                    "time": time.time(),
                },
            )
            _fsync_dir(tmp)
            if final.exists():  # e.g. a stop signal right after resuming from this very iteration
                old = self.directory / f".old_{checkpoint_name(iteration)}"
                if old.exists():
                    shutil.rmtree(old)
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.directory)
            self.apply_retention()
            logger.info("saved checkpoint %s in %.2f s", final, time.perf_counter() - start)
        distributed.barrier()
        return final

    def to_delete(self, iterations: List[int]) -> List[int]:
        """Which of these (complete) iterations the retention policy removes."""
        ordered = sorted(iterations)
        if self.keep_last <= 0:
            return []
        keep = set(ordered[-self.keep_last :])
        if self.keep_every > 0:
            keep.update(i for i in ordered if i % self.keep_every == 0)
        return [i for i in ordered if i not in keep]

    def apply_retention(self) -> List[Path]:
        """Delete complete checkpoints the policy does not keep (rank 0 only); returns them."""
        complete = dict(self.complete_checkpoints())
        removed = []
        for iteration in self.to_delete(list(complete)):
            path = complete[iteration]
            # Rename first so that a crash mid-delete cannot leave a half-deleted "ckpt_" directory.
            doomed = path.with_name(f".del_{path.name}")
            os.rename(path, doomed)
            shutil.rmtree(doomed)
            removed.append(path)
        for stale in self.directory.glob(".del_ckpt_*"):
            shutil.rmtree(stale, ignore_errors=True)
        return removed

    # ------------------------------------------------------------------ load
    def load(self, path: PathLike, app_state: Mapping[str, Any]) -> Dict[str, Any]:
        """Load checkpoint ``path`` into ``app_state`` in place; returns its ``COMPLETE`` info.

        ``Stateful`` entries get ``load_state_dict`` called; plain dicts are filled in place.
        Every requested key must be in the checkpoint (``CheckpointError`` otherwise), except
        per-rank entries that an object's ``template_for_load`` declines (see ``RNGState``).
        """
        path = Path(path)
        info = read_checkpoint_info(path)
        available = checkpoint_keys(path)
        state: Dict[str, Any] = {}
        for key, value in app_state.items():
            if hasattr(value, "template_for_load"):
                try:
                    state[key] = value.template_for_load(available, key, info["iteration"])
                except ValueError as error:
                    raise CheckpointError(f"cannot load checkpoint {path} ('{key}'): {error}") from error
            elif hasattr(value, "state_dict"):
                state[key] = value.state_dict()
            else:
                state[key] = value
        try:
            with _quiet_single_process():
                dcp.load(
                    state,
                    checkpoint_id=str(path),
                    planner=WeightsOnlyLoadPlanner(),
                    no_dist=not distributed.is_enabled(),
                )
        except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
            raise CheckpointError(f"cannot load checkpoint {path}: {error}") from error
        for key, value in app_state.items():
            if hasattr(value, "load_state_dict"):
                value.load_state_dict(state[key])
        logger.info("loaded checkpoint %s (iteration %d, saved by %d ranks)", path, info["iteration"], info["world_size"])
        return info
