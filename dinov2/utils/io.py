"""Atomic file writes: readers see the old file or the new one, never half of one.

A write that fails part-way leaves no temporary file behind, and a full disk is reported as
``OSError(ENOSPC)`` naming the file (torch's own message for it is
``enforce fail at inline_container.cc:... unexpected pos N vs M``).
"""

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

PathLike = Union[str, os.PathLike]

# How torch's zip writer (caffe2/serialize/inline_container.cc, used by torch.save on a path)
# reports a failed write: "unexpected pos N vs M" after a short write, "basic_ios::clear: iostream
# error" when its std::ofstream fails on flush. Neither keeps errno; a full disk is by far the
# usual cause.
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "basic_ios::clear")
# How safetensors (Rust std::io) reports ENOSPC.
_RUST_NO_SPACE = ("StorageFull", "No space left on device")


def _free_space(path: Path) -> str:
    for directory in (path.parent, *path.parents):
        try:
            return f"{shutil.disk_usage(directory).free / 2**30:.2f} GiB free on {directory}"
        except OSError:
            continue
    return "free space unknown"


def disk_full_error(error: BaseException, path: PathLike) -> Optional[OSError]:
    """An ``OSError(ENOSPC)`` that names ``path`` when ``error`` is what a full disk (or an
    exceeded quota) looks like while writing it, else ``None``."""
    path = Path(path)
    text = str(error)
    detail = ""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on device" if error.errno == errno.ENOSPC else "disk quota exceeded"
    elif isinstance(error, RuntimeError) and any(mark in text for mark in _TORCH_SHORT_WRITE):
        reason = "no space left on device (or quota exceeded)"
        detail = f" (torch's file writer stopped part-way: {text.strip().splitlines()[0]})"
    elif any(mark in text for mark in _RUST_NO_SPACE):
        reason = "no space left on device"
    else:
        return None
    return OSError(errno.ENOSPC, f"{reason} while writing {path}{detail}; {_free_space(path)}", str(path))


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed over it when the block succeeds.

    The temporary file lives in the same directory, so the rename is atomic on POSIX; on an
    error it is removed and ``path`` keeps its previous content. A full disk is re-raised as
    :func:`disk_full_error` (``OSError(ENOSPC)`` naming ``path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as error:
        full = disk_full_error(error, path)
        if full is not None:
            raise full from error
        raise
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj, path: PathLike) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
