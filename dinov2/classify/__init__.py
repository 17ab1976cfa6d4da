"""Classifiers on a backbone: heads, masked multi-task loss, probe / fine-tuning / LP-FT with LoRA
training, inference from Python, the command line and HTTP. See docs/classify.md."""

from .checkpoint import ClassifierConfig, build_classifier, load_classifier, save_classifier
from .heads import HeadSpec, MultiHeadClassifier
from .losses import masked_cross_entropy, multitask_loss


def __getattr__(name):
    # Imported on first use: importing dinov2.classify.predict here would make
    # `python -m dinov2.classify.predict` warn about a module found in sys.modules before it runs.
    # (The predict() function itself stays in dinov2.classify.predict so it cannot hide the module.)
    if name == "Predictor":
        from .predict import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
