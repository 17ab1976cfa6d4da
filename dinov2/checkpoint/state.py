"""What goes into a training checkpoint: model + optimizer, per-rank RNG states, safe loading.

Each entry of an ``app_state`` dict given to :class:`~dinov2.checkpoint.CheckpointManager` is
either an object with ``state_dict()`` / ``load_state_dict()`` (the DCP ``Stateful`` protocol)
or a plain dict that is filled in place on load (ints, floats, strings, lists, tensors).
"""

from __future__ import annotations

import io
import random
from typing import Any, Dict, Iterable, Optional

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dinov2 import distributed


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor entries with ``weights_only=False``, which can
    run code from the file; this one only accepts tensors and plain Python values."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class ModelOptimizerState:
    """Model (plain, FSDP2 or partly FSDP2) plus optional optimizer, by fully-qualified names.

    Uses ``torch.distributed.checkpoint.state_dict``: FSDP2 parameters come out as sharded
    DTensors and plain modules as tensors under the *same* names, so a checkpoint written by
    N ranks loads on M ranks or in a single non-FSDP process.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        owned_modules: Optional[Iterable[str]] = None,
        param_group_indices: Optional[Iterable[int]] = None,
    ):
        """Ranks that hold different parts of one checkpoint (distillation students on rank
        subsets) say which parts are theirs:

        * ``owned_modules``: the names (prefixes) of the submodules this rank holds; None: the
          whole checkpoint model is this rank's;
        * ``param_group_indices``: the checkpoint index of each of this rank's optimizer
          parameter groups, in order. ``get_state_dict`` numbers parameter groups from 0 on every
          rank, so two ranks' different groups would share a key; with the indices every group
          keeps the one it has when a single process holds all the parts.
        """
        self.model = model
        self.optimizer = optimizer
        self.owned_modules = None if owned_modules is None else list(owned_modules)
        self.param_group_indices = None if param_group_indices is None else [int(i) for i in param_group_indices]

    def state_dict(self) -> Dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        if self.param_group_indices is not None:
            groups = optim_state["param_groups"]
            if len(groups) != len(self.param_group_indices):
                raise RuntimeError(f"{len(groups)} parameter groups but {len(self.param_group_indices)} indices")
            # Flattened, {"3": group} gives the same keys as a list's element 3 (param_groups.3.*).
            optim_state["param_groups"] = {str(i): group for i, group in zip(self.param_group_indices, groups)}
        return {"model": model_state, "optimizer": optim_state}

    def template_for_load(self, available_keys: Iterable[str], prefix: str, iteration: int) -> Dict[str, Any]:
        """What to read from a checkpoint whose flattened keys are ``available_keys``.

        Model: every parameter and buffer (checkpoint keys the model lacks are reported by the
        checkpoint manager, see :meth:`owned_prefixes`). Optimizer: only the parameters that had
        optimizer state when the checkpoint was written; ``get_state_dict`` fills state for
        *every* parameter of a fresh optimizer, but a parameter without gradient so far (a frozen
        last layer, the mask token without iBOT) has none in the file, and must have none after
        loading either.
        """
        available = set(available_keys)
        template = self.state_dict()
        if self.optimizer is not None:
            state_prefix = f"{prefix}.optimizer.state."
            stored_params = {key[len(state_prefix) :] for key in available if key.startswith(state_prefix)}
            template["optimizer"]["state"] = {
                name: value
                for name, value in template["optimizer"]["state"].items()
                if any(key.startswith(name + ".") for key in stored_params)
            }
        return template

    def owned_prefixes(self, prefix: str) -> Dict[str, str]:
        """Checkpoint keys under these prefixes (with what they are) must all be loaded: one that
        the template lacks (a block of a deeper model, state of a parameter this model does not
        have) is a mismatch, not silently dropped. Without an optimizer its state is not read."""
        if self.owned_modules is not None:
            owned = {}
            for name in self.owned_modules:
                owned[f"{prefix}.model.{name}."] = f"model entries of {name} this model does not have"
                if self.optimizer is not None:
                    owned[f"{prefix}.optimizer.state.{name}."] = f"optimizer entries of {name} this optimizer lacks"
            return owned
        owned = {f"{prefix}.model.": "model entries this model does not have"}
        if self.optimizer is not None:
            owned[f"{prefix}.optimizer."] = "optimizer entries this model and optimizer do not have"
        return owned

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=True))
        else:
            set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=True))
            if self.param_group_indices is not None:
                state["optimizer"]["param_groups"] = [
                    state["optimizer"]["param_groups"][str(i)] for i in self.param_group_indices
                ]
            # Not strict: parameters without optimizer state in the file were left out on purpose
            # by template_for_load (they had no gradient yet when it was saved).
            set_optimizer_state_dict(
                self.model, self.optimizer, state["optimizer"], options=StateDictOptions(strict=False)
            )


def derive_seed(seed: int, rank: int, iteration: int) -> int:
    """A 63-bit seed that depends on all three numbers (numpy's SeedSequence mixing)."""
    words = np.random.SeedSequence([int(seed), int(rank), int(iteration)]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


def seed_all(seed: int, rank: int = 0, iteration: int = 0) -> int:
    """Seed torch (CPU and CUDA), numpy's global generator and ``random`` for one rank."""
    value = derive_seed(seed, rank, iteration)
    random.seed(value)
    np.random.seed(value % (2**32))
    torch.manual_seed(value)  # also seeds every CUDA device
    return value


def capture_rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_meta": [str(np_kind), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_meta": [int(py_version), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(distributed.get_device())
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    kind, pos, has_gauss, gauss = state["numpy_meta"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, gauss_next = state["python_meta"]
    random.setstate((int(version), tuple(int(v) for v in state["python_state"].tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu(), distributed.get_device())


class RNGState:
    """Per-rank RNG states, saved under ``rank_<r>`` so ranks never overwrite each other.

    On resume, rank ``r`` restores ``rank_<r>`` when the checkpoint has it. A rank that has no
    saved state (the run resumes on more ranks than saved it) reseeds deterministically with
    :func:`seed_all` ``(seed, rank, iteration)``. With fewer ranks, the extra saved states are
    simply not read. ``reseeded`` tells which case happened.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.reseeded = False
        self._iteration_on_load = 0

    def _key(self) -> str:
        return f"rank_{distributed.get_rank()}"

    def state_dict(self) -> Dict[str, Any]:
        return {self._key(): capture_rng_state()}

    def template_for_load(self, available_keys: Iterable[str], prefix: str, iteration: int) -> Dict[str, Any]:
        """What to ask DCP for: this rank's entry if the checkpoint holds one, else nothing."""
        self._iteration_on_load = int(iteration)
        wanted = f"{prefix}.{self._key()}."
        available = set(available_keys)
        if not any(key.startswith(wanted) for key in available):
            return {}
        template = self.state_dict()
        if f"{wanted}cuda" not in available:  # saved without CUDA (a CPU run resumed on a GPU node)
            template[self._key()].pop("cuda", None)
        return template

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        entry = state.get(self._key())
        if entry is None:
            seed_all(self.seed, distributed.get_rank(), self._iteration_on_load)
            self.reseeded = True
        else:
            restore_rng_state(entry)
            if "cuda" not in entry and torch.cuda.is_available():
                # No CUDA state was saved: seed the device as a rank without any saved state would.
                torch.cuda.manual_seed(derive_seed(self.seed, distributed.get_rank(), self._iteration_on_load))
            self.reseeded = False
