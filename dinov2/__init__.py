"""DINOv2-class self-supervised pretraining for vision transformers."""

__version__ = "0.1.0"
