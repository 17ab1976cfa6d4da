"""A small HTTP service around a classifier (FastAPI + uvicorn, the ``serve`` extra).

    DINOV2_SERVE_TOKEN=$(cat token.txt) python -m dinov2.classify.serve --model runs/shapes/model_best.pth
    curl -H "Authorization: Bearer $(cat token.txt)" -F file=@drawing.png http://127.0.0.1:8000/predict

Endpoints:

* ``GET /health`` -> ``{"status": "ok", "model_sha256": ..., "device": ..., "tasks": {task: [classes]},
  <the limits>}``; no file-system path is ever part of a response.
* ``POST /predict`` with a multipart file field ``file`` -> the same JSON record as
  :func:`dinov2.classify.predict.predict` gives for one image (``{"image", "predictions"}``).
* ``GET /metrics`` -> Prometheus metrics (text format): requests by route template, method and
  status, latency, images per request, upload rejections by reason, decode and inference time,
  in-flight and waiting requests, model load time. Labels are route templates, never raw paths.
* ``GET /openapi.json`` (and, without a token only, the ``/docs`` and ``/redoc`` pages).

With a token (``--token-file``, ``$DINOV2_SERVE_TOKEN`` or ``--token``) every request, on every
path, needs ``Authorization: Bearer <token>``; anything else gets 401 before its body is read.

The model is loaded once, at start-up. Uploads are checked before any pixel is decoded, so memory
stays bounded whatever a client sends:

* a body larger than ``max_upload_bytes`` -> 413 (FastAPI's request body limit, counted while
  reading, so a lying or missing Content-Length does not help);
* an upload that is not a PNG, JPEG, BMP, GIF, TIFF or WebP image -> 415;
* an image whose header declares more than ``max_image_pixels`` pixels, or an aspect ratio beyond
  ``max_aspect_ratio`` -> 413. The model resizes the short side to ``resize_size``, so a 1 x 39 M
  strip under the pixel limit would still become billions of pixels; the aspect ratio bounds the
  resized image to ``resize_size**2 * max_aspect_ratio`` pixels;
* a truncated or corrupt image -> 400;
* no ``file`` field -> 422 (FastAPI validation).

At most ``max_concurrent`` uploads are decoded and classified at once (the others wait without
holding a thread or their decoded pixels), and an image much larger than the model needs is
shrunk by an integer factor right away (JPEG: decoded at 1/2, 1/4 or 1/8 scale; then a bicubic
PIL resize) while keeping its short side at least ``REDUCING_GAP * resize_size``, so the model's
antialiased resize never runs on tens of millions of pixels. The model then sees practically the
same image: in normalised units its views differ from those of the full-size image by about 0.002
on average (a seventh of one 8-bit grey level), or about 0.02 when the shrunk size is rounded by
a pixel, which moves the centre crop as much as cutting one row off the full image does.
"""

import argparse
import hashlib
import hmac
import io
import ipaddress
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

from PIL import Image, UnidentifiedImageError

from .predict import Predictor

logger = logging.getLogger("dinov2")

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_ASPECT_RATIO = 20.0
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_MAX_CONNECTIONS = 64
TOKEN_ENV = "DINOV2_SERVE_TOKEN"
# The formats an upload may be in. Opening only these keeps PIL's rarer decoders (and EPS, which
# runs Ghostscript) away from data sent by strangers.
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
# An image is shrunk before the model's resize only while its short side stays at least this many
# times the resize target (PIL's ``reducing_gap`` reasoning: then the final antialiased resize
# still does the real filtering and the result is practically that of the full image).
REDUCING_GAP = 3
_MAX_NAME_CHARS = 200


# Why an upload was refused: the ``reason`` label of ``dinov2_serve_upload_rejections_total``. The
# last two are decided before the endpoint runs (FastAPI's body limit and form validation).
REJECTION_REASONS = (
    "empty",  # 400: no bytes, or an image of width or height 0
    "unsupported_format",  # 415
    "too_many_pixels",  # 413: the pixel limit, or PIL's decompression-bomb limit
    "aspect_ratio",  # 413
    "corrupt",  # 400: unreadable, truncated or corrupt image data
    "out_of_memory",  # 503
    "body_too_large",  # 413: more than max_upload_bytes
    "invalid_request",  # 4xx: no ``file`` field, malformed multipart body
)


