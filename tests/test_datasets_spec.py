import pytest

from dinov2.data.loaders import DATASET_KINDS, dataset_spec_help, make_dataset
from dinov2.data.spec import DatasetSpecError, parse_dataset_spec


def test_parse_splits_kind_and_keys():
    kind, options = parse_dataset_spec("CSV:path=labels.csv:root=images/")
    assert kind == "CSV"
    assert options == {"path": "labels.csv", "root": "images/"}
    # '=' inside a value is kept; empty segments are tolerated.
    assert parse_dataset_spec("ImageFolder::root=a=b:")[1] == {"root": "a=b"}


@pytest.mark.parametrize("spec", ["", "   ", ":root=x", "ImageFolder:root", "ImageFolder:root=a:root=b"])
def test_malformed_specs_are_errors(spec):
    with pytest.raises(DatasetSpecError):
        parse_dataset_spec(spec)


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(DatasetSpecError) as info:
        make_dataset("Coco:root=/x")
    message = str(info.value)
    assert "'Coco'" in message
    for kind in DATASET_KINDS:
        assert kind in message


def test_unknown_key_lists_valid_keys():
    with pytest.raises(DatasetSpecError) as info:
        make_dataset("QuickDraw:root=/x:colour=red")
    message = str(info.value)
    assert "'colour'" in message and "train_per_class" in message and "holdout" in message


def test_missing_required_key_and_bad_values():
    with pytest.raises(DatasetSpecError, match="needs key 'root'"):
        make_dataset("ImageFolder:")
    with pytest.raises(DatasetSpecError, match="'size' has invalid value 'big'"):
        make_dataset("QuickDraw:root=/x:size=big")
    with pytest.raises(DatasetSpecError, match="valid values: raise, skip"):
        make_dataset("ImageFolder:root=/x:bad_images=ignore")
    with pytest.raises(DatasetSpecError, match="valid values: TRAIN, VAL, TEST"):
        make_dataset("ImageNet:root=/x:split=holdout")


def test_kind_is_case_insensitive_and_help_lists_every_kind(tmp_path):
    (tmp_path / "a").mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.png")
    dataset = make_dataset(f"imagefolder:root={tmp_path}:cache=false")
    assert dataset.classes == ["a"]
    text = dataset_spec_help()
    for kind in DATASET_KINDS:
        assert f"{kind}:" in text
