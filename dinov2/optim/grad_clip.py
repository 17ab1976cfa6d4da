"""Gradient clipping of the student before the optimizer step (``optim.clip_grad``,
``optim.clip_grad_scope``).

* ``per_module`` (default, upstream DINOv2): the backbone, the DINO head and (when separate) the
  iBOT head are each clipped to ``clip_grad`` on their own, so a gradient spike in a head does
  not shrink the backbone's update and vice versa.
* ``global``: one norm over all of the student's gradients is clipped to ``clip_grad``
  (``torch.nn.utils.clip_grad_norm_`` on ``student.parameters()``).

Both work on plain tensors and on FSDP2 DTensor gradients (the norms then span every rank's
shards, :func:`dinov2.fsdp.clip_grad_norm_`). The value returned, and logged as ``grad_norm``, is
in both cases the norm of all the student's gradients before clipping: non-finite as soon as one
gradient is, so the loop's non-finite check sees it.
"""

from __future__ import annotations

import torch
from torch import nn

from dinov2.fsdp import clip_grad_norm_

__all__ = ["CLIP_GRAD_SCOPES", "check_clip_grad_scope", "clip_gradients", "clip_student_gradients"]

CLIP_GRAD_SCOPES = ("per_module", "global")


def check_clip_grad_scope(scope: str) -> str:
    if scope not in CLIP_GRAD_SCOPES:
        raise ValueError(f"optim.clip_grad_scope must be one of {CLIP_GRAD_SCOPES}, got {scope!r}")
    return scope


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``parameters`` by their joint norm (``global`` scope; classifier
    training clips this way). Returns the norm before clipping, 0 when none has a gradient."""
    return clip_grad_norm_(parameters, max_norm)


def clip_student_gradients(student: nn.ModuleDict, max_norm: float, scope: str) -> torch.Tensor:
    """Clip the gradients of ``student`` (``backbone``, ``dino_head``[, ``ibot_head``]) in place.

    Returns:
        The norm of all the student's gradients before clipping, a plain 0-d tensor, the same on
        every rank (0 when no parameter has a gradient).
    """
    check_clip_grad_scope(scope)
    if scope == "global":
        return clip_gradients(student.parameters(), max_norm)
    norms = [clip_grad_norm_(module.parameters(), max_norm) for module in student.values()]
    device = next((n.device for n in norms if n.device.type != "cpu"), norms[0].device)
    # The norm of the concatenation of every module's gradients, from the modules' norms.
    return torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=torch.float32) for n in norms]))
