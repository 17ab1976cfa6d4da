"""The HTTP service, tested against a real uvicorn server on 127.0.0.1 and in-process."""

import io
import json
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


# ----------------------------------------------------------------------------- in-process checks
# The tests below run the app in this process (fastapi's TestClient, httpx's ASGI transport):
# nothing listens on any address.
import asyncio
import hashlib
import logging
import threading

from PIL import Image, ImageFile

from dinov2.classify import serve
from dinov2.classify.predict import Predictor

TOKEN = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    path = save_tiny_classifier(tmp_path_factory.mktemp("in_process") / "secret_dir" / "model.pth")
    return Predictor(path, device="cpu", batch_size=1), path


def _client(predictor, **kwargs):
    from fastapi.testclient import TestClient

    return TestClient(serve.create_app(predictor, **kwargs), raise_server_exceptions=False)


def _post(client, name, data, **kwargs):
    return client.post("/predict", files={"file": (name, data, "application/octet-stream")}, **kwargs)


def _no_decoding(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_strip_under_the_pixel_limit_is_refused_from_its_header(served_model, monkeypatch):
    # 39 M pixels (under the 40 M default) in a 5 kB PNG; resized to the model's short side it
    # would be billions of pixels. It must be refused before any pixel is decoded.
    strip = io.BytesIO()
    Image.new("1", (39_000_000, 1)).save(strip, format="PNG")
    assert len(strip.getvalue()) < 10_000
    _no_decoding(monkeypatch)
    with _client(served_model[0]) as client:
        response = _post(client, "strip.png", strip.getvalue())
    assert response.status_code == 413, response.text
    assert "aspect ratio" in response.json()["detail"] and "39000000x1" in response.json()["detail"]


def test_aspect_ratio_limit(served_model):
    with _client(served_model[0], max_aspect_ratio=10) as client:
        wide = _post(client, "wide.png", _png(random_image(3, size=(330, 30))))
        tall = _post(client, "tall.png", _png(random_image(3, size=(20, 201))))
        fine = _post(client, "fine.png", _png(random_image(3, size=(300, 30))))
    assert wide.status_code == 413 and "11:1; the limit is 10:1" in wide.json()["detail"]
    assert tall.status_code == 413
    assert fine.status_code == 200, fine.text


def test_bad_uploads_get_4xx_never_500(served_model):
    ico = io.BytesIO()
    random_image(1, size=(16, 16)).save(ico, format="ICO")  # PIL reads it, the service does not accept it
    png = _png(random_image(4))
    jpeg = io.BytesIO()
    random_image(4, size=(64, 64)).save(jpeg, format="JPEG")
    corrupt = png[:200] + bytes(b ^ 0xFF for b in png[200:240]) + png[240:]
    cases = {
        "garbage.png": (os.urandom(500), 415),
        "fake.gif": (b"GIF89a but not really" * 3, 415),
        "icon.ico": (ico.getvalue(), 415),
        "cut.png": (png[: len(png) // 2], 400),
        "corrupt.png": (corrupt, 400),
        "cut.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], 400),
    }
    with _client(served_model[0]) as client:
        for name, (data, status) in cases.items():
            response = _post(client, name, data)
            assert response.status_code in (400, 415), (name, response.status_code, response.text)
            assert response.status_code == status, (name, response.text)
            assert name in response.json()["detail"]
        assert client.get("/health").status_code == 200


def test_large_images_are_shrunk_before_the_model_resize(served_model):
    resize = served_model[0].config.preprocessing["resize_size"]  # 20 px for the tiny model
    gradient = Image.linear_gradient("L").resize((400, 300)).convert("RGB")
    png = serve.decode_upload(_png(gradient), "big.png", resize_size=resize)
    assert min(png.size) >= serve.REDUCING_GAP * resize and png.size == (80, 60)
    jpeg_bytes = io.BytesIO()
    gradient.resize((4000, 3000)).save(jpeg_bytes, format="JPEG")
    opened = Image.open(io.BytesIO(jpeg_bytes.getvalue()))
    jpeg = serve.decode_upload(jpeg_bytes.getvalue(), "big.jpg", resize_size=resize)
    assert opened.size == (4000, 3000)
    assert serve.REDUCING_GAP * resize <= min(jpeg.size) < 2 * serve.REDUCING_GAP * resize
    # Without a resize target (or for images that are not much larger) nothing is shrunk.
    assert serve.decode_upload(_png(gradient), "big.png").size == (400, 300)
    # The model sees practically the same image: predictions agree with the full-size ones.
    local = predict(images=[gradient], model=served_model[0], output_format="json")[0]
    with _client(served_model[0]) as client:
        served = _post(client, "big.png", _png(gradient)).json()
    for task, pred in local["predictions"].items():
        assert served["predictions"][task]["label"] == pred["label"]
        for name, p in pred["probabilities"].items():
            assert served["predictions"][task]["probabilities"][name] == pytest.approx(p, abs=0.02)


def test_token_guards_every_path_and_docs(served_model):
    with _client(served_model[0], token=TOKEN) as client:
        good = {"Authorization": f"Bearer {TOKEN}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
            for path in ("/health", "/openapi.json", "/docs", "/redoc", "/no-such-path"):
                response = client.get(path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
            assert _post(client, "a.png", _png(random_image(1)), headers=headers).status_code == 401
        assert client.get("/health", headers=good).json()["auth"] is True
        assert client.get("/openapi.json", headers=good).status_code == 200
        assert client.get("/docs", headers=good).status_code == 404  # a browser cannot send the token
        assert _post(client, "a.png", _png(random_image(1)), headers=good).status_code == 200
    for bad in ("", "  ", "two words", "caf\u00e9"):
        with pytest.raises(ValueError, match="token"):
            serve.create_app(served_model[0], token=bad)
    with _client(served_model[0]) as open_client:  # no token: loopback use, everything open
        assert open_client.get("/health").json()["auth"] is False
        assert open_client.get("/docs").status_code == 200


def test_health_shows_no_paths(served_model):
    predictor, path = served_model
    with _client(predictor) as client:
        text = client.get("/health").text
        body = json.loads(text)
    assert body["model_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "secret_dir" not in text and str(path.parent.parent) not in text and "model.pth" not in text


def test_concurrent_decodes_are_limited(served_model, monkeypatch):
    active, peak, guard = [0], [0], threading.Lock()
    decode = serve.decode_upload

    def slow_decode(*args, **kwargs):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.2)
            return decode(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(serve, "decode_upload", slow_decode)
    app = serve.create_app(served_model[0], max_concurrent=2)

    async def send_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(
                *(client.post("/predict", files={"file": (f"{i}.png", _png(random_image(i)), "image/png")}) for i in range(6))
            )

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * 6
    assert peak[0] == 2


def test_start_up_warns_when_exposed_without_a_token(served_model, monkeypatch, caplog, tmp_path):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    model = str(served_model[1])
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        serve.main(["--model", model, "--host", "0.0.0.0"])
    assert "without a token" in caplog.text and calls[-1][1]["host"] == "0.0.0.0"
    assert calls[-1][1]["limit_concurrency"] == serve.DEFAULT_MAX_CONNECTIONS

    for argv, env in ((["--host", "127.0.0.1"], None), (["--host", "::1"], None), (["--host", "0.0.0.0"], TOKEN)):
        caplog.clear()
        if env:
            monkeypatch.setenv(serve.TOKEN_ENV, env)
        with caplog.at_level(logging.WARNING, logger="dinov2"):
            serve.main(["--model", model, *argv])
        assert "without a token" not in caplog.text, argv
    from fastapi.testclient import TestClient

    with TestClient(calls[-1][0]) as client:  # the token came from the environment
        assert client.get("/health").status_code == 401
        assert client.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200

    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    serve.main(["--model", model, "--token-file", str(token_file)])
    with TestClient(calls[-1][0]) as client:
        assert client.get("/health", headers={"Authorization": "Bearer from-a-file"}).status_code == 200
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        serve.main(["--model", model, "--token-file", str(token_file)])
