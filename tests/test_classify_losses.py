import pytest
import torch
import torch.nn.functional as F
from classify_helpers import TINY_VIT

from dinov2.classify.heads import HeadSpec, MultiHeadClassifier
from dinov2.classify.losses import masked_cross_entropy, multitask_loss
from dinov2.hub.sources import load_backbone


def test_task_with_all_labels_missing_gives_zero_loss_and_no_gradient():
    backbone, _ = load_backbone("random", **TINY_VIT)
    model = MultiHeadClassifier(backbone, [HeadSpec("a", ("x", "y", "z")), HeadSpec("b", ("p", "q"), "mean")])
    images = torch.randn(4, 3, 16, 16)
    targets = {"a": torch.tensor([0, 2, -1, 1]), "b": torch.full((4,), -1)}
    total, per_task = multitask_loss(model(images), targets)
    assert per_task["b"].item() == 0.0
    assert torch.isfinite(total)
    total.backward()
    assert torch.count_nonzero(model.heads["b"].weight.grad) == 0
    assert torch.count_nonzero(model.heads["b"].bias.grad) == 0
    assert torch.count_nonzero(model.heads["a"].weight.grad) > 0
    # The missing task adds nothing: the total is task a's loss alone.
    torch.testing.assert_close(total, per_task["a"])


def test_masked_loss_is_mean_over_labelled_samples_only():
    logits = torch.randn(5, 3)
    targets = torch.tensor([1, -1, 0, -1, 2])
    keep = targets >= 0
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(masked_cross_entropy(logits, targets), expected)


def test_loss_weights_and_label_errors():
    logits = {"a": torch.randn(3, 2), "b": torch.randn(3, 2)}
    targets = {"a": torch.tensor([0, 1, 1]), "b": torch.tensor([1, 0, -1])}
    total, per_task = multitask_loss(logits, targets, weights={"b": 0.5})
    torch.testing.assert_close(total, per_task["a"] + 0.5 * per_task["b"])
    with pytest.raises(ValueError, match="out of range"):
        masked_cross_entropy(torch.randn(2, 2), torch.tensor([0, 2]))
    with pytest.raises(KeyError, match="no targets for tasks"):
        multitask_loss(logits, {"a": targets["a"]})
