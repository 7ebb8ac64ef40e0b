"""Online scoring with Ray Serve: a FastAPI ingress whose replicas each hold one loaded artifact and batch inference.

A request travels: HTTP → Serve proxy → a replica, which reads the body under a byte cap, then decodes, validates
and preprocesses it in a thread pool, on its own, so one bad upload fails alone with a 4xx and never reaches (or
poisons) a batch. `@serve.batch` gathers the concurrent requests of a replica into one `methods.scoring.Scorer` call,
which runs in the replica's model thread while the event loop keeps accepting and decoding the next uploads.
Decoding is `datasets.decode_rgb` and preprocessing `ingest.preprocess`, the functions `reconray predict` uses, so a
served score equals the predicted one for the same image scored alone (see README "Serving" for batching).

Replicas autoscale between `min_replicas` and `max_replicas` on ongoing requests; each one verifies the artifact's
hashes when it loads it and runs torch on as many threads as it holds CPUs.

Example:
    $ reconray serve --model runs/latest/models/patchcore
    $ curl -s -H "Content-Type: image/png" --data-binary @part.png "http://127.0.0.1:8000/v1/score?heatmap=true"
    $ serve run reconray.pipelines.serve:build_app model_dir=runs/latest/models/patchcore max_replicas=4
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures of a Serve ingress class at run
# time, and postponed annotations leave `Request` an unresolvable string there.
import asyncio
import base64
import dataclasses
import io
import logging
import math
import signal
import struct
import time
import zlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from reconray.methods.artifact import load_artifact, read_config
from reconray.methods.device import pick_device
from reconray.methods.errors import OptionError
from reconray.methods.scoring import is_anomalous
from reconray.pipelines.datasets import ImageTooLargeError, decode_rgb
from reconray.pipelines.ingest import preprocess
from reconray.pipelines.report import heatmap_scale, render_overlay
from reconray.pipelines.runtime import ensure_ray
from reconray.pipelines.serve_options import DEFAULT_MAX_BYTES, DEFAULT_MAX_SIDE, ServeOptions
from reconray.pipelines.storage import as_location, is_uri, local_model

logger = logging.getLogger(__name__)

APP_NAME = "reconray"
MULTIPART_OVERHEAD = 64 * 1024
"""Room for multipart boundaries and part headers on top of the image byte limit."""
RAW_MEDIA_TYPES = "image/* or application/octet-stream (raw bytes), or multipart/form-data with a file field 'image'"
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)
"""What Pillow raises on corrupt, truncated or unknown data, depending on the format plugin."""


class ModelRef(BaseModel):
    method: str
    sha256: str = Field(description="sha256 of the artifact's config.json, which lists the hash of every other file")


class ScoreResponse(BaseModel):
    score: float = Field(description="image anomaly score: the maximum of the smoothed anomaly map")
    is_anomalous: bool | None = Field(description="score > threshold; null when there is no threshold")
    threshold: float | None
    model: ModelRef
    latency_ms: float = Field(description="time in the replica: read, decode, batch wait, scoring, heatmap")
    heatmap_png: str | None = Field(None, description="with ?heatmap=true: base64 PNG overlay at the model's size")
    heatmap_size: list[int] | None = Field(None, description="[height, width] of the overlay")
    patch_map_size: list[int] | None = Field(None, description="[height, width] of the patch-level score grid")


class HealthResponse(BaseModel):
    status: str
    replica: str
    model: ModelRef


class ModelInfo(BaseModel):
    method: str
    backbone: str
    levels: list[int]
    image_size: int
    aggregation: str = Field(description="feature aggregation order (pool-align or align-pool)")
    pool: int = Field(description="side of the features' local average window")
    resize: str = Field(description="how an image is placed on the square canvas (square or keep-aspect)")
    tile: int | None = Field(description="side of the tiles the backbone runs on (null: the whole canvas)")
    threshold: float | None = Field(description="threshold in use by this deployment")
    calibrated_threshold: float | None = Field(description="threshold stored in the artifact at fit time")
    category_thresholds: dict[str, float] = Field(description="per category, the threshold calibrated at fit time on "
                                                  "its own held-out images (used with ?category=)")
    categories: list[str]
    sha256: str
    device: str
    torch_threads: int = Field(description="intra-op threads of this replica: the CPUs it holds")
    max_batch_size: int
    max_bytes: int
    max_side: int


class ErrorResponse(BaseModel):
    error: str


class _Rejected(Exception):
    """A request refused with a 4xx status and a message that says what was wrong and what is accepted."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


