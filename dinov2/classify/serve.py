"""A small HTTP service around a classifier (FastAPI + uvicorn, the ``serve`` extra).

    DINOV2_SERVE_TOKEN=$(cat token.txt) python -m dinov2.classify.serve --model runs/shapes/model_best.pth
    curl -H "Authorization: Bearer $(cat token.txt)" -F file=@drawing.png http://127.0.0.1:8000/predict

Endpoints:

* ``GET /health`` -> ``{"status": "ok", "model_sha256": ..., "device": ..., "tasks": {task: [classes]},
  <the limits>}``; no file-system path is ever part of a response.
* ``POST /predict`` with a multipart file field ``file`` -> the same JSON record as
  :func:`dinov2.classify.predict.predict` gives for one image (``{"image", "predictions"}``).
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


class UploadError(Exception):
    """A rejected upload: HTTP status and a message for the client."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


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
        raise UploadError(400, f"upload {name!r} declares an empty image ({width}x{height})")
    if width * height > max_image_pixels:
        raise UploadError(
            413, f"image {name!r} is {width}x{height} = {width * height} pixels; the limit is {max_image_pixels}"
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
        raise UploadError(400, f"upload {name!r} is empty")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past 2x its global limit raises) for huge images; we decide ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except UnidentifiedImageError:
        raise UploadError(
            415, f"upload {name!r} is not an image in one of the accepted formats ({', '.join(UPLOAD_FORMATS)})"
        ) from None
    except Image.DecompressionBombError as error:
        raise UploadError(413, f"upload {name!r} is too large an image: {error}") from None
    except Exception as error:  # PIL's parsers raise many kinds (OSError, SyntaxError, struct.error, ...)
        raise UploadError(400, f"upload {name!r} cannot be read as an image: {_reason(error)}") from None
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
        raise UploadError(503, f"not enough memory free to decode {name!r} now; retry later") from None
    except Image.DecompressionBombError as error:
        raise UploadError(413, f"upload {name!r} is too large an image: {error}") from None
    except Exception as error:  # whatever the decoder raises on bad data is the upload's fault
        raise UploadError(400, f"image {name!r} is truncated or corrupt: {_reason(error)}") from None


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
        "/health, /docs and /openapi.json. Set $%s or --token-file, or bind to 127.0.0.1.",
        host, TOKEN_ENV,
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
        from fastapi import FastAPI, File, HTTPException, UploadFile
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

    predictor = (
        model_path
        if isinstance(model_path, Predictor)
        else Predictor(model_path, device=device, tta=tta, multi_crop=multi_crop, batch_size=1)
    )
    resize_size = int(predictor.config.preprocessing["resize_size"])
    model_sha256 = _sha256(predictor.model_file)
    lock = threading.Lock()  # one inference at a time: the model already uses every core
    # Decoding and inference slots. Waiting requests hold neither a worker thread nor pixels: their
    # bodies stay in Starlette's spooled upload files until a slot is free.
    slots = anyio.Semaphore(max_concurrent)
    docs = {} if token is None else {"docs_url": None, "redoc_url": None}
    app = FastAPI(title="dinov2 classifier", max_body_size=max_upload_bytes, **docs)
    if token is not None:
        app.add_middleware(BearerTokenMiddleware, token=token)
    app.state.predictor = predictor

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

    def run(data: bytes, name: str) -> dict:
        image = decode_upload(data, name, max_image_pixels, max_aspect_ratio, resize_size)
        with lock:
            return predictor.records([name], [image])[0]

    @app.post("/predict")
    async def predict_upload(file: UploadFile = File(...)):
        # The name is the client's; it is echoed back in the record, so keep it short.
        name = (file.filename or "upload")[:_MAX_NAME_CHARS]
        async with slots:
            data = await file.read()
            try:
                return await run_in_threadpool(run, data, name)
            except UploadError as error:
                raise HTTPException(status_code=error.status_code, detail=error.detail) from None

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
    parser.add_argument("--max-aspect-ratio", type=float, default=DEFAULT_MAX_ASPECT_RATIO,
                        help="refuse (413) images whose long side exceeds this many times the short side")
    parser.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT,
                        help="uploads decoded and classified at once; the others wait")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="open connections beyond this get 503 (uvicorn's limit_concurrency)")
    parser.add_argument("--token-file", default=None,
                        help=f"file holding the bearer token every request must send (or set ${TOKEN_ENV})")
    parser.add_argument("--token", default=None,
                        help="the bearer token itself (visible to other users in the process list: prefer "
                        f"--token-file or ${TOKEN_ENV})")
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
