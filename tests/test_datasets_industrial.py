import json
import os

import numpy as np
import pytest
from PIL import Image

from dinov2.data.datasets.base import DatasetFormatError
from dinov2.data.image_io import BadImageError
from dinov2.data.loaders import make_dataset
from dinov2_tools.synthetic_industrial import make_industrial_dataset


@pytest.fixture(scope="module")
def industrial_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("industrial")
    counts = make_industrial_dataset(str(root), groups=10, images_per_group=2, size=32, seed=3)
    assert counts == {"train": 12, "val": 4, "test": 4}
    return root


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _annotations(root, split):
    with open(os.path.join(root, "annotations", f"{split}.json")) as f:
        return json.load(f)


def _write_annotations(root, split, content):
    with open(os.path.join(root, "annotations", f"{split}.json"), "w") as f:
        json.dump(content, f)


def test_layout_is_exactly_the_inspection_layout(industrial_root):
    content = _annotations(industrial_root, "train")
    assert content["metainfo"]["classes"] == ["good", "defect"]
    for entry in content["data_list"]:
        group = entry["group_id"]
        assert entry["img_path"].startswith(f"train/{group}/{group}-")
        assert entry["img_path"].endswith(".jpeg")
        assert (industrial_root / entry["img_path"]).is_file()


def test_loads_through_spec_with_labels_and_groups(industrial_root):
    for split in ("train", "val", "test"):
        content = _annotations(industrial_root, split)
        dataset = make_dataset(f"Industrial:root={industrial_root}:split={split}")
        assert len(dataset) == len(content["data_list"])
        assert dataset.classes == ["good", "defect"]
        np.testing.assert_array_equal(dataset.get_targets(), [e["gt_label"] for e in content["data_list"]])
        assert dataset.get_group_ids() == [e["group_id"] for e in content["data_list"]]
        image, target = dataset[0]
        assert image.mode == "RGB" and image.size == (32, 32)
        assert target == content["data_list"][0]["gt_label"]
    train = make_dataset(f"Industrial:root={industrial_root}:split=train")
    assert set(train.get_targets()) == {0, 1}
    test = make_dataset(f"Industrial:root={industrial_root}:split=test")
    assert not set(train.get_group_ids()) & set(test.get_group_ids())


def test_defect_is_visible(industrial_root):
    # Paper-dark pixels (< 50) appear only where a scratch or spot was drawn: background and parts are brighter.
    dataset = make_dataset(f"Industrial:root={industrial_root}:split=train")
    for index in range(len(dataset)):
        image, target = dataset[index]
        dark_pixels = int((np.asarray(image.convert("L")) < 50).sum())
        assert (dark_pixels >= 3) == (target == 1), (index, target, dark_pixels)


def test_generator_is_deterministic(tmp_path):
    make_industrial_dataset(str(tmp_path / "a"), groups=3, images_per_group=1, size=16, seed=7)
    make_industrial_dataset(str(tmp_path / "b"), groups=3, images_per_group=1, size=16, seed=7)
    for split in ("train", "val", "test"):
        assert _annotations(tmp_path / "a", split) == _annotations(tmp_path / "b", split)
    entry = _annotations(tmp_path / "a", "train")["data_list"][0]["img_path"]
    assert (tmp_path / "a" / entry).read_bytes() == (tmp_path / "b" / entry).read_bytes()


def test_unknown_label_index_names_entry(industrial_root, tmp_path):
    root = _copy(industrial_root, tmp_path / "d")
    content = _annotations(root, "val")
    content["data_list"][1]["gt_label"] = 2
    _write_annotations(root, "val", content)
    with pytest.raises(DatasetFormatError, match=r"val.json: data_list\[1\].*gt_label 2"):
        make_dataset(f"Industrial:root={root}:split=val")


def test_missing_file_names_entry(industrial_root, tmp_path):
    root = _copy(industrial_root, tmp_path / "d")
    content = _annotations(root, "test")
    os.remove(root / content["data_list"][2]["img_path"])
    with pytest.raises(DatasetFormatError, match=r"test.json: data_list\[2\].*not found"):
        make_dataset(f"Industrial:root={root}:split=test")


@pytest.mark.parametrize("bad_path", ["../outside.jpeg", "/etc/passwd"])
def test_path_escaping_root_names_entry(industrial_root, tmp_path, bad_path):
    root = _copy(industrial_root, tmp_path / "d")
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.jpeg")
    content = _annotations(root, "val")
    content["data_list"][0]["img_path"] = bad_path
    _write_annotations(root, "val", content)
    with pytest.raises(DatasetFormatError, match=r"data_list\[0\].*(escapes|absolute)"):
        make_dataset(f"Industrial:root={root}:split=val")


def test_group_split_across_train_and_test(industrial_root, tmp_path):
    root = _copy(industrial_root, tmp_path / "d")
    train_group = _annotations(root, "train")["data_list"][0]["group_id"]
    content = _annotations(root, "test")
    content["data_list"][3]["group_id"] = train_group
    _write_annotations(root, "test", content)
    for split in ("train", "test"):
        with pytest.raises(DatasetFormatError, match=f"group '{train_group}' is split across train and test"):
            make_dataset(f"Industrial:root={root}:split={split}")
    # The check can be turned off explicitly.
    assert len(make_dataset(f"Industrial:root={root}:split=test:check_groups=false")) == 4


def test_corrupted_image_raise_and_skip(industrial_root, tmp_path):
    root = _copy(industrial_root, tmp_path / "d")
    entry = _annotations(root, "val")["data_list"][0]
    path = root / entry["img_path"]
    path.write_bytes(path.read_bytes()[:200])  # truncated JPEG
    strict = make_dataset(f"Industrial:root={root}:split=val")
    with pytest.raises(BadImageError, match=str(path)):
        strict[0]
    lenient = make_dataset(f"Industrial:root={root}:split=val:bad_images=skip")
    assert lenient[0] is None
    assert lenient[1][0].mode == "RGB"


def test_symlinked_split_folder_inside_root_is_followed(industrial_root, tmp_path):
    # Users keep images on another disk and link them in; only annotation paths are constrained.
    import shutil

    root = tmp_path / "linked"
    (root).mkdir()
    shutil.copytree(industrial_root / "annotations", root / "annotations")
    os.symlink(industrial_root / "val", root / "val")
    dataset = make_dataset(f"Industrial:root={root}:split=val:check_groups=false")
    assert len(dataset) == 4 and dataset[0][0].mode == "RGB"
