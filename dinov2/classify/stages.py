"""The training plan of a classifier run: which stage each epoch is in, and what each stage trains.

``optim.mode`` ``probe``, ``partial`` and ``full`` are one stage over all epochs; ``lpft`` is a
``probe`` stage of ``lpft.probe_epochs`` epochs (possibly none) followed by a ``lora`` stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from omegaconf import DictConfig

from .heads import MultiHeadClassifier

STAGES = ("probe", "partial", "full", "lora")


@dataclass(frozen=True)
class Stage:
    name: str  # one of STAGES
    first_epoch: int
    epochs: int


def plan_stages(cfg: DictConfig) -> List[Stage]:
    """The stages of ``optim.mode`` over ``optim.epochs``, in order."""
    mode, epochs = cfg.optim.mode, cfg.optim.epochs
    if mode != "lpft":
        return [Stage(mode, 0, epochs)]
    stages = []
    if cfg.lpft.probe_epochs:
        stages.append(Stage("probe", 0, cfg.lpft.probe_epochs))
    stages.append(Stage("lora", cfg.lpft.probe_epochs, epochs - cfg.lpft.probe_epochs))
    return stages


def stage_of(stages: Sequence[Stage], epoch: int) -> Stage:
    for stage in stages:
        if stage.first_epoch <= epoch < stage.first_epoch + stage.epochs:
            return stage
    raise IndexError(f"epoch {epoch} is outside the training plan")


def set_trainable(model: MultiHeadClassifier, stage: str, unfreeze_last_k: int = 0) -> None:
    """requires_grad for a stage: heads always; backbone all, last k blocks, adapters or none."""
    backbone = model.backbone
    for name, param in backbone.named_parameters():
        if stage == "full":
            param.requires_grad = True
        elif stage == "lora":
            param.requires_grad = "lora_" in name
        else:
            param.requires_grad = False
    if stage == "partial":
        blocks = getattr(backbone, "blocks", None)
        if blocks is None or not 0 < unfreeze_last_k <= len(blocks):
            raise ValueError(
                f"optim.unfreeze_last_k={unfreeze_last_k} but the backbone has "
                f"{'no blocks' if blocks is None else f'{len(blocks)} blocks'}"
            )
        for block in list(blocks)[-unfreeze_last_k:]:
            block.requires_grad_(True)
        norm = getattr(backbone, "norm", None)
        if norm is not None:
            norm.requires_grad_(True)
    for param in model.heads.parameters():
        param.requires_grad = True