app = FastAPI(
    title="reconray",
    description="Industrial visual anomaly scoring: POST an image, get its anomaly score and, optionally, a heatmap.",
    version="1",
)


@app.exception_handler(_Rejected)
async def _rejected(_: Request, error: _Rejected) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors())
    return JSONResponse({"error": problems}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)


_SCORE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": f"the image, at most {DEFAULT_MAX_BYTES} bytes and {DEFAULT_MAX_SIDE} pixels a side "
                       "(deployment defaults)",
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["image"],
                           "properties": {"image": {"type": "string", "format": "binary"}}}
            },
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "empty body, or bytes that are not a decodable image"},
    413: {"model": ErrorResponse, "description": "body or image dimensions over the deployment's limits"},
    415: {"model": ErrorResponse, "description": f"content type other than {RAW_MEDIA_TYPES}"},
    422: {"model": ErrorResponse, "description": "invalid query parameter"},
}


@dataclasses.dataclass
class _Upload:
    """A decoded, validated upload: the model input, where the image lies on it, and the image at its size there
    when a heatmap was asked for."""

    pixels: torch.Tensor
    content: tuple[int, int]
    overlay_rgb: np.ndarray | None


@dataclasses.dataclass
class _Scored:
    score: float
    anomaly_map: np.ndarray
    patch_map_size: list[int]


