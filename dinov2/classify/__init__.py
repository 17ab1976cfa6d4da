"""Classifiers on a backbone: heads, masked multi-task loss, probe / fine-tuning / LP-FT with LoRA
training, inference from Python, the command line and HTTP. See docs/classify.md."""

from .checkpoint import ClassifierConfig, build_classifier, load_classifier, save_classifier
from .heads import HeadSpec, MultiHeadClassifier
from .losses import masked_cross_entropy, multitask_loss
# The predict() function stays in dinov2.classify.predict: re-exporting it here would hide the module.
from .predict import Predictor

__all__ = [
    "ClassifierConfig",
    "HeadSpec",
    "MultiHeadClassifier",
    "Predictor",
    "build_classifier",
    "load_classifier",
    "masked_cross_entropy",
    "multitask_loss",
    "save_classifier",
]
