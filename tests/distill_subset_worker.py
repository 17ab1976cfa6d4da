"""Run by torchrun from tests/test_train_distill.py: distillation students on rank subsets.

``python distill_subset_worker.py <out> <override> ...`` trains, in one process group,

* ``<out>/full``: 4 iterations without interruption, counting the frozen teacher's forwards;
* ``<out>/resumed``: the same run stopped after 2 iterations, then resumed to 4;
* ``<out>/renamed``: initialised from ``full``'s checkpoint with one student renamed (refused);

and writes ``<out>/rank<r>.json`` (the students this rank trained, its teacher forwards, where the
resumed run continued from, why the renamed start was refused) for the test to check. One launch
for all of it: each start costs seconds.
"""

import json
import sys
from pathlib import Path

from train_helpers import count_forwards  # this folder is on sys.path when torchrun runs the file

from dinov2 import distributed
from dinov2.train.trainer import SSLTrainer
from dinov2.utils.config import load_config


def main(out: Path, overrides):
    full = SSLTrainer(load_config(None, [*overrides, "train.max_iterations=4"]), output_dir=out / "full")
    calls = count_forwards(full.model.frozen_teacher.backbone)
    full.train()
    SSLTrainer(load_config(None, [*overrides, "train.max_iterations=2"]), output_dir=out / "resumed").train()
    resumed = SSLTrainer(load_config(None, [*overrides, "train.max_iterations=4"]), output_dir=out / "resumed")
    resumed.train()
    # Initialised from that run's checkpoint with "narrow" renamed: refused on both ranks before
    # anything is read, although each rank would read only its own student's entries.
    renamed = [
        *overrides,
        "distillation.students=[{name: wide, student: {embed_dim: 32}, ranks: [0]},"
        " {name: renamed, student: {embed_dim: 16}, ranks: [1]}]",
        f"train.init_from_checkpoint={out / 'full' / 'checkpoints' / 'ckpt_00000004'}",
    ]
    try:
        SSLTrainer(load_config(None, renamed), output_dir=out / "renamed").resume()
        refused = None
    except ValueError as error:
        refused = str(error)
    report = {
        "students": [unit.name for unit in full.units],
        "teacher_forwards": len(calls),
        "resumed_from": resumed.resumed_from.name,
        "init_refused": refused,
    }
    (out / f"rank{distributed.get_rank()}.json").write_text(json.dumps(report))
    distributed.disable()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
