"""A small HTTP service around a classifier (FastAPI + uvicorn, the ``serve`` extra).

    python -m dinov2.classify.serve --model runs/shapes/model_best.pth --port 8000
    curl -F file=@drawing.png http://127.0.0.1:8000/predict

Endpoints:

* ``GET /health`` -> ``{"status": "ok", "model": ..., "device": ..., "tasks": {task: [classes]}, ...}``
* ``POST /predict`` with a multipart file field ``file`` -> the same JSON record as
  :func:`dinov2.classify.predict.predict` gives for one image (``{"image", "predictions"}``).

The model is loaded once, at start-up. Requests are checked before any decoding work:

* a body larger than ``max_upload_bytes`` -> 413 (FastAPI's request body limit, counted while
  reading, so a lying or missing Content-Length does not help);
* an upload PIL cannot identify as an image -> 415;
* an image whose header declares more than ``max_image_pixels`` pixels -> 413, decided from the
  header before the pixels are decoded (decompression bombs never expand in memory);
* a truncated or corrupt image -> 400;
* no ``file`` field -> 422 (FastAPI validation).
"""


import argparse
import io
import os
import sys
import threading
import warnings
from typing import Optional, Sequence, Union

from PIL import Image, UnidentifiedImageError

from .predict import Predictor

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


class UploadError(Exception):
    """A rejected upload: HTTP status and a message for the client."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def decode_upload(data: bytes, name: str, max_image_pixels: int) -> Image.Image:
    """Bytes -> RGB image, or :class:`UploadError` with the right 4xx status."""
    if not data:
        raise UploadError(400, f"upload {name!r} is empty")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past 2x its global limit raises) for huge images; we decide ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UploadError(415, f"upload {name!r} is not an image format PIL can read") from None
    except Image.DecompressionBombError as error:
        raise UploadError(413, f"upload {name!r} is too large an image: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UploadError(400, f"upload {name!r} cannot be read as an image: {error}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise UploadError(400, f"upload {name!r} declares an empty image ({width}x{height})")
    if width * height > max_image_pixels:
        raise UploadError(
            413, f"image {name!r} is {width}x{height} = {width * height} pixels; the limit is {max_image_pixels}"
        )
    try:
        image.load()  # full decode: truncated or corrupt data fails here
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise UploadError(400, f"image {name!r} is truncated or corrupt: {error}") from None


def create_app(
    model_path: Union[str, os.PathLike, Predictor],
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    device: Optional[str] = None,
    tta: bool = True,
    multi_crop: bool = False,
):
    """The FastAPI application serving one classifier (a path, or an already loaded Predictor)."""
    try:
        from fastapi import FastAPI, File, HTTPException, UploadFile
        from fastapi.concurrency import run_in_threadpool
    except ImportError as error:
        raise ImportError("the HTTP service needs: pip install 'dinov2[serve]'") from error
    if max_upload_bytes < 1 or max_image_pixels < 1:
        raise ValueError("max_upload_bytes and max_image_pixels must be positive")

    predictor = (
        model_path
        if isinstance(model_path, Predictor)
        else Predictor(model_path, device=device, tta=tta, multi_crop=multi_crop, batch_size=1)
    )
    lock = threading.Lock()  # one inference at a time: the model already uses every core
    app = FastAPI(title="dinov2 classifier", max_body_size=max_upload_bytes)
    app.state.predictor = predictor

    @app.get("/health")
    def health():
        return {
            "status": "ok",
            "model": predictor.model_path,
            "device": str(predictor.device),
            "tta": predictor.tta,
            "multi_crop": predictor.multi_crop,
            "tasks": {h.name: list(h.classes) for h in predictor.heads},
            "max_upload_bytes": max_upload_bytes,
            "max_image_pixels": max_image_pixels,
        }

    def run(data: bytes, name: str) -> dict:
        image = decode_upload(data, name, max_image_pixels)
        with lock:
            return predictor.records([name], [image])[0]

    @app.post("/predict")
    async def predict_upload(file: UploadFile = File(...)):
        name = file.filename or "upload"
        data = await file.read()
        try:
            return await run_in_threadpool(run, data, name)
        except UploadError as error:
            raise HTTPException(status_code=error.status_code, detail=error.detail) from None

    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve a dinov2 classifier over HTTP.")
    parser.add_argument("--model", required=True, help="classifier file (.pth) or classifier training output dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--multi-crop", action="store_true")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20)
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    app = create_app(
        args.model,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        device=args.device,
        tta=not args.no_tta,
        multi_crop=args.multi_crop,
    )
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