async def _read_capped(request: Request, limit: int) -> bytes:
    """Reads the body, refusing it (413) as soon as the declared or the received length passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Rejected(413, f"body is {declared} bytes; the limit is {limit} bytes")
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _Rejected(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_image(request: Request, body: bytes) -> bytes:
    """The bytes of the multipart file field `image`, parsed from an already size-capped body."""

    async def _once() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, _once(), max_files=1, max_fields=16).parse()
    except MultiPartException as error:
        raise _Rejected(400, f"malformed multipart body: {error.message}") from error
    try:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise _Rejected(400, f"multipart body has no file field 'image' (fields: {sorted(form.keys())})")
        return await upload.read()
    finally:
        await form.close()


def _overlay_png(rgb: np.ndarray, anomaly_map: np.ndarray, threshold: float | None) -> str:
    """Base64 PNG of the heatmap overlay, coloured on the scale `reconray predict` uses."""
    buffer = io.BytesIO()
    render_overlay(rgb, anomaly_map, *heatmap_scale(threshold, anomaly_map)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# Everything the routes call must be defined above this class: `serve.ingress` freezes a copy of the FastAPI app
# (routes included) with cloudpickle when the decorator runs, capturing only the module globals defined by then.
# A 2 s health-check period (Serve default 10 s) replaces a dead replica within seconds; the check is a no-op call.
@serve.deployment(name="AnomalyScorer", health_check_period_s=2.0)
@serve.ingress(app)
class AnomalyScorer:
    """One replica: a loaded artifact, a decode pool, one model thread and a batch queue.

    Args:
        model_dir: artifact directory, readable from every node that runs a replica.
        threshold: deployment threshold overriding the artifact's calibrated one (None keeps it).
        max_batch_size, batch_wait_timeout_s: `@serve.batch` settings; a batch runs when full or when the oldest
            request has waited this long.
        max_bytes, max_side: upload limits.
    """

    def __init__(
        self,
        model_dir: str,
        threshold: float | None,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_bytes: int,
        max_side: int,
    ) -> None:
        threads = max(1, round(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))
        torch.set_num_threads(threads)
        # Pillow's decompression-bomb guard at the per-side limit's area: it refuses absurd headers inside Image.open.
        Image.MAX_IMAGE_PIXELS = max_side * max_side
        artifact = load_artifact(local_model(model_dir))  # a URI: fetched onto this replica's node
        device = pick_device()
        self._scorer = artifact.scorer(device)
        self._spec = artifact.spec
        self._threshold = threshold
        self._config = artifact.config
        self._max_bytes = max_bytes
        self._max_side = max_side
        self._model = ModelRef(method=artifact.method.name, sha256=artifact.sha256)
        self._info = ModelInfo(
            method=artifact.method.name, backbone=artifact.spec.backbone, levels=artifact.spec.levels,
            image_size=artifact.spec.image_size, aggregation=artifact.spec.aggregation, pool=artifact.spec.pool,
            resize=artifact.spec.resize, tile=artifact.spec.tile,
            threshold=artifact.threshold if threshold is None else threshold,
            calibrated_threshold=artifact.threshold, category_thresholds=artifact.config.category_thresholds,
            categories=artifact.categories, sha256=artifact.sha256, device=str(device), torch_threads=threads,
            max_batch_size=max_batch_size, max_bytes=max_bytes, max_side=max_side,
        )
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="reconray-decode")
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="reconray-model")
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        # One throw-away batch initializes the backbone's kernels, so the first user request has a typical latency.
        size = artifact.spec.image_size
        self._scorer(torch.zeros(1, 3, size, size))

    @app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_unset=True, responses=_ERRORS,
              openapi_extra=_SCORE_BODY)
    async def score(
        self,
        request: Request,
        heatmap: bool = Query(False, description="add a base64 PNG overlay of the anomaly map"),
        threshold: float | None = Query(None, description="threshold for this request only"),
        category: str | None = Query(None, description="decide with the threshold calibrated for this category (a "
                                     "model extended with --add-to also scores with the part fitted on it)"),
    ) -> ScoreResponse:
        """Scores one image: raw bytes (image/* or application/octet-stream) or multipart field `image`."""
        started = time.perf_counter()
        threshold = self._decision_threshold(threshold, category)
        data = await self._image_bytes(request)
        loop = asyncio.get_running_loop()
        upload = await loop.run_in_executor(self._decode_pool, self._decode, data, heatmap)
        scored: _Scored = await self._score_batch((upload.pixels, category, upload.content))
        response = ScoreResponse(
            score=scored.score,
            is_anomalous=is_anomalous(scored.score, threshold),
            threshold=threshold,
            model=self._model,
            latency_ms=0.0,
        )
        if upload.overlay_rgb is not None:
            response.heatmap_png = await loop.run_in_executor(
                self._decode_pool, _overlay_png, upload.overlay_rgb, scored.anomaly_map, threshold
            )
            response.heatmap_size = list(scored.anomaly_map.shape)
            response.patch_map_size = scored.patch_map_size
        response.latency_ms = 1000.0 * (time.perf_counter() - started)
        return response

    @app.get("/v1/health", response_model=HealthResponse)
    async def health(self) -> HealthResponse:
        """Answers once this replica has loaded and verified its artifact."""
        return HealthResponse(status="ok", replica=self._replica, model=self._model)

    @app.get("/v1/model", response_model=ModelInfo)
    async def model(self) -> ModelInfo:
        """What is being served: method, backbone, input size, thresholds, categories, artifact hash, limits."""
        return self._info

    def _decision_threshold(self, requested: float | None, category: str | None) -> float | None:
        """The request's own threshold, else the deployment's `--threshold`, else the one calibrated for `category`,
        else the model's global one; a bad value or an unknown category is refused (422) before any decoding."""
        if requested is not None:
            if not math.isfinite(requested):
                raise _Rejected(422, f"threshold must be a finite number, got {requested}")
            return requested
        try:
            calibrated = self._config.threshold_for(category)
        except OptionError as error:
            raise _Rejected(422, str(error)) from None
        return calibrated if self._threshold is None else self._threshold

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[tuple[torch.Tensor, str | None, tuple[int, int]]]) -> list[_Scored]:
        """Scores the images of concurrent requests in one backbone pass (batch settings are set per deployment);
        each with its request's category, which a model extended with `--add-to` routes on, and its map cropped to
        the image's own region of the canvas."""
        images, categories, content = zip(*requests, strict=True)
        scored = await asyncio.get_running_loop().run_in_executor(self._model_thread, self._scorer,
                                                                  torch.stack(images), list(categories), content)
        patch_map_size = list(scored.patch_scores.shape[1:])
        return [
            _Scored(float(scored.image_scores[row]), scored.anomaly_maps[row, :height, :width].numpy(), patch_map_size)
            for row, (height, width) in enumerate(content)
        ]

    async def _image_bytes(self, request: Request) -> bytes:
        """The uploaded image's bytes, read under the byte cap; the content type picks raw or multipart."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = media_type == "multipart/form-data"
        if not (multipart or media_type.startswith("image/") or media_type == "application/octet-stream"):
            shown = repr(media_type) if media_type else "(none)"
            raise _Rejected(415, f"content type {shown} is not accepted; send {RAW_MEDIA_TYPES}")
        body = await _read_capped(request, self._max_bytes + (MULTIPART_OVERHEAD if multipart else 0))
        data = await _multipart_image(request, body) if multipart else body
        if not data:
            raise _Rejected(400, "empty body: send the image's bytes")
        if len(data) > self._max_bytes:
            raise _Rejected(413, f"image is {len(data)} bytes; the limit is {self._max_bytes} bytes")
        return data

    def _decode(self, data: bytes, heatmap: bool) -> _Upload:
        """Bytes → model input, with the decoding and preprocessing of `reconray predict`; refusals are 4xx."""
        try:
            rgb = decode_rgb(data, max_side=self._max_side)
        except ImageTooLargeError as error:
            raise _Rejected(413, str(error)) from error
        except Image.DecompressionBombError as error:
            raise _Rejected(413, f"{error} (limit: {self._max_side} pixels a side)") from error
        except UnidentifiedImageError as error:
            raise _Rejected(400, "body is not an image Pillow can identify (PNG, JPEG, BMP, TIFF, WebP...)") from error
        except _DECODE_ERRORS as error:
            raise _Rejected(400, f"image could not be decoded: {error}") from error
        pixels = preprocess(rgb, self._spec)
        height, width = self._spec.content_size(*rgb.shape[:2])
        overlay_rgb = None
        if heatmap:
            # The same bilinear resize `render_overlay` applies, done now so the full-size image is not kept waiting.
            overlay_rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
        return _Upload(pixels, (height, width), overlay_rgb)


def build_app(args: dict[str, Any] | ServeOptions) -> Application:
    """Serve application builder: `args` holds `ServeOptions` fields (strings are converted and range-checked).

    Checks the artifact's config.json before anything is deployed, so a wrong path fails here instead of in a replica
    that Serve would restart forever.
    """
    options = args if isinstance(args, ServeOptions) else ServeOptions.model_validate(args)
    model_dir = str(options.model_dir if is_uri(options.model_dir) else as_location(options.model_dir))
    read_config(local_model(model_dir))
    return AnomalyScorer.options(
        autoscaling_config={
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests or max(2, options.batch_size),
            "upscale_delay_s": options.upscale_delay_s,
            "downscale_delay_s": options.downscale_delay_s,
        },
        max_ongoing_requests=options.max_ongoing_requests or max(32, 2 * options.batch_size),
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
    ).bind(model_dir, options.threshold, options.batch_size, options.batch_wait_timeout_s, options.max_bytes,
           options.max_side)


def serve_model(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000) -> None:
    """`reconray serve`: deploys on this Ray (RAY_ADDRESS or a local one) and blocks until Ctrl-C or SIGTERM.

    Stopping deletes this application only, so other Serve applications on a shared cluster keep running; a local
    Ray started here shuts down with the process.
    """
    application = build_app(options)
    ensure_ray()
    # Replaces the SIGTERM handling ray.init installed, which ends the process without the cleanup below; set before
    # deploying, since a replica answers (and a user may stop the server) before serve.run returns.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=APP_NAME, route_prefix="/")
        logger.info("serving %s at http://%s:%d/v1/score (OpenAPI: /docs); Ctrl-C stops", options.model_dir, host,
                    port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        serve.delete(APP_NAME)
