import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import make_training_output

from dinov2.eval.pca import main, patch_features, pca_rgb_maps
from dinov2.models.vision_transformer import vit_small


def test_pca_maps_shape_range_and_foreground():
    model = vit_small(patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2, init_values=1.0).eval()
    images = torch.zeros(2, 3, 16, 16)
    images[:, 0, 4:12, 4:12] = 3.0  # a bright square in the middle
    features = patch_features(model, images)
    assert features.shape == (2, 4, 4, 32)
    maps = pca_rgb_maps(features)
    assert maps.shape == (2, 4, 4, 3) and maps.min() >= 0 and maps.max() <= 1
    masked = pca_rgb_maps(features, foreground_threshold=0.5)
    inverse = pca_rgb_maps(features, foreground_threshold=0.5, invert_foreground=True)
    black = lambda m: np.all(m == 0, axis=-1)  # noqa: E731
    # the square and the border land on opposite sides of the first component
    centre, border = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    centre[1:3, 1:3], border[1:3, 1:3] = True, False
    assert (black(masked[0])[centre].all() and not black(masked[0])[border].any()) or (
        black(masked[0])[border].all() and not black(masked[0])[centre].any()
    )
    assert np.array_equal(black(masked), ~black(inverse))
    with pytest.raises(ValueError, match="foreground threshold"):
        pca_rgb_maps(features, foreground_threshold=1.5)


def test_pca_script_writes_png(tmp_path):
    make_training_output(tmp_path / "run")
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    out = tmp_path / "pca.png"
    assert (
        main(
            [
                "--pretrained-weights",
                str(tmp_path / "run"),
                "--images",
                str(tmp_path),
                "--output",
                str(out),
                "--image-size",
                "32",
            ]
        )
        == 0
    )
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--pretrained-weights", str(tmp_path / "run"), "--images", str(tmp_path / "nope"), "--output", str(out)])
