"""Bad input files give errors naming the file: text that is not UTF-8, corrupt JPEG data."""

import gzip
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from dinov2.data import image_io
from dinov2.data.datasets.base import DatasetFormatError
from dinov2.data.image_io import BadImageError, decode_image_bytes, load_image_file
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
    content = {
        "metainfo": {"classes": [LATIN1_NAME, "ok"]},
        "data_list": [{"img_path": "a.png", "gt_label": 0, "group_id": 1}],
    }
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


def _jpeg_bytes(**options) -> bytes:
    rng = np.random.default_rng(0)
    pixels = (np.kron(rng.random((6, 8, 3)), np.ones((8, 8, 1))) * 200 + rng.random((48, 64, 3)) * 55).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def _corrupt_entropy_data(data: bytes) -> bytes:
    """Flip 32 bytes in the middle of the entropy-coded data: the header stays valid."""
    data = bytearray(data)
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")  # the scan data follow the SOS header
    middle = (start + len(data) - 2) // 2
    for i in range(middle, middle + 32):
        data[i] ^= 0xFF
    return bytes(data)


def _pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(image.convert("RGB"))


def test_corrupt_jpeg_data_behind_a_valid_header_is_a_bad_image(tmp_path, caplog):
    pytest.importorskip("simplejpeg")
    corrupt = _corrupt_entropy_data(_jpeg_bytes())
    _pillow_rgb(corrupt)  # Pillow alone decodes it without a word: the garbage went into training
    folder = tmp_path / "images" / "parts"
    folder.mkdir(parents=True)
    (folder / "corrupt.jpg").write_bytes(corrupt)
    (folder / "sound.jpg").write_bytes(_jpeg_bytes())
    bad = folder / "corrupt.jpg"
    with pytest.raises(BadImageError, match=rf"cannot decode image {bad}: ValueError: Corrupt JPEG data"):
        load_image_file(bad, "raise")
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        assert load_image_file(bad, "skip") is None
    assert f"skipping unreadable image {bad}" in caplog.text
    with pytest.raises(BadImageError, match=r"shard-0/000.jpg: ValueError: Corrupt JPEG data"):
        decode_image_bytes(corrupt, "shard-0/000.jpg")
    # Through a dataset: the policy raises naming the file, or skips the sample.
    spec = f"ImageFolder:root={tmp_path / 'images'}:cache=false"
    index = {path.split("/")[-1]: i for i, path in enumerate(make_dataset(spec).get_image_path(i) for i in range(2))}
    with pytest.raises(BadImageError, match="corrupt.jpg"):
        make_dataset(spec)[index["corrupt.jpg"]]
    skipping = make_dataset(spec + ":bad_images=skip")
    assert skipping[index["corrupt.jpg"]] is None and skipping[index["sound.jpg"]] is not None


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"subsampling": 0}, {"restart_marker_blocks": 2}])
def test_sound_jpegs_decode_to_the_same_pixels_with_and_without_simplejpeg(monkeypatch, options):
    data = _jpeg_bytes(**options)
    expected = _pillow_rgb(data)
    assert np.array_equal(np.asarray(decode_image_bytes(data, "sound.jpg")), expected)
    for mode in ("L", "CMYK"):  # converted by Pillow either way
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert(mode).save(buffer, "JPEG")
        assert np.array_equal(
            np.asarray(decode_image_bytes(buffer.getvalue(), f"{mode}.jpg")), _pillow_rgb(buffer.getvalue())
        )
    # Without the optional package, Pillow decodes: same pixels, truncation is still reported.
    monkeypatch.setattr(image_io, "_simplejpeg", lambda: None)
    assert np.array_equal(np.asarray(decode_image_bytes(data, "sound.jpg")), expected)
    with pytest.raises(BadImageError, match="truncated.jpg"):
        decode_image_bytes(data[: len(data) // 2], "truncated.jpg")
