"""Reading a DCP checkpoint's ``.metadata`` without running code from the checkpoint directory.

torch.distributed.checkpoint writes ``.metadata`` with :mod:`pickle`, and its
``FileSystemReader.read_metadata`` reads it back with a plain ``pickle.load``: a planted
``.metadata`` runs whatever it names (``os.system``, ``builtins.exec``, ...) the moment a
checkpoint directory is resumed from, initialised from or consolidated. Every reader in this
project therefore goes through :class:`SafeFileSystemReader`, whose unpickler only resolves the
globals that DCP metadata is made of:

* the dataclasses of ``torch.distributed.checkpoint.metadata`` (``Metadata``,
  ``TensorStorageMetadata``, ``ChunkStorageMetadata``, ...) and the file reader's ``_StorageInfo``;
* ``torch.Size`` and the ``torch`` dtypes, and ``torch.serialization._get_layout`` (how a
  ``torch.layout`` such as ``torch.strided`` pickles: a lookup by name in torch's own layouts);
* ``pathlib`` paths (``StorageMeta.checkpoint_id`` is the path the checkpoint was written to).

This is the complete list found in the metadata of single-process and 2-rank FSDP2 (sharded
DTensor) training checkpoints written by torch 2.14. Lists, dicts, tuples, strings and numbers
are pickle opcodes of their own (protocol 4), so no ``builtins`` global is admitted. Anything
else is refused before it is called: :class:`CheckpointError` names the file and the global.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Union

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .errors import CheckpointError

__all__ = ["METADATA_FILE", "SafeFileSystemReader", "read_metadata"]

PathLike = Union[str, os.PathLike]
METADATA_FILE = ".metadata"

_ALLOWED_GLOBALS = frozenset(
    [
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "StorageMeta",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    ]
    + [
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
    ]
    + [("pathlib", name) for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")]
)


def _is_allowed(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED_GLOBALS:
        return True
    # torch.float32, torch.bfloat16, ...: a dtype pickles as the global that names it.
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if not _is_allowed(module, name):
            raise CheckpointError(
                f"refusing to read {self.source}: it asks to unpickle the global {module}.{name}, which DCP "
                "checkpoint metadata never contains (unpickling it could run code from the checkpoint "
                "directory); nothing from it was run. Only load checkpoints you or your jobs wrote."
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"refusing to read {self.source}: DCP metadata has no persistent ids, found {pid!r}")


def _load_metadata(file, source: str) -> Metadata:
    try:
        metadata = _MetadataUnpickler(file, source).load()
    except CheckpointError:
        raise
    except Exception as error:  # truncated or foreign file: UnpicklingError, EOFError, ValueError, ...
        raise CheckpointError(f"cannot read {source} as DCP checkpoint metadata: {error!r}") from error
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{source} holds a {type(metadata).__name__}, not DCP checkpoint metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is unpickled with the allow-list above.

    Give it to ``dcp.load(..., storage_reader=SafeFileSystemReader(path))``: the shards themselves
    are read by DCP with ``torch.load(weights_only=True)`` already, and non-tensor entries by
    :class:`~dinov2.checkpoint.WeightsOnlyLoadPlanner`.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Same steps as FileSystemReader.read_metadata (torch 2.14), with the restricted unpickler.
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _load_metadata(stream, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(checkpoint: PathLike) -> Metadata:
    """The DCP metadata of checkpoint directory ``checkpoint``, read without running its code."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / METADATA_FILE).is_file():
        raise CheckpointError(f"{checkpoint} is not a DCP checkpoint: {checkpoint / METADATA_FILE} does not exist")
    return SafeFileSystemReader(str(checkpoint)).read_metadata()
