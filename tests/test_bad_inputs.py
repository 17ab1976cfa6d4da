"""Bad input files give errors naming the file: text that is not UTF-8, corrupt JPEG data."""

import gzip
import json

import numpy as np
import pytest
from PIL import Image

from dinov2.data.datasets.base import DatasetFormatError
from dinov2.data.loaders import make_dataset

# "Prüfteil" (test part) and "Öl" (oil) in Latin-1, as a spreadsheet export on Windows writes them:
# 0xfc and 0xd6 are not valid UTF-8.
LATIN1_NAME = "Prüfteil"


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)


def test_open_text_names_the_file_for_bad_bytes_missing_files_and_damaged_gzip(tmp_path):
    from dinov2.data.datasets.base import open_text

    latin1 = tmp_path / "labels.txt"
    latin1.write_bytes(("ok\n" * 10000 + LATIN1_NAME + "\n").encode("latin-1"))  # bad byte far into the file
    with pytest.raises(DatasetFormatError, match=rf"label list {latin1} is not UTF-8 text \(bytes fc"):
        with open_text(str(latin1), "label list") as f:
            for _ in f:  # streamed, as the QuickDraw reader does
                pass
    with pytest.raises(DatasetFormatError, match=rf"label list {tmp_path / 'absent.txt'} does not exist"):
        with open_text(str(tmp_path / "absent.txt"), "label list"):
            pass
    damaged = tmp_path / "cat.ndjson.gz"
    damaged.write_bytes(gzip.compress(b'{"word": "cat"}\n' * 1000)[:-40])
    with pytest.raises(DatasetFormatError, match=rf"QuickDraw file {damaged} is not a complete gzip file"):
        with open_text(str(damaged), "QuickDraw file") as f:
            f.read()
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffpath,label\n".encode("utf-8"))
    with open_text(str(bom), "CSV file") as f:
        assert f.readline() == "path,label\n"  # the byte-order mark is not part of the first column name


def test_industrial_annotations_not_in_utf8(tmp_path):
    _image(tmp_path / "train" / "a.png")
    (tmp_path / "annotations").mkdir()
    annotation = tmp_path / "annotations" / "train.json"
    content = {"metainfo": {"classes": [LATIN1_NAME, "ok"]}, "data_list": [{"img_path": "a.png", "gt_label": 0, "group_id": 1}]}
    annotation.write_bytes(json.dumps(content, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DatasetFormatError, match=rf"annotation file {annotation} is not UTF-8"):
        make_dataset(f"Industrial:root={tmp_path}:split=train")
    annotation.write_bytes(json.dumps(content, ensure_ascii=False).encode("utf-8"))
    assert make_dataset(f"Industrial:root={tmp_path}:split=train").classes[0] == LATIN1_NAME


def test_csv_not_in_utf8_and_csv_with_a_byte_order_mark(tmp_path):
    _image(tmp_path / "a.png")
    table = tmp_path / "labels.csv"
    table.write_bytes(f"path,label\na.png,{LATIN1_NAME}\n".encode("latin-1"))
    with pytest.raises(DatasetFormatError, match=rf"CSV file {table} is not UTF-8"):
        make_dataset(f"CSV:path={table}")
    table.write_bytes(f"path,label\na.png,{LATIN1_NAME}\n".encode("utf-8-sig"))  # as Excel saves "CSV UTF-8"
    dataset = make_dataset(f"CSV:path={table}")
    assert len(dataset) == 1 and dataset.classes == [LATIN1_NAME]


def test_imagenet_labels_file_not_in_utf8(tmp_path):
    _image(tmp_path / "train" / "n01" / "a.png")
    labels = tmp_path / "labels.txt"
    labels.write_bytes(f"n01,{LATIN1_NAME}\n".encode("latin-1"))
    with pytest.raises(DatasetFormatError, match=rf"ImageNet labels file {labels} is not UTF-8"):
        make_dataset(f"ImageNet:root={tmp_path}:split=TRAIN:labels={labels}:cache=false")


def test_quickdraw_ndjson_and_category_list_not_in_utf8(tmp_path):
    drawing = {"word": "cat", "recognized": True, "drawing": [[[0, 10, 20], [0, 10, 0]]]}
    good = json.dumps(drawing) + "\n"
    bad = json.dumps({**drawing, "countrycode": "Ö"}, ensure_ascii=False) + "\n"
    (tmp_path / "cat.ndjson.gz").write_bytes(gzip.compress((good * 3000 + bad).encode("latin-1")))
    with pytest.raises(DatasetFormatError, match=rf"QuickDraw file {tmp_path / 'cat.ndjson.gz'} is not UTF-8"):
        make_dataset(f"QuickDraw:root={tmp_path}:format=ndjson:split=all")
    (tmp_path / "cat.ndjson.gz").write_bytes(gzip.compress(good.encode() * 4))
    names = tmp_path / "categories.txt"
    names.write_bytes("cat\nÖl\n".encode("latin-1"))
    with pytest.raises(DatasetFormatError, match=rf"QuickDraw category list {names} is not UTF-8"):
        make_dataset(f"QuickDraw:root={tmp_path}:format=ndjson:split=all:categories={names}")
