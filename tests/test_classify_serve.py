"""The HTTP service, tested against a real uvicorn server on 127.0.0.1."""

import io
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from dinov2.classify.predict import predict

from classify_helpers import random_image, save_tiny_classifier

MAX_UPLOAD_BYTES = 20_000
MAX_PIXELS = 1_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_path = save_tiny_classifier(tmp_path_factory.mktemp("served") / "model.pth")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "dinov2.classify.serve", "--model", str(model_path), "--host", "127.0.0.1",
         "--port", str(port), "--max-upload-mb", str(MAX_UPLOAD_BYTES / 2**20), "--max-image-pixels", str(MAX_PIXELS)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited: {process.stdout.read().decode(errors='replace')}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail("server did not start within 90 s")
            time.sleep(0.3)
        yield url, model_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_health(server):
    url, model_path = server
    body = httpx.get(f"{url}/health").json()
    assert body["status"] == "ok"
    assert body["tasks"]["presence"] == ["clear", "none", "resembles"]
    assert body["max_upload_bytes"] == MAX_UPLOAD_BYTES


def test_prediction_matches_python_api(server):
    url, model_path = server
    image = random_image(5, size=(24, 20))
    response = httpx.post(f"{url}/predict", files={"file": ("drawing.png", _png(image), "image/png")})
    assert response.status_code == 200, response.text
    served = response.json()
    local = predict(images=[image], model=model_path, output_format="json")[0]
    assert served["image"] == "drawing.png"
    assert served["predictions"].keys() == local["predictions"].keys()
    for task, pred in local["predictions"].items():
        assert served["predictions"][task]["label"] == pred["label"]
        for name, p in pred["probabilities"].items():
            assert served["predictions"][task]["probabilities"][name] == pytest.approx(p, abs=1e-6)


def test_rejections_are_4xx_with_reasons(server):
    url, _ = server
    not_image = httpx.post(f"{url}/predict", files={"file": ("notes.txt", b"hello, not an image", "text/plain")})
    assert not_image.status_code == 415
    assert "not an image" in not_image.json()["detail"]

    truncated = _png(random_image(1))[:60]
    broken = httpx.post(f"{url}/predict", files={"file": ("cut.png", truncated, "image/png")})
    assert broken.status_code == 400, broken.text
    assert "cut.png" in broken.json()["detail"]

    too_many_pixels = httpx.post(f"{url}/predict", files={"file": ("big.png", _png(random_image(2, size=(40, 40))), "image/png")})
    assert too_many_pixels.status_code == 413
    assert "40x40" in too_many_pixels.json()["detail"]

    oversized = httpx.post(f"{url}/predict", files={"file": ("huge.png", os.urandom(3 * MAX_UPLOAD_BYTES), "image/png")})
    assert oversized.status_code == 413

    missing_field = httpx.post(f"{url}/predict", files={"other": ("a.png", b"x", "image/png")})
    assert missing_field.status_code == 422

    # The server is still healthy after the bad requests.
    assert httpx.get(f"{url}/health").status_code == 200
