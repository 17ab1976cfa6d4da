"""The HTTP service, tested against a real uvicorn server on 127.0.0.1 and in-process."""

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from classify_helpers import random_image, save_tiny_classifier
from PIL import Image, ImageFile
from prometheus_client.parser import text_string_to_metric_families

from dinov2.classify import serve
from dinov2.classify.predict import Predictor, predict

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
        [
            sys.executable,
            "-m",
            "dinov2.classify.serve",
            "--model",
            str(model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-upload-mb",
            str(MAX_UPLOAD_BYTES / 2**20),
            "--max-image-pixels",
            str(MAX_PIXELS),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
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

    too_many_pixels = httpx.post(
        f"{url}/predict", files={"file": ("big.png", _png(random_image(2, size=(40, 40))), "image/png")}
    )
    assert too_many_pixels.status_code == 413
    assert "40x40" in too_many_pixels.json()["detail"]

    oversized = httpx.post(
        f"{url}/predict", files={"file": ("huge.png", os.urandom(3 * MAX_UPLOAD_BYTES), "image/png")}
    )
    assert oversized.status_code == 413

    missing_field = httpx.post(f"{url}/predict", files={"other": ("a.png", b"x", "image/png")})
    assert missing_field.status_code == 422

    # The server is still healthy after the bad requests.
    assert httpx.get(f"{url}/health").status_code == 200


# ----------------------------------------------------------------------------- in-process checks
# The tests below run the app in this process (fastapi's TestClient, httpx's ASGI transport):
# nothing listens on any address.


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
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": TOKEN},
            {"Authorization": f"Basic {TOKEN}"},
        ):
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
                *(
                    client.post("/predict", files={"file": (f"{i}.png", _png(random_image(i)), "image/png")})
                    for i in range(6)
                )
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


# ----------------------------------------------------------------------------- /metrics


def _samples(text: str) -> dict:
    """``{(sample name, ((label, value), ...)): value}`` of a Prometheus text scrape."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def _requests(route, status, method="GET"):
    return {"name": "dinov2_serve_requests_total", "route": route, "method": method, "status": str(status)}


def test_metrics_count_requests_rejections_and_images(served_model, monkeypatch):
    predictor, path = served_model
    with _client(predictor, max_upload_bytes=MAX_UPLOAD_BYTES, max_image_pixels=MAX_PIXELS) as client:
        first = client.get("/metrics")
        assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
        before = _samples(first.text)
        for seed in (1, 2):
            assert _post(client, f"{seed}.png", _png(random_image(seed))).status_code == 200
        assert _post(client, "notes.txt", b"not an image at all").status_code == 415
        assert _post(client, "big.png", _png(random_image(3, size=(40, 40)))).status_code == 413  # pixels
        assert _post(client, "huge.png", os.urandom(2 * MAX_UPLOAD_BYTES)).status_code == 413  # body
        assert client.post("/predict", files={"other": ("a.png", b"x")}).status_code == 422
        no_boundary = {"content-type": "multipart/form-data"}
        assert client.post("/predict", content=b"abc", headers=no_boundary).status_code == 400
        assert client.get("/health").status_code == 200
        assert client.get("/no-such/secret-path-7").status_code == 404
        assert client.request("BREW", "/health").status_code == 405
        monkeypatch.setattr(predictor, "records", lambda *args: 1 / 0)  # a model failure: 500
        assert _post(client, "boom.png", _png(random_image(4))).status_code == 500
        text = client.get("/metrics").text
    after = _samples(text)

    expected = {
        ("/predict", "POST", "200"): 2,
        ("/predict", "POST", "415"): 1,
        ("/predict", "POST", "413"): 2,
        ("/predict", "POST", "422"): 1,
        ("/predict", "POST", "400"): 1,
        ("/predict", "POST", "500"): 1,
        ("/health", "GET", "200"): 1,
        ("unmatched", "GET", "404"): 1,
        ("/health", "other", "405"): 1,
        ("/metrics", "GET", "200"): 1,
    }
    for (route, method, status), count in expected.items():
        assert _delta(before, after, **_requests(route, status, method)) == count, (route, method, status)
    counted = {labels: v for (name, labels), v in after.items() if name == "dinov2_serve_requests_total"}
    assert sum(counted.values()) == sum(expected.values())  # a new app: nothing else was counted
    latency = "dinov2_serve_request_duration_seconds_count"
    assert _delta(before, after, latency, route="/predict") == 8
    assert _delta(before, after, "dinov2_serve_request_duration_seconds_bucket", route="/predict", le="+Inf") == 8
    # Images per POST /predict: 2 classified, 6 refused or failed.
    assert _delta(before, after, "dinov2_serve_images_per_request_count") == 8
    assert _delta(before, after, "dinov2_serve_images_per_request_sum") == 2
    assert _delta(before, after, "dinov2_serve_images_per_request_bucket", le="0.0") == 6
    rejections = {
        "unsupported_format": 1,
        "too_many_pixels": 1,
        "body_too_large": 1,
        "invalid_request": 2,
        "corrupt": 0,
    }
    for reason, count in rejections.items():
        assert _delta(before, after, "dinov2_serve_upload_rejections_total", reason=reason) == count, reason
    assert ("dinov2_serve_upload_rejections_total", (("reason", "out_of_memory"),)) in before  # exported at 0
    # Decoded: the two good images, the 415, the 413 on pixels and the failing one; classified: two.
    assert _delta(before, after, "dinov2_serve_decode_seconds_count") == 5
    assert _delta(before, after, "dinov2_serve_inference_seconds_count") == 2
    assert _value(after, "dinov2_serve_requests_in_flight") == 1  # the scrape itself
    assert _value(after, "dinov2_serve_uploads_waiting") == 0
    info = [labels for (name, labels), _ in after.items() if name == "dinov2_serve_model_info"]
    assert info == [
        (
            ("device", "cpu"),
            ("model_sha256", hashlib.sha256(path.read_bytes()).hexdigest()),
            ("multi_crop", "false"),
            ("tta", "true"),
        )
    ]
    assert "dinov2_serve_model_load_seconds" not in text  # the Predictor was loaded elsewhere
    assert "process_resident_memory_bytes" in text
    # Route templates only: neither the requested path nor the model's location shows.
    assert "secret-path-7" not in text and "secret_dir" not in text and "model.pth" not in text and "BREW" not in text

    # Each app counts its own requests (a registry per app, not prometheus_client's global one).
    with _client(predictor) as other:
        fresh = _samples(other.get("/metrics").text)
    assert _value(fresh, **_requests("/predict", 200, "POST")) == 0


def test_metrics_need_the_token(served_model):
    with _client(served_model[0], token=TOKEN) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert _post(client, "a.png", _png(random_image(1))).status_code == 401
        response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    samples = _samples(response.text)
    assert _value(samples, **_requests("/metrics", 401)) == 2  # refused scrapes are counted too
    assert _value(samples, **_requests("/predict", 401, "POST")) == 1
    # An unauthorised request is no upload: neither an image count nor a rejection reason.
    assert _value(samples, "dinov2_serve_images_per_request_count") == 0
    assert sum(v for (name, _), v in samples.items() if name == "dinov2_serve_upload_rejections_total") == 0


@contextlib.contextmanager
def _uvicorn_in_thread(app, timeout=30.0):
    """A real uvicorn server on a free 127.0.0.1 port, in a thread; stopped (and joined) on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", server_header=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped during start-up"
            assert time.monotonic() < deadline, f"uvicorn did not start within {timeout} s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
    assert not thread.is_alive(), f"uvicorn did not stop within {timeout} s"


def test_metrics_scraped_from_a_real_server(tmp_path):
    model_path = save_tiny_classifier(tmp_path / "model.pth")
    app = serve.create_app(model_path, device="cpu", max_upload_bytes=MAX_UPLOAD_BYTES)
    with _uvicorn_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        before = _samples(client.get("/metrics").text)
        for seed in range(3):
            assert client.post("/predict", files={"file": (f"{seed}.png", _png(random_image(seed)))}).status_code == 200
        assert client.post("/predict", files={"file": ("cut.png", _png(random_image(1))[:60])}).status_code == 400
        assert client.post("/predict", files={"file": ("x.png", os.urandom(2 * MAX_UPLOAD_BYTES))}).status_code == 413
        assert client.get("/missing").status_code == 404
        response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        after_text = client.get("/metrics").text
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    after = _samples(after_text)
    assert _delta(before, after, **_requests("/predict", 200, "POST")) == 3
    assert _delta(before, after, **_requests("/predict", 400, "POST")) == 1
    assert _delta(before, after, **_requests("/predict", 413, "POST")) == 1
    assert _delta(before, after, **_requests("unmatched", 404)) == 1
    assert _delta(before, after, **_requests("/metrics", 200)) == 2
    assert _delta(before, after, "dinov2_serve_request_duration_seconds_count", route="/predict") == 5
    assert _delta(before, after, "dinov2_serve_images_per_request_sum") == 3
    assert _delta(before, after, "dinov2_serve_upload_rejections_total", reason="corrupt") == 1
    assert _delta(before, after, "dinov2_serve_upload_rejections_total", reason="body_too_large") == 1
    assert 0 < _value(after, "dinov2_serve_model_load_seconds") < 60
    assert str(tmp_path) not in after_text
