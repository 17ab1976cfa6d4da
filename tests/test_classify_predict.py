import json

import numpy as np
import pandas as pd
import pytest
import torch
from classify_helpers import HEADS, random_image, save_tiny_classifier, symmetric_image

from dinov2.classify.predict import Predictor, main, predict


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("model") / "model.pth")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    random_image(0).save(folder / "a.png")
    random_image(1, size=(30, 18)).save(folder / "sub" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_dataframe_schema_and_probabilities(model_path, image_dir):
    df = predict(images=image_dir, model=model_path, output_format="dataframe", batch_size=1)
    expected_columns = ["image"]
    for head in HEADS:
        expected_columns += [f"{head.name}_label"] + [f"{head.name}_prob_{c}" for c in head.classes]
    assert list(df.columns) == expected_columns
    assert list(df["image"]) == ["a.png", "sub/b.jpg"]
    for head in HEADS:
        probs = df[[f"{head.name}_prob_{c}" for c in head.classes]].to_numpy()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
        assert list(df[f"{head.name}_label"]) == [head.classes[i] for i in probs.argmax(axis=1)]


def test_json_schema_matches_dataframe(model_path, image_dir, tmp_path):
    records = predict(images=image_dir, model=model_path, output_format="json", output_path=tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == records
    df = predict(images=image_dir, model=model_path, output_path=tmp_path / "out.csv")
    assert pd.read_csv(tmp_path / "out.csv").shape == df.shape
    for record, (_, row) in zip(records, df.iterrows()):
        assert set(record) == {"image", "predictions"}
        assert list(record["predictions"]) == [h.name for h in HEADS]
        for head in HEADS:
            pred = record["predictions"][head.name]
            assert list(pred["probabilities"]) == list(head.classes)
            assert pred["label"] == row[f"{head.name}_label"]
            assert pred["probability"] == max(pred["probabilities"].values())
            for c in head.classes:
                assert pred["probabilities"][c] == pytest.approx(row[f"{head.name}_prob_{c}"])


def test_tta_on_mirror_symmetric_image_changes_nothing(model_path):
    images = [symmetric_image(s) for s in range(3)]
    plain = predict(images=images, model=model_path, output_format="json", tta=False)
    flipped = predict(images=images, model=model_path, output_format="json", tta=True)
    for a, b in zip(plain, flipped):
        for task, pred in a["predictions"].items():
            for c, p in pred["probabilities"].items():
                assert b["predictions"][task]["probabilities"][c] == pytest.approx(p, abs=1e-5)
    # On an asymmetric image the mirrored view does change the average.
    asym = [random_image(7)]
    p0 = predict(images=asym, model=model_path, output_format="json", tta=False)[0]["predictions"]["presence"]
    p1 = predict(images=asym, model=model_path, output_format="json", tta=True)[0]["predictions"]["presence"]
    assert max(abs(p0["probabilities"][c] - p1["probabilities"][c]) for c in p0["probabilities"]) > 1e-4


def test_tta_and_multi_crop_average_the_views(model_path):
    image = random_image(3)
    predictor = Predictor(model_path, tta=True, multi_crop=True)
    views = predictor.views(image)
    assert views.shape == (10, 3, 16, 16)
    with torch.no_grad():
        per_view = predictor.model(views)["presence"].softmax(-1).mean(0).double().numpy()
    np.testing.assert_allclose(predictor.probabilities([image])["presence"][0], per_view, atol=1e-6)


def test_inputs_errors_and_cli(model_path, image_dir, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predict(images=tmp_path / "missing.png", model=model_path)
    with pytest.raises(ValueError, match="output_format"):
        predict(images=image_dir, model=model_path, output_format="xml")
    with pytest.raises(FileNotFoundError, match="classifier file not found"):
        predict(images=image_dir, model=tmp_path / "nope.pth")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(Exception, match="bad.png"):
        predict(images=[bad], model=model_path)
    assert (
        main(
            ["--model", str(model_path), "--images", str(image_dir), "--output", str(tmp_path / "cli.csv"), "--no-tta"]
        )
        == 0
    )
    cli = pd.read_csv(tmp_path / "cli.csv")
    api = predict(images=image_dir, model=model_path, tta=False)
    np.testing.assert_allclose(cli["presence_prob_clear"], api["presence_prob_clear"], rtol=1e-6)
    assert main(["--model", str(model_path), "--images", str(image_dir / "a.png")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["image"].endswith("a.png")
