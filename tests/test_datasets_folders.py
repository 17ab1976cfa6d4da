import os
import time

import numpy as np
import pytest
from PIL import Image

from dinov2.data.datasets.base import DatasetFormatError
from dinov2.data.datasets.image_folder import index_cache_path
from dinov2.data.loaders import make_dataset

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _jpeg(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (value, 255 - value, 7)).save(path, format="JPEG", quality=95)


@pytest.fixture
def imagenet_root(tmp_path):
    root = tmp_path / "imagenet"
    for c, wnid in enumerate(WNIDS):
        for k in range(3):
            _jpeg(root / "train" / wnid / f"{wnid}_{k}.JPEG", 40 * c + k)
        _jpeg(root / "val" / wnid / f"ILSVRC2012_val_0000000{c}.JPEG", 40 * c + 10)
    for k in range(2):
        _jpeg(root / "test" / f"ILSVRC2012_test_0000000{k}.JPEG", 200)
    return root


def test_imagenet_train_val_test_with_labels_file(imagenet_root, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("n01440764,tench\nn01443537,goldfish\nn01484850,great white shark\n")
    cache = tmp_path / "cache"
    train = make_dataset(f"ImageNet:root={imagenet_root}:split=TRAIN:labels={labels}:cache_dir={cache}")
    assert len(train) == 9
    assert train.class_ids == WNIDS and train.classes == ["tench", "goldfish", "great white shark"]
    np.testing.assert_array_equal(train.get_targets(), [0, 0, 0, 1, 1, 1, 2, 2, 2])
    image, target = train[4]
    assert image.mode == "RGB" and image.size == (12, 10) and target == 1
    val = make_dataset(f"ImageNet:root={imagenet_root}:split=val:cache_dir={cache}")
    assert val.classes == WNIDS and val.get_targets().tolist() == [0, 1, 2]
    test = make_dataset(f"ImageNet:root={imagenet_root}:split=TEST:cache_dir={cache}")
    assert len(test) == 2 and test.get_targets().tolist() == [-1, -1] and test.classes == WNIDS


def test_synset_mapping_labels_form(imagenet_root, tmp_path):
    labels = tmp_path / "LOC_synset_mapping.txt"
    labels.write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark\n"
    )
    train = make_dataset(f"ImageNet:root={imagenet_root}:labels={labels}:cache=false")
    assert train.classes[0] == "tench, Tinca tinca" and train.classes[2] == "great white shark"
    labels.write_text("n01440764 tench\n")
    with pytest.raises(DatasetFormatError, match="no name for class.*n01443537"):
        make_dataset(f"ImageNet:root={imagenet_root}:labels={labels}:cache=false")


def test_index_cache_is_used_and_invalidated(imagenet_root, tmp_path):
    cache = tmp_path / "cache"
    spec = f"ImageNet:root={imagenet_root}:cache_dir={cache}"
    first = make_dataset(spec)
    cache_file = index_cache_path(str(imagenet_root / "train"), str(cache))
    assert os.path.isfile(cache_file)
    # Prove the second start reads the cache: doctor it (a directory whose mtime still matches).
    import json

    with open(cache_file) as f:
        index = json.load(f)
    index["paths"][0] = index["paths"][1]
    with open(cache_file, "w") as f:
        json.dump(index, f)
    assert make_dataset(spec).get_image_path(0) == first.get_image_path(1)
    # Adding a file changes its class folder's mtime: the index is rebuilt and sees the new file.
    time.sleep(0.01)
    _jpeg(imagenet_root / "train" / WNIDS[1] / "new.JPEG", 99)
    os.utime(imagenet_root / "train" / WNIDS[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    rebuilt = make_dataset(spec)
    assert len(rebuilt) == 10 and rebuilt.get_image_path(0) == first.get_image_path(0)
    assert rebuilt.get_targets().tolist().count(1) == 4


def test_imagenet_missing_split_is_an_error(tmp_path):
    with pytest.raises(DatasetFormatError, match="split folder .*train does not exist"):
        make_dataset(f"ImageNet:root={tmp_path}")


def test_image_folder_nested_and_mixed_extensions(tmp_path):
    root = tmp_path / "folder"
    _jpeg(root / "bolt" / "a.jpg", 1)
    _jpeg(root / "bolt" / "sub" / "b.jpeg", 2)
    (root / "nut").mkdir()
    Image.new("L", (5, 5), 9).save(root / "nut" / "c.PNG")
    (root / "nut" / "notes.txt").write_text("not an image")
    dataset = make_dataset(f"ImageFolder:root={root}:cache=false")
    assert dataset.classes == ["bolt", "nut"]
    assert dataset.get_targets().tolist() == [0, 0, 1]
    assert dataset[2][0].mode == "RGB"  # grayscale PNG converted
    assert dataset.get_group_ids() is None


def test_csv_multi_head_with_missing_labels(tmp_path):
    images = tmp_path / "images"
    for k in range(4):
        _jpeg(images / f"{k}.jpg", 30 * k)
    (tmp_path / "labels.csv").write_text(
        "file,defect,material\n0.jpg,scratch,steel\n1.jpg,,steel\n2.jpg,dent,\n3.jpg,scratch,brass\n"
    )
    multi = make_dataset(f"CSV:path={tmp_path / 'labels.csv'}:root={images}")
    assert multi.tasks == {"defect": ["dent", "scratch"], "material": ["brass", "steel"]}
    assert multi.get_targets().tolist() == [[1, 1], [-1, 1], [0, -1], [1, 0]]
    image, target = multi[2]
    assert image.size == (12, 10) and target == {"defect": 0, "material": -1}
    single = make_dataset(f"CSV:path={tmp_path / 'labels.csv'}:root={images}:label_columns=material")
    assert single.classes == ["brass", "steel"] and single[3][1] == 0
    assert single.get_targets().tolist() == [1, 1, -1, 0]


def test_csv_defaults_integer_classes_and_tsv(tmp_path):
    _jpeg(tmp_path / "a.jpg", 1)
    _jpeg(tmp_path / "b.jpg", 2)
    (tmp_path / "labels.tsv").write_text("path\tlabel\na.jpg\t10\nb.jpg\t2\n")
    dataset = make_dataset(f"CSV:path={tmp_path / 'labels.tsv'}")
    assert dataset.classes == ["2", "10"]  # numeric order, not text order
    assert dataset.get_targets().tolist() == [1, 0]


def test_csv_errors_name_file_and_line(tmp_path):
    _jpeg(tmp_path / "a.jpg", 1)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\na.jpg,x\nmissing.jpg,y\n")
    with pytest.raises(DatasetFormatError, match="labels.csv, line 3: image file .*missing.jpg not found"):
        make_dataset(f"CSV:path={csv_path}")
    csv_path.write_text("path,label\n../a.jpg,x\n")
    with pytest.raises(DatasetFormatError, match="line 2: path '../a.jpg' escapes"):
        make_dataset(f"CSV:path={csv_path}")
    csv_path.write_text("path,label\na.jpg,x\n")
    with pytest.raises(DatasetFormatError, match="no column 'kind'"):
        make_dataset(f"CSV:path={csv_path}:label_columns=kind")