class UploadError(Exception):
    """A rejected upload: HTTP status, a message for the client and a reason for the metrics
    (one of :data:`REJECTION_REASONS`)."""

    def __init__(self, status_code: int, detail: str, reason: str):
        super().__init__(detail)
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; one of {REJECTION_REASONS}")
        self.status_code = status_code
        self.detail = detail
        self.reason = reason


def check_image_size(
    width: int,
    height: int,
    name: str,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    resize_size: Optional[int] = None,
) -> None:
    """:class:`UploadError` (400 or 413) unless a ``width`` x ``height`` image is within the limits."""
    if width < 1 or height < 1:
        raise UploadError(400, f"upload {name!r} declares an empty image ({width}x{height})", "empty")
    if width * height > max_image_pixels:
        raise UploadError(
            413,
            f"image {name!r} is {width}x{height} = {width * height} pixels; the limit is {max_image_pixels}",
            "too_many_pixels",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        resized = ""
        if resize_size:
            resized = (
                f" (with its short side resized to {resize_size} px for the model it would have "
                f"{resize_size * round(resize_size * ratio)} pixels)"
            )
        raise UploadError(
            413,
            f"image {name!r} is {width}x{height}, an aspect ratio of {ratio:.4g}:1; the limit is "
            f"{max_aspect_ratio:g}:1{resized}",
            "aspect_ratio",
        )


def _shrink_factor(size, resize_size: Optional[int]) -> int:
    if not resize_size:
        return 1
    return max(1, min(size) // (REDUCING_GAP * resize_size))


def decode_upload(
    data: bytes,
    name: str,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    resize_size: Optional[int] = None,
) -> Image.Image:
    """Bytes -> RGB image, or :class:`UploadError` with the right 4xx status.

    The size limits are checked on the header, before any pixel is decoded. With ``resize_size``
    (the model's resize target) an image far larger than needed is shrunk by an integer factor,
    JPEG already while decoding.
    """
    if not data:
        raise UploadError(400, f"upload {name!r} is empty", "empty")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past 2x its global limit raises) for huge images; we decide ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except UnidentifiedImageError:
        raise UploadError(
            415,
            f"upload {name!r} is not an image in one of the accepted formats ({', '.join(UPLOAD_FORMATS)})",
            "unsupported_format",
        ) from None
    except Image.DecompressionBombError as error:
        raise UploadError(413, f"upload {name!r} is too large an image: {error}", "too_many_pixels") from None
    except Exception as error:  # PIL's parsers raise many kinds (OSError, SyntaxError, struct.error, ...)
        raise UploadError(400, f"upload {name!r} cannot be read as an image: {_reason(error)}", "corrupt") from None
    check_image_size(*image.size, name, max_image_pixels, max_aspect_ratio, resize_size)
    try:
        factor = _shrink_factor(image.size, resize_size)
        if factor > 1 and image.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale (never below size / factor): the full-size pixels
            # are never in memory.
            image.draft(None, (max(1, image.width // factor), max(1, image.height // factor)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()  # full decode: truncated or corrupt data fails here
        # Some formats only know their final size after decoding: check again.
        check_image_size(*image.size, name, max_image_pixels, max_aspect_ratio, resize_size)
        if image.mode != "RGB":
            image = image.convert("RGB")
        factor = _shrink_factor(image.size, resize_size)
        if factor > 1:
            # A filtered resize, not Image.reduce: reduce's box grid does not fit a size that the
            # factor does not divide, which shifts the picture.
            size = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        return image
    except UploadError:
        raise
    except MemoryError:
        raise UploadError(503, f"not enough memory free to decode {name!r} now; retry later", "out_of_memory") from None
    except Image.DecompressionBombError as error:
        raise UploadError(413, f"upload {name!r} is too large an image: {error}", "too_many_pixels") from None
    except Exception as error:  # whatever the decoder raises on bad data is the upload's fault
        raise UploadError(400, f"image {name!r} is truncated or corrupt: {_reason(error)}", "corrupt") from None


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (a name other than localhost
    may resolve to anything, so it counts as exposed)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, token: Optional[str]) -> bool:
    """Log a warning (and return True) when binding ``host`` without a token lets other machines in."""
    if token or is_loopback(host):
        return False
    logger.warning(
        "serving on %s without a token: anyone who can reach this address can classify images, read "
        "/health, /metrics, /docs and /openapi.json. Set $%s or --token-file, or bind to 127.0.0.1.",
        host,
        TOKEN_ENV,
    )
    return True


class BearerTokenMiddleware:
    """ASGI middleware answering 401 to every HTTP request (any path) that lacks
    ``Authorization: Bearer <token>``, before the request body is read."""

    def __init__(self, app, token: str):
        self.app = app
        self._expected = token.encode("utf-8")

    def _authorised(self, scope) -> bool:
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                # compare_digest: the time taken does not tell how much of a guess was right.
                return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._expected)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        response = JSONResponse(
            {"detail": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


# Label values for what clients choose: a request that matches no route, and a method outside
# HTTP's usual set. Raw paths or methods as labels would let any client create new series.
UNMATCHED_ROUTE = "unmatched"
OTHER_METHOD = "other"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds. From a rejected header (about a millisecond) to a large image with multi-crop TTA on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
IMAGE_COUNT_BUCKETS = (0, 1, 2, 4, 8, 16, 32)


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of their own: several apps in one process
    (tests, or two models behind one server) keep separate counts, and ``/metrics`` of one app
    shows that app only. Names are listed in docs/classify.md."""

    def __init__(self):
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            Info,
            PlatformCollector,
            ProcessCollector,
        )

        self.registry = CollectorRegistry(auto_describe=True)
        # Memory, CPU time and open files of the server process (Linux), and the Python version.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        metric = {"namespace": "dinov2_serve", "registry": self.registry}
        self.requests = Counter(
            "requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            **metric,
        )
        self.latency = Histogram(
            "request_duration_seconds",
            "Time from receiving a request to sending the end of its response.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            **metric,
        )
        self.in_flight = Gauge("requests_in_flight", "HTTP requests being answered (a scrape counts itself).", **metric)
        self.waiting = Gauge("uploads_waiting", "Uploads waiting for a decoding slot (max_concurrent).", **metric)
        self.images = Histogram(
            "images_per_request",
            "Images classified per authorised POST /predict request (0: refused or failed).",
            buckets=IMAGE_COUNT_BUCKETS,
            **metric,
        )
        self.rejections = Counter(
            "upload_rejections",
            "Uploads refused, by reason (see docs/classify.md for the statuses).",
            ["reason"],
            **metric,
        )
        for reason in REJECTION_REASONS:  # every reason is a series from the start, so rate() works
            self.rejections.labels(reason=reason)
        self.decode = Histogram(
            "decode_seconds",
            "Time to check, decode and shrink one upload (refused ones included).",
            buckets=LATENCY_BUCKETS,
            **metric,
        )
        self.inference = Histogram(
            "inference_seconds",
            "Time the model took for one image (without waiting for the model).",
            buckets=LATENCY_BUCKETS,
            **metric,
        )
        self.model = Info("model", "The served model: its file's SHA-256 and how it runs.", **metric)
        # Registered once set: the load time is only known when the app loaded the model itself.
        self.model_load = Gauge(
            "model_load_seconds",
            "Seconds it took to load the model (and checksum its file) at start-up.",
            namespace="dinov2_serve",
            registry=None,
        )

    def set_model_load_seconds(self, seconds: float) -> None:
        self.model_load.set(seconds)
        self.registry.register(self.model_load)

    def record_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self, accept: str):
        """``(body, content type)`` of a scrape, in the format the ``Accept`` header asks for."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def route_template(routes, scope) -> str:
    """The path template of the route that will answer ``scope`` (``/predict``), matched as
    Starlette's router does (a full match first, else a method mismatch), or :data:`UNMATCHED_ROUTE`."""
    from starlette.routing import Match

    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route.path
        if match is Match.PARTIAL and partial is None:
            partial = route.path
    return partial or UNMATCHED_ROUTE


class RequestMetricsMiddleware:
    """ASGI middleware recording every HTTP request in :class:`ServiceMetrics`, around everything
    else (token check, body limit, error handler), so 401s, 413s and 500s are counted too.

    A request is recorded just before the last part of its response is sent: a client that has a
    whole response can rely on it being counted (the tests do). An authorised ``POST /predict`` also
    records the images classified and, for a refused upload, the reason, which the endpoint leaves in the
    request state (``images_classified``, ``upload_rejection``).
    """

    def __init__(self, app, metrics: ServiceMetrics, routes):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_template(self.routes, scope)
        method = scope["method"] if scope["method"] in _METHODS else OTHER_METHOD
        state = scope.setdefault("state", {})  # the dict behind request.state
        start = time.perf_counter()
        status, recorded = None, False
        self.metrics.in_flight.inc()

        def record(final_status: int) -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            self.metrics.in_flight.dec()
            self.metrics.record_request(route, method, final_status, time.perf_counter() - start)
            if route == "/predict" and method == "POST" and final_status != 401:  # 401: not an upload yet
                self._record_upload(final_status, state)

        async def send_recorded(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record(status)
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        finally:
            # No complete response: the server answers 500 to an app that failed before starting one.
            record(status if status is not None else 500)

    def _record_upload(self, status: int, state: dict) -> None:
        self.metrics.images.observe(state.get("images_classified", 0))
        reason = state.get("upload_rejection")
        if reason is None and 400 <= status < 500:
            # Refused before the endpoint ran: FastAPI's body limit or form validation.
            reason = "body_too_large" if status == 413 else "invalid_request"
        if reason is not None:
            self.metrics.rejections.labels(reason=reason).inc()


def create_app(
    model_path: Union[str, os.PathLike, Predictor],
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    device: Optional[str] = None,
    tta: bool = True,
    multi_crop: bool = False,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    token: Optional[str] = None,
):
    """The FastAPI application serving one classifier (a path, or an already loaded Predictor).

    ``token``: when given, every request needs ``Authorization: Bearer <token>``, and the
    interactive ``/docs`` and ``/redoc`` pages are off (a browser cannot send the header for them);
    ``/openapi.json`` stays available with the token.
    """
    try:
        import anyio
        import prometheus_client  # noqa: F401  (ServiceMetrics imports its parts)
        from fastapi import FastAPI, File, HTTPException, Request, Response, UploadFile
        from fastapi.concurrency import run_in_threadpool
    except ImportError as error:
        raise ImportError("the HTTP service needs: pip install 'dinov2[serve]'") from error
    if max_upload_bytes < 1 or max_image_pixels < 1 or max_concurrent < 1:
        raise ValueError("max_upload_bytes, max_image_pixels and max_concurrent must be positive")
    if max_aspect_ratio < 1:
        raise ValueError(f"max_aspect_ratio must be >= 1, got {max_aspect_ratio}")
    if token is not None:
        token = token.strip()
        # HTTP headers are ASCII; a space would end the credentials early.
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            raise ValueError("the service token must be non-empty printable ASCII without spaces")

    metrics = ServiceMetrics()
    start = time.perf_counter()
    if isinstance(model_path, Predictor):
        predictor = model_path
    else:
        predictor = Predictor(model_path, device=device, tta=tta, multi_crop=multi_crop, batch_size=1)
    model_sha256 = _sha256(predictor.model_file)
    if not isinstance(model_path, Predictor):
        metrics.set_model_load_seconds(time.perf_counter() - start)
    metrics.model.info(
        {
            "model_sha256": model_sha256,
            "device": str(predictor.device),
            "tta": str(predictor.tta).lower(),
            "multi_crop": str(predictor.multi_crop).lower(),
        }
    )
    resize_size = int(predictor.config.preprocessing["resize_size"])
    lock = threading.Lock()  # one inference at a time: the model already uses every core
    # Decoding and inference slots. Waiting requests hold neither a worker thread nor pixels: their
    # bodies stay in Starlette's spooled upload files until a slot is free.
    slots = anyio.Semaphore(max_concurrent)
    docs = {} if token is None else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="dinov2 classifier", max_body_size=max_upload_bytes, **docs)
    if token is not None:
        app.add_middleware(BearerTokenMiddleware, token=token)
    # The metrics middleware goes around the whole stack Starlette builds (add_middleware would put
    # it inside FastAPI's error handler and body limit, which answer 500 and 413 themselves).
    build_stack = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestMetricsMiddleware(build_stack(), metrics, app.router.routes)
    app.state.predictor = predictor
    app.state.metrics = metrics

    @app.get("/health")
    def health():
        return {
            "status": "ok",
            "model_sha256": model_sha256,
            "device": str(predictor.device),
            "tta": predictor.tta,
            "multi_crop": predictor.multi_crop,
            "tasks": {h.name: list(h.classes) for h in predictor.heads},
            "max_upload_bytes": max_upload_bytes,
            "max_image_pixels": max_image_pixels,
            "max_aspect_ratio": max_aspect_ratio,
            "max_concurrent": max_concurrent,
            "auth": token is not None,
        }

    @app.get("/metrics", include_in_schema=False)
    async def scrape(request: Request):
        # async: a scrape is answered even while every worker thread is busy classifying.
        body, content_type = metrics.render(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    def run(data: bytes, name: str) -> dict:
        start = time.perf_counter()
        try:
            image = decode_upload(data, name, max_image_pixels, max_aspect_ratio, resize_size)
        finally:
            metrics.decode.observe(time.perf_counter() - start)
        with lock:
            start = time.perf_counter()
            record = predictor.records([name], [image])[0]
            metrics.inference.observe(time.perf_counter() - start)
        return record

    @app.post("/predict")
    async def predict_upload(request: Request, file: UploadFile = File(...)):
        # The name is the client's; it is echoed back in the record, so keep it short.
        name = (file.filename or "upload")[:_MAX_NAME_CHARS]
        with metrics.waiting.track_inprogress():
            await slots.acquire()
        try:
            data = await file.read()
            record = await run_in_threadpool(run, data, name)
        except UploadError as error:
            request.state.upload_rejection = error.reason  # for RequestMetricsMiddleware
            raise HTTPException(status_code=error.status_code, detail=error.detail) from None
        finally:
            slots.release()
        request.state.images_classified = 1
        return record

    return app


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def resolve_token(token: Optional[str], token_file: Optional[str]) -> Optional[str]:
    """The service token from ``--token``, ``--token-file`` or ``$DINOV2_SERVE_TOKEN``, in that order."""
    if token is not None:
        value, source = token, "--token"
    elif token_file is not None:
        value, source = Path(token_file).read_text(encoding="utf-8"), f"--token-file {token_file}"
    elif os.environ.get(TOKEN_ENV) is not None:
        value, source = os.environ[TOKEN_ENV], f"${TOKEN_ENV}"
    else:
        return None
    if not value.strip():
        raise ValueError(f"the service token from {source} is empty")
    return value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve a dinov2 classifier over HTTP.")
    parser.add_argument("--model", required=True, help="classifier file (.pth) or classifier training output dir")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--multi-crop", action="store_true")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20)
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    parser.add_argument(
        "--max-aspect-ratio",
        type=float,
        default=DEFAULT_MAX_ASPECT_RATIO,
        help="refuse (413) images whose long side exceeds this many times the short side",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=DEFAULT_MAX_CONCURRENT,
        help="uploads decoded and classified at once; the others wait",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="open connections beyond this get 503 (uvicorn's limit_concurrency)",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        help=f"file holding the bearer token every request must send (or set ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="the bearer token itself (visible to other users in the process list: prefer "
        f"--token-file or ${TOKEN_ENV})",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    token = resolve_token(args.token, args.token_file)
    warn_if_exposed(args.host, token)
    app = create_app(
        args.model,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        device=args.device,
        tta=not args.no_tta,
        multi_crop=args.multi_crop,
        max_aspect_ratio=args.max_aspect_ratio,
        max_concurrent=args.max_concurrent,
        token=token,
    )
    uvicorn.run(app, host=args.host, port=args.port, limit_concurrency=args.max_connections, server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
