import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch.utils.data import Dataset

from dinov2.eval.features import extract_features
from dinov2.eval.log_regression import fit_log_regression
from dinov2.models.vision_transformer import vit_small

C_VALUES = [1e-3, 1e-2, 1e-1, 1.0]


class Digits(Dataset):
    """sklearn's 8x8 digits as 16x16 three-channel tensors."""

    def __init__(self):
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        self.images = torch.nn.functional.interpolate(images[:, None], size=16, mode="nearest").expand(-1, 3, -1, -1)
        self.targets = digits.target

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


def sklearn_baseline(train_x, train_y, val_x, val_y, test_x):
    """The protocol written directly in scikit-learn: sweep C on val, refit on train + val."""
    scores = []
    for c in C_VALUES:
        scaler = StandardScaler().fit(train_x)
        clf = LogisticRegression(C=c, solver="lbfgs", max_iter=1000).fit(scaler.transform(train_x), train_y)
        scores.append(np.mean(clf.predict(scaler.transform(val_x)) == val_y))
    best_c = C_VALUES[int(np.argmax(scores))]
    both_x, both_y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    scaler = StandardScaler().fit(both_x)
    clf = LogisticRegression(C=best_c, solver="lbfgs", max_iter=1000).fit(scaler.transform(both_x), both_y)
    return best_c, scores, clf.predict(scaler.transform(test_x)), clf.predict_proba(scaler.transform(test_x))


def test_log_regression_on_digits_features_matches_sklearn():
    model = vit_small(patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2).eval()
    features = extract_features(model, Digits(), batch_size=256, num_workers=0)
    x, y = features.features.numpy(), features.labels.numpy()
    order = np.random.default_rng(0).permutation(len(y))
    train, val, test = order[:1000], order[1000:1400], order[1400:]
    result = fit_log_regression(x[train], y[train], x[val], y[val], x[test], 10, C_VALUES, max_iter=1000)
    best_c, scores, predictions, probs = sklearn_baseline(x[train], y[train], x[val], y[val], x[test])
    assert result.best_c == best_c
    assert [s["val_top1"] for s in result.sweep] == scores
    assert np.array_equal(result.test_probs.argmax(axis=1), predictions)
    np.testing.assert_allclose(result.test_probs, probs, rtol=1e-10, atol=1e-12)
    assert np.mean(predictions == y[test]) > 0.5  # random-init ViT features still separate digits


def test_missing_class_in_train_gets_zero_probability():
    g = np.random.default_rng(1)
    x, y = g.normal(size=(60, 4)), np.repeat([0, 2], 30)
    x[y == 2] += 3
    result = fit_log_regression(x, y, x[:10], y[:10], x[:5], num_classes=3, c_values=[1.0])
    assert result.test_probs.shape == (5, 3)
    assert np.all(result.test_probs[:, 1] == 0)
    np.testing.assert_allclose(result.test_probs.sum(axis=1), 1.0)
