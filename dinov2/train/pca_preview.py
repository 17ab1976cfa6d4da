"""The PCA patch-feature map of a few fixed images, logged as an image at each teacher export.

``logging.pca_images`` images (0: off) are drawn once, evenly spaced over the dataset
``logging.pca_dataset_path`` (default: ``evaluation.knn_dataset_path``, else the training dataset),
resized and centre-cropped to ``crops.global_crops_size`` and normalised with ``crops.mean`` /
``crops.std``. At each export the teacher backbone's patch tokens of these images go through
:func:`dinov2.eval.pca.pca_rgb_maps` (one PCA over all of them), and the inputs with their maps
below (:func:`dinov2.eval.pca.side_by_side`) are logged as ``pca/patch_features`` to the tracking
sinks. Watching the maps over training shows when the features start to group object parts.

It runs only when a tracking sink (TensorBoard or W&B) is on. Every rank runs the forward pass
(a sharded teacher needs all ranks); the main process computes the PCA and logs.
"""

from __future__ import annotations

import itertools
import logging
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from dinov2 import distributed
from dinov2.data.loaders import make_dataset
from dinov2.data.transforms import make_classification_eval_transform
from dinov2.eval.pca import pca_rgb_maps, side_by_side
from dinov2.train.knn_monitor import _raw_image
from dinov2.utils.tracking import tracking_options

logger = logging.getLogger("dinov2")

__all__ = ["PCA_IMAGE_TAG", "PcaPreview"]

PCA_IMAGE_TAG = "pca/patch_features"


class PcaPreview:
    def __init__(self, cfg: DictConfig, device: torch.device, dataset_override: Optional[Dataset] = None):
        self.cfg = cfg
        self.device = device
        self.count = int(cfg.logging.pca_images)
        if self.count < 0:
            raise ValueError(f"logging.pca_images must be >= 0, got {self.count}")
        self.enabled = self.count > 0 and tracking_options(cfg.logging).enabled
        self._dataset_override = dataset_override
        self._images: Optional[torch.Tensor] = None

    def _source(self):
        spec = self.cfg.logging.pca_dataset_path or self.cfg.evaluation.knn_dataset_path
        if spec:
            return make_dataset(spec), spec
        if self._dataset_override is not None:
            return self._dataset_override, "the training dataset"
        return make_dataset(self.cfg.train.dataset_path), self.cfg.train.dataset_path

    def _load_images(self) -> torch.Tensor:
        cfg = self.cfg
        size = int(cfg.crops.global_crops_size)
        transform = make_classification_eval_transform(
            resize_size=size, crop_size=size, mean=tuple(cfg.crops.mean), std=tuple(cfg.crops.std)
        )
        dataset, source = self._source()
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            positions = np.linspace(0, len(dataset) - 1, num=min(self.count, len(dataset))).round().astype(int)
            raw = [_raw_image(dataset, int(index)) for index in positions]
        else:  # a stream: its first images
            raw = [sample[0] for sample in itertools.islice(iter(dataset), self.count)]
        images = [transform(image) for image in raw if image is not None]
        if not images:
            raise ValueError(f"logging.pca_images: no readable image in {source}")
        logger.info("PCA preview: %d images of %s, logged at each teacher export", len(images), source)
        return torch.stack(images)

    def render(self, backbone: nn.Module, dtype: torch.dtype = torch.float32) -> Optional[np.ndarray]:
        """The (2H, N*W, 3) picture in [0, 1] on the main process (None on the others)."""
        if self._images is None:
            self._images = self._load_images()
        images = self._images.to(self.device)
        was_training = backbone.training
        backbone.eval()
        try:
            # Through the module call, not forward_features: an FSDP2-sharded teacher gathers its
            # root parameters (patch and position embeddings) in the call's pre-forward hook.
            with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
                tokens = backbone(images, is_training=True)["x_norm_patchtokens"].float()
        finally:
            backbone.train(was_training)
        grid = images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size
        features = tokens.reshape(images.shape[0], *grid, -1)
        if not distributed.is_main_process():
            return None
        mean = torch.tensor(list(self.cfg.crops.mean)).view(1, 3, 1, 1)
        std = torch.tensor(list(self.cfg.crops.std)).view(1, 3, 1, 1)
        pictures = (self._images * std + mean).permute(0, 2, 3, 1).numpy()
        return side_by_side(pictures, pca_rgb_maps(features))
