"""Sharded, atomic training checkpoints with retention, through torch.distributed.checkpoint.

Layout under ``directory``::

    ckpt_00001000/            one complete checkpoint (DCP: .metadata + one __<rank>_0.distcp per rank)
        COMPLETE              JSON written last: iteration, world size, every file with its size and SHA-256
    .tmp_ckpt_00002000/       a checkpoint being written (never read)

Every rank writes its own shards into the temporary directory and hashes them; after a barrier
rank 0 records sizes and checksums in ``COMPLETE`` and renames the directory. A checkpoint counts
only when its name is ``ckpt_<8 digits>``, ``COMPLETE`` is there and every listed file has its
recorded size, so a crash mid-write or a truncated file is skipped (with a warning) by
:meth:`CheckpointManager.latest`. The checksums are verified once per selection, for the
checkpoint about to be loaded (hashing every kept checkpoint on each scan would read gigabytes):
a file changed in place (same size) makes :meth:`~CheckpointManager.latest` fall back to the next
older checkpoint, with a warning naming the file. Checkpoints written before checksums were
recorded load with a note that their contents are not verified.

``.metadata`` is read only through :mod:`dinov2.checkpoint.metadata` (a restricted unpickler), and
a failed write (a full disk included) removes the temporary directory and names the cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from dinov2 import distributed
from dinov2.utils.io import disk_full_error

from .errors import CheckpointError
from .metadata import METADATA_FILE, SafeFileSystemReader, read_metadata
from .state import WeightsOnlyLoadPlanner

logger = logging.getLogger("dinov2")

PathLike = Union[str, os.PathLike]
MARKER = "COMPLETE"
_NAME = re.compile(r"^ckpt_(\d{8})$")
_RANK_FILE = re.compile(r"^__(\d+)_")  # DCP names rank r's shard files __<r>_<n>.distcp
_HASH_CHUNK = 8 << 20


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
    if METADATA_FILE not in files:
        return f"no DCP {METADATA_FILE} file recorded"
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


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks (checkpoint shards can be gigabytes)."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def _hashed_by(name: str, world_size: int) -> int:
    """The rank that hashes file ``name``: the writer of a ``__<r>_*`` shard, rank 0 for the rest."""
    match = _RANK_FILE.match(name)
    owner = int(match.group(1)) if match else 0
    return owner if owner < world_size else 0


def verify_checksums(path: PathLike, rank: int = 0, world_size: int = 1) -> Optional[str]:
    """``None`` when every file of complete checkpoint ``path`` has its recorded SHA-256, else
    the reason it has not. A marker without checksums (written before they were recorded) passes,
    with a logged note that the contents were not verified. With ``world_size > 1`` only the
    files that rank ``rank`` hashes are checked (see :meth:`CheckpointManager.latest`)."""
    path = Path(path)
    info = json.loads((path / MARKER).read_text(encoding="utf-8"))
    checksums = info.get("sha256")
    if not isinstance(checksums, dict):
        if rank == 0:
            logger.warning(
                "%s was written before checkpoints recorded checksums: its sizes are checked, its contents are not",
                path,
            )
        return None
    for name in info["files"]:
        if _hashed_by(name, world_size) != rank:
            continue
        if name not in checksums:
            return f"file {name} has no recorded checksum"
        if file_sha256(path / name) != checksums[name]:
            return f"file {path / name} does not match its recorded SHA-256 (changed or corrupted after it was written)"
    return None


def checkpoint_keys(path: PathLike) -> List[str]:
    """Flattened keys stored in a DCP checkpoint (``model.student.backbone.cls_token``, ...)."""
    return sorted(read_metadata(path).state_dict_metadata)


def _write_json_atomic(path: Path, payload: Mapping) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _save_failure(final: Path, tmp: Path, error: BaseException) -> str:
    """Why writing checkpoint ``final`` failed, a full disk said in plain words."""
    causes = [error]
    if isinstance(error, CheckpointException):  # DCP wraps each rank's exception
        causes += [exc for exc, _ in error.failures.values()]
    for cause in causes:
        full = disk_full_error(cause, tmp)
        if full is not None:
            return f"cannot write checkpoint {final}: {full.strerror}; the partial checkpoint was removed"
    if isinstance(error, CheckpointException):
        detail = "; ".join(f"rank {rank}: {exc!r}" for rank, (exc, _) in sorted(error.failures.items()))
    else:
        detail = repr(error)
    return f"cannot write checkpoint {final}: {detail}; the partial checkpoint was removed"


def _shard_checksums(tmp: Path) -> Dict[str, str]:
    """SHA-256 of the files in ``tmp``: every rank hashes the shards it wrote (in parallel, while
    they are likely still in its page cache), rank 0 also ``.metadata`` and anything else."""
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    own = {
        f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file() and _hashed_by(f.name, world_size) == rank
    }
    if not distributed.is_enabled():
        return own
    gathered: List[Optional[Dict[str, str]]] = [None] * world_size
    dist.all_gather_object(gathered, own)
    return {name: digest for part in gathered for name, digest in (part or {}).items()}


def _write_marker(tmp: Path, final: Path, iteration: int, checksums: Mapping[str, str]) -> Optional[str]:
    """Write ``COMPLETE`` into ``tmp`` (rank 0); on failure remove ``tmp`` and return why."""
    try:
        files = {f.name: f.stat().st_size for f in tmp.iterdir() if f.is_file()}
        digests = {name: checksums.get(name) or file_sha256(tmp / name) for name in files}
        _write_json_atomic(
            tmp / MARKER,
            {
                "iteration": iteration,
                "world_size": distributed.get_world_size(),
                "files": files,
                "sha256": digests,
                "time": time.time(),
            },
        )
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        return _save_failure(final, tmp, error)
    return None


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' single-process use even with no_dist=True; here it is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        yield


def _describe_mismatch(state: Mapping[str, Any], metadata: Metadata, owned_prefixes: Mapping[str, str]) -> str:
    """Every key of ``state`` (flattened as DCP does) missing from the checkpoint or stored with
    another shape, and every checkpoint key under an owned prefix (``{prefix: what they are}``)
    that ``state`` lacks; one indented line each, empty when all fit."""
    flat, _ = flatten_state_dict(dict(state))
    stored = metadata.state_dict_metadata
    missing, reshaped = [], []
    for key, value in sorted(flat.items()):
        meta = stored.get(key)
        if meta is None:
            missing.append(key)
        elif isinstance(value, torch.Tensor) != isinstance(meta, TensorStorageMetadata):
            stored_as = "a tensor" if isinstance(meta, TensorStorageMetadata) else "a non-tensor value"
            reshaped.append(f"{key}: checkpoint holds {stored_as}, this run a {type(value).__name__}")
        elif isinstance(value, torch.Tensor) and tuple(meta.size) != tuple(value.shape):  # DTensor: global shape
            reshaped.append(f"{key}: checkpoint {tuple(meta.size)} vs this run {tuple(value.shape)}")
    sections = []
    if missing:
        sections.append(f"  {len(missing)} entries this run needs are missing from the checkpoint:")
        sections += [f"    {key}" for key in missing]
    for prefix, what in owned_prefixes.items():
        unexpected = sorted(key for key in stored if key.startswith(prefix) and key not in flat)
        if unexpected:
            sections.append(f"  {len(unexpected)} {what} (in the checkpoint, unexpected here):")
            sections += [f"    {key}" for key in unexpected]
    if reshaped:
        sections.append(f"  {len(reshaped)} entries with another shape:")
        sections += [f"    {line}" for line in reshaped]
    return "\n".join(sections)


def _warn(message: str) -> None:
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


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
        # checkpoint path -> its COMPLETE marker text when its checksums were last verified
        # here, so that the checkpoint latest() picked is not hashed a second time by load().
        self._verified: Dict[str, str] = {}

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
                _warn(f"skipping incomplete checkpoint {entry}: {problem}")
        complete.sort()
        return complete, broken

    def complete_checkpoints(self) -> List[Tuple[int, Path]]:
        """(iteration, path) of every complete checkpoint, oldest first (no collective)."""
        return self._scan(warn=False)[0]

    def newest_verified(self) -> Optional[Path]:
        """The newest complete checkpoint whose files match their checksums, or None (no
        collective). Incomplete and corrupted ones are skipped with a warning naming the file;
        only the candidates are hashed, newest first, until one passes."""
        complete, _ = self._scan(warn=True)
        for _, path in reversed(complete):
            problem = self._verify_once(path)
            if problem is None:
                return path
            _warn(f"skipping corrupted checkpoint {path}: {problem}")
        return None

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint whose files match their checksums, or None, on every
        rank (as :meth:`newest_verified`, with the hashing shared: each rank checks the shards it
        would have written, so a resume costs one shard's hashing, not the whole checkpoint's)."""
        candidates: Optional[List[str]] = None
        if distributed.is_main_process():
            complete, _ = self._scan(warn=True)
            candidates = [str(path) for _, path in reversed(complete)]
        for candidate in distributed.broadcast_object(candidates):
            problem = self._verify_collectively(Path(candidate))
            if problem is None:
                return Path(candidate)
            if distributed.is_main_process():
                _warn(f"skipping corrupted checkpoint {candidate}: {problem}")
        return None

    def _verify_once(self, path: Path) -> Optional[str]:
        """:func:`verify_checksums` in this process, skipped when it passed here already."""
        marker = (path / MARKER).read_text(encoding="utf-8")
        if self._verified.get(str(path)) == marker:
            return None
        problem = verify_checksums(path)
        if problem is None:
            self._verified[str(path)] = marker
        return problem

    def _verify_collectively(self, path: Path) -> Optional[str]:
        """:func:`verify_checksums` shared by all ranks (all call it), skipped when it passed already."""
        if not distributed.is_enabled():
            return self._verify_once(path)
        marker = (path / MARKER).read_text(encoding="utf-8")
        done = distributed.broadcast_object(self._verified.get(str(path)) == marker)
        if done:
            return None
        own = verify_checksums(path, distributed.get_rank(), distributed.get_world_size())
        problems: List[Optional[str]] = [None] * distributed.get_world_size()
        dist.all_gather_object(problems, own)
        problem = next((p for p in problems if p), None)
        if problem is None:
            self._verified[str(path)] = marker
        return problem

    @staticmethod
    def _load_templates(path: Path, app_state: Mapping[str, Any], iteration: int, metadata: Metadata):
        """(the state ``dcp.load`` fills, why this rank's part does not fit the checkpoint or None)."""
        available = sorted(metadata.state_dict_metadata)
        state: Dict[str, Any] = {}
        refused: List[str] = []
        for key, value in app_state.items():  # every entry, so that every rank makes the same calls
            if hasattr(value, "template_for_load"):
                try:
                    state[key] = value.template_for_load(available, key, iteration)
                except ValueError as error:
                    refused.append(f"cannot load checkpoint {path} ('{key}'): {error}")
            elif hasattr(value, "state_dict"):
                state[key] = value.state_dict()
            else:
                state[key] = value
        if refused:
            return state, "\n".join(refused)
        owned: Dict[str, str] = {}
        for key, value in app_state.items():
            if hasattr(value, "owned_prefixes"):
                owned.update(value.owned_prefixes(key))
        mismatch = _describe_mismatch(state, metadata, owned)
        if mismatch:
            return state, (
                f"checkpoint {path} does not fit the state it is loaded into (checked against its "
                f"{METADATA_FILE}; nothing was loaded):\n{mismatch}"
            )
        return state, None

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, app_state: Mapping[str, Any], protect: Iterable[int] = ()) -> Path:
        """Write ``app_state`` as ``ckpt_<iteration>``; returns its path once complete on all ranks.

        ``protect``: iterations whose checkpoints retention must keep after this save (the
        trainer's last checkpoint written before non-finite steps, see :meth:`to_delete`).
        """
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

        state = {
            key: (value.state_dict() if hasattr(value, "state_dict") else value) for key, value in app_state.items()
        }
        try:
            with _quiet_single_process():
                dcp.save(state, checkpoint_id=str(tmp), no_dist=not distributed.is_enabled())
        except (Exception, CheckpointException) as error:  # every rank gets it: DCP gathers the write results
            if distributed.is_main_process():
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(_save_failure(final, tmp, error)) from error
        distributed.barrier()  # every rank's shards are on disk
        checksums = _shard_checksums(tmp)

        failure: Optional[str] = None
        if distributed.is_main_process():
            failure = _write_marker(tmp, final, iteration, checksums)
        failure = distributed.broadcast_object(failure)  # raised on every rank: none waits for rank 0
        if failure:
            raise CheckpointError(failure)
        if distributed.is_main_process():
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
            self.apply_retention(protect)
            logger.info("saved checkpoint %s in %.2f s", final, time.perf_counter() - start)
        distributed.barrier()
        return final

    def to_delete(self, iterations: List[int], protect: Iterable[int] = ()) -> List[int]:
        """Which of these (complete) iterations the retention policy removes.

        Kept: the newest ``keep_last``, every multiple of ``keep_every`` and every iteration in
        ``protect`` (a known-good state that newer, possibly damaged, checkpoints must not push out).
        """
        ordered = sorted(iterations)
        if self.keep_last <= 0:
            return []
        keep = set(ordered[-self.keep_last :]) | {int(i) for i in protect}
        if self.keep_every > 0:
            keep.update(i for i in ordered if i % self.keep_every == 0)
        return [i for i in ordered if i not in keep]

    def apply_retention(self, protect: Iterable[int] = ()) -> List[Path]:
        """Delete complete checkpoints the policy does not keep (rank 0 only); returns them."""
        complete = dict(self.complete_checkpoints())
        removed = []
        for iteration in self.to_delete(list(complete), protect):
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
        Every requested key must be in the checkpoint with the same shape, except per-rank
        entries that an object's ``template_for_load`` declines (see ``RNGState``), and every
        checkpoint key under an object's ``owned_prefixes`` must be requested (see
        ``ModelOptimizerState``). This is checked against the checkpoint's metadata before
        anything is read: one ``CheckpointError`` lists every missing, unexpected and mis-shaped key.
        The files are verified against their checksums first (unless :meth:`latest` just did).
        """
        path = Path(path)
        info = read_checkpoint_info(path)
        problem = self._verify_collectively(path)
        if problem:
            raise CheckpointError(f"cannot load checkpoint {path}: {problem}")
        metadata = read_metadata(path)
        state, problem = self._load_templates(path, app_state, info["iteration"], metadata)
        # Ranks may hold different parts of the state (distillation students on rank subsets): a
        # rank whose part does not fit must not leave the others waiting inside dcp.load.
        problems = distributed.all_gather_object(problem)
        failing = [(rank, text) for rank, text in enumerate(problems) if text]
        if len(problems) == 1 and failing:
            raise CheckpointError(failing[0][1])
        if failing:
            raise CheckpointError("\n".join(f"rank {rank}: {text}" for rank, text in failing))
        try:
            with _quiet_single_process():
                dcp.load(
                    state,
                    storage_reader=SafeFileSystemReader(str(path)),
                    planner=WeightsOnlyLoadPlanner(),
                    no_dist=not distributed.is_enabled(),
                )
        except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
            raise CheckpointError(f"cannot load checkpoint {path}: {error}") from error
        for key, value in app_state.items():
            if hasattr(value, "load_state_dict"):
                value.load_state_dict(state[key])
        logger.info(
            "loaded checkpoint %s (iteration %d, saved by %d ranks)", path, info["iteration"], info["world_size"]
        )
        return info
