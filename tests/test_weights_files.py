"""Weights-only reading of .pth / .safetensors files: refused, empty, garbage and truncated files
get errors that name the file and say why (backbone weights, warm start, classifier files)."""

import os

import pytest
import torch
from classify_helpers import TINY_VIT, save_tiny_classifier

from dinov2.classify.checkpoint import ClassifierFileError, read_classifier_file
from dinov2.hub.sources import load_backbone
from dinov2.hub.weights import WeightsError, load_weights_only, read_state_dict, save_state_dict
from dinov2.train.warm_start import load_warm_start_weights


class _RunsCode:
    """Pickles as a call of os.system (harmless ``true`` if anything ever ran it)."""

    def __reduce__(self):
        return (os.system, ("true",))


def _bad_files(directory, suffix=".pth"):
    """{kind: path} of files that must all be refused with their name in the error."""
    good = save_state_dict({"cls_token": torch.zeros(1, 1, 8), "w": torch.arange(4000.0)}, directory / f"good{suffix}")
    data = good.read_bytes()
    files = {
        "empty": directory / f"empty{suffix}",
        "garbage": directory / f"garbage{suffix}",
        "truncated": directory / f"truncated{suffix}",
    }
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(b"this is not a weights file\n" * 20)
    files["truncated"].write_bytes(data[: len(data) // 2])
    if suffix == ".pth":
        files["pickled code"] = directory / "code.pth"
        torch.save({"cls_token": torch.zeros(1), "payload": _RunsCode()}, files["pickled code"])
    return files


def test_pickled_code_is_refused_naming_the_file_and_the_global(tmp_path):
    path = _bad_files(tmp_path)["pickled code"]
    with pytest.raises(WeightsError) as info:
        load_weights_only(path, "weights file")
    message = str(info.value)
    assert message.startswith(f"refusing to load weights file {path}: it contains a pickled global ")
    assert "system" in message and "weights-only loading does not allow" in message
    # torch's own advice (retry with weights_only=False) is not passed on.
    assert "weights_only=False" not in message and info.value.__cause__ is None


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_unreadable_weights_name_the_file_and_the_reason(tmp_path, suffix):
    reasons = {"empty": "the file is empty", "pickled code": "refusing to load"}
    if suffix == ".pth":
        reasons.update(garbage="truncated or corrupt, or not a torch file", truncated="truncated or corrupt")
    else:
        reasons.update(garbage="as a safetensors file", truncated="as a safetensors file")
    for kind, path in _bad_files(tmp_path, suffix).items():
        with pytest.raises(WeightsError) as info:
            read_state_dict(path)
        assert f"weights file {path}" in str(info.value), kind
        assert reasons[kind] in str(info.value), (kind, str(info.value))


def test_warm_start_from_a_bad_file_names_it(tmp_path):
    backbone, _ = load_backbone("random", **TINY_VIT)
    for kind, path in _bad_files(tmp_path, ".safetensors").items():
        with pytest.raises(WeightsError, match="warm-start weights file") as info:
            load_warm_start_weights(backbone, path)
        assert str(path) in str(info.value), kind


def test_classifier_file_errors_name_the_file(tmp_path):
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(ClassifierFileError) as info:
            read_classifier_file(path)
        assert f"classifier file {path}" in str(info.value), (kind, str(info.value))
    config, state, _ = read_classifier_file(save_tiny_classifier(tmp_path / "ok.pth"))
    assert state and config.heads
