"""Worker for tests/test_distributed_training.py: a few SSL steps on fixed global batches.

    python tests/distributed_equivalence_worker.py OUT            # one process
    torchrun --nproc_per_node=2 tests/distributed_equivalence_worker.py OUT

Every rank takes its share of the same global batch of 4 images (crops and iBOT masks built
from a fixed seed), so 1 and 2 ranks must give the same losses. All loss terms are on (DINO,
iBOT, KoLeo across ranks), with both teacher centerings; the Sinkhorn-Knopp run also has
BatchNorm in the (shared) head, whose statistics must span both ranks. Writes ``OUT/losses_<world>.json``;
the 2-rank run also writes a checkpoint, the config and the live teacher's features on a
fixed input for the consolidation test.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_helpers import TINY_MODEL  # noqa: E402

from dinov2 import distributed  # noqa: E402
from dinov2.checkpoint import CheckpointManager, ModelOptimizerState, RNGState, seed_all  # noqa: E402
from dinov2.fsdp import shard_ssl_meta_arch, should_shard  # noqa: E402
from dinov2.train.ssl_meta_arch import SSLMetaArch  # noqa: E402
from dinov2.utils.config import load_config, save_config  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 4


def global_batch(step: int):
    generator = torch.Generator().manual_seed(1000 + step)
    global_crops = torch.randn(2, GLOBAL_BATCH, 3, 16, 16, generator=generator)
    local_crops = torch.randn(2, GLOBAL_BATCH, 3, 8, 8, generator=generator)
    masks = torch.rand(2, GLOBAL_BATCH, 16, generator=generator) < 0.3
    masks[:, :, 0] = True  # every crop has a masked patch
    return global_crops, local_crops, masks


def rank_batch(global_crops, local_crops, masks):
    """This rank's images, collated like dinov2.data.collate (crop-major)."""
    world, rank = distributed.get_world_size(), distributed.get_rank()
    per_rank = GLOBAL_BATCH // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    global_crops, local_crops = global_crops[:, mine].flatten(0, 1), local_crops[:, mine].flatten(0, 1)
    masks = masks[:, mine].flatten(0, 1)
    mask_indices = masks.flatten().nonzero().flatten()
    weights = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    return {
        "collated_global_crops": global_crops,
        "collated_local_crops": local_crops,
        "collated_masks": masks,
        "mask_indices_list": mask_indices,
        "n_masked_patches": torch.tensor(mask_indices.numel()),
        "masks_weight": weights,
    }


def run(cfg, out: Path, save: bool):
    seed_all(0)
    model = SSLMetaArch(cfg)
    assert model.koleo_loss.distributed  # dino.koleo_distributed (default): neighbours in the global batch
    model.train()
    if should_shard(cfg):
        shard_ssl_meta_arch(model, cfg)
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-3, weight_decay=0.04)
    history = []
    for step in range(STEPS):
        data = rank_batch(*global_batch(step))
        optimizer.zero_grad(set_to_none=True)
        losses = model.forward_backward(data, teacher_temp=0.07)
        norm = torch.nn.utils.clip_grad_norm_(model.student.parameters(), 3.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        model.update_teacher(0.9)
        names = sorted(losses)
        stacked = distributed.all_reduce_mean(torch.stack([losses[n].float() for n in names]))
        record = dict(zip(names, stacked.tolist()))
        record["grad_norm"] = float(norm)
        history.append(record)
    if save:
        save_config(cfg, out) if distributed.is_main_process() else None
        manager = CheckpointManager(out / "checkpoints")
        manager.save(
            STEPS, {"train": ModelOptimizerState(model, optimizer), "extra": {"iteration": STEPS}, "rng": RNGState(0)}
        )
        images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            features = model.teacher["backbone"](images)
        if distributed.is_main_process():
            torch.save(features, out / "teacher_features.pt")
    return history


def main():
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    distributed.enable("gloo")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for centering in ("centering", "sinkhorn_knopp"):
        head_bn = ["dino.head_use_bn=true"] if centering == "sinkhorn_knopp" else []
        cfg = load_config(None, TINY_MODEL + [f"train.centering={centering}"] + head_bn)
        results[centering] = run(cfg, out, save=centering == "centering" and distributed.get_world_size() > 1)
    if distributed.is_main_process():
        (out / f"losses_{distributed.get_world_size()}.json").write_text(json.dumps(results, indent=1))
    distributed.disable()


if __name__ == "__main__":
    main()
