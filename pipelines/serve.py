"""Online scoring with Ray Serve: one artifact behind `/v1/score`, or many behind `/v1/score/{name}`.

A request travels: HTTP → Serve proxy → a replica, which reads the body under a byte cap, then decodes, validates
and preprocesses it in a thread pool, on its own, so one bad upload fails alone with a 4xx and never reaches (or
poisons) a batch. `@serve.batch` gathers the concurrent requests of a replica into one `methods.scoring.Scorer` call,
which runs in the replica's model thread while the event loop keeps accepting and decoding the next uploads.
Decoding is `datasets.decode_rgb` and preprocessing `ingest.preprocess`, the functions `reconray predict` uses, so a
served score equals the predicted one for the same image scored alone (see README "Serving" for batching).

Replicas autoscale between `min_replicas` and `max_replicas` on ongoing requests; each one verifies the artifact's
hashes when it loads it and runs torch on as many threads as it holds CPUs.

Several models (`--model name=DIR ...` or a folder of artifacts) are served by two deployments: `ModelRouter`, a light
FastAPI ingress that reads and checks the upload and forwards it through a handle with the model's name as Serve's
multiplexed model id, and `ModelPool`, whose replicas load models on demand and keep the most recently used ones (an
LRU per replica); Serve sends each request to a replica that already holds its model when one does.

Example:
    $ reconray serve --model runs/latest/models/patchcore
    $ curl -s -H "Content-Type: image/png" --data-binary @part.png "http://127.0.0.1:8000/v1/score?heatmap=true"
    $ serve run reconray.pipelines.serve:build_app model_dir=runs/latest/models/patchcore max_replicas=4
    $ reconray serve --model runs/latest/models          # every artifact in the folder, by its folder name
    $ curl -s -H "Content-Type: image/png" --data-binary @part.png http://127.0.0.1:8000/v1/score/patchcore
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
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from reconray.methods.artifact import ArtifactConfig, ModelSpec, config_sha256, load_artifact, verify_files
from reconray.methods.device import pick_device
from reconray.methods.errors import ArtifactError, OptionError
from reconray.methods.scoring import Scorer, is_anomalous
from reconray.pipelines.datasets import ImageTooLargeError, decode_rgb
from reconray.pipelines.ingest import preprocess
from reconray.pipelines.report import heatmap_scale, render_overlay
from reconray.pipelines.runtime import ensure_ray
from reconray.pipelines.serve_options import DEFAULT_MAX_BYTES, DEFAULT_MAX_SIDE, ServeOptions, check_model_name
from reconray.pipelines.storage import as_location, glob_locations, is_uri, joined, local_model

logger = logging.getLogger(__name__)

APP_NAME = "reconray"
MULTIPART_OVERHEAD = 64 * 1024
"""Room for multipart boundaries and part headers on top of the image byte limit."""
RAW_MEDIA_TYPES = "image/* or application/octet-stream (raw bytes), or multipart/form-data with a file field 'image'"
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)
"""What Pillow raises on corrupt, truncated or unknown data, depending on the format plugin."""
ROUTER_CPUS = 0.1
"""CPUs of a `ModelRouter` replica: it only reads uploads and forwards them."""


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
    cold_start: bool | None = Field(None, description="several models served: whether this request waited for its "
                                    "model to be loaded on the replica")


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


class ModelEntry(BaseModel):
    name: str = Field(description="the model's route: POST /v1/score/{name}")
    method: str
    sha256: str
    image_size: int
    threshold: float | None = Field(description="threshold calibrated at fit time")
    category_thresholds: dict[str, float]
    categories: list[str]


class ServiceHealth(BaseModel):
    status: str
    replica: str
    models: list[str]


class ErrorResponse(BaseModel):
    error: str


class _Rejected(Exception):
    """A request refused with a 4xx (or 503) status and a message that says what was wrong and what is accepted.

    Both fields are the exception's args, so it crosses from a `ModelPool` replica to the router intact.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


async def _rejected(_: Request, error: _Rejected) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status)


async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors())
    return JSONResponse({"error": problems}, status_code=422)


async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)


def _api(description: str) -> FastAPI:
    """A FastAPI app whose every error is a JSON `{"error": ...}` with the status that says what went wrong."""
    api = FastAPI(title="reconray", description=description, version="1")
    api.add_exception_handler(_Rejected, _rejected)
    api.add_exception_handler(RequestValidationError, _invalid)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    return api


app = _api("Industrial visual anomaly scoring: POST an image, get its anomaly score and, optionally, a heatmap.")
router_app = _api("Industrial visual anomaly scoring for several models: POST an image to /v1/score/{name}.")


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


@dataclasses.dataclass(eq=False)
class _LoadedModel:
    """An artifact loaded in a replica; `fresh` until the first request it answers."""

    scorer: Scorer
    config: ArtifactConfig
    ref: ModelRef
    fresh: bool = True

    @property
    def spec(self) -> ModelSpec:
        return self.config.spec


def _load_model(location: str, device: torch.device) -> _LoadedModel:
    """Loads and hash-checks an artifact (a URI is fetched onto this node first) and warms its kernels with one
    throw-away batch, so the first request it answers has a typical latency."""
    artifact = load_artifact(local_model(location))
    scorer = artifact.scorer(device)
    size = artifact.spec.image_size
    scorer(torch.zeros(1, 3, size, size))
    return _LoadedModel(scorer, artifact.config, ModelRef(method=artifact.method.name, sha256=artifact.sha256))


def _decision_threshold(config: ArtifactConfig, requested: float | None, category: str | None,
                        deployment: float | None) -> float | None:
    """The request's own threshold, else the deployment's `--threshold`, else the one calibrated for `category`,
    else the model's global one; a bad value or an unknown category is refused (422) before any decoding."""
    if requested is not None:
        if not math.isfinite(requested):
            raise _Rejected(422, f"threshold must be a finite number, got {requested}")
        return requested
    try:
        calibrated = config.threshold_for(category)
    except OptionError as error:
        raise _Rejected(422, str(error)) from None
    return calibrated if deployment is None else deployment


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


async def _image_bytes(request: Request, max_bytes: int) -> bytes:
    """The uploaded image's bytes, read under the byte cap; the content type picks raw or multipart."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = media_type == "multipart/form-data"
    if not (multipart or media_type.startswith("image/") or media_type == "application/octet-stream"):
        shown = repr(media_type) if media_type else "(none)"
        raise _Rejected(415, f"content type {shown} is not accepted; send {RAW_MEDIA_TYPES}")
    body = await _read_capped(request, max_bytes + (MULTIPART_OVERHEAD if multipart else 0))
    data = await _multipart_image(request, body) if multipart else body
    if not data:
        raise _Rejected(400, "empty body: send the image's bytes")
    if len(data) > max_bytes:
        raise _Rejected(413, f"image is {len(data)} bytes; the limit is {max_bytes} bytes")
    return data


def _decode(spec: ModelSpec, data: bytes, heatmap: bool, max_side: int) -> _Upload:
    """Bytes → model input, with the decoding and preprocessing of `reconray predict`; refusals are 4xx."""
    try:
        rgb = decode_rgb(data, max_side=max_side)
    except ImageTooLargeError as error:
        raise _Rejected(413, str(error)) from error
    except Image.DecompressionBombError as error:
        raise _Rejected(413, f"{error} (limit: {max_side} pixels a side)") from error
    except UnidentifiedImageError as error:
        raise _Rejected(400, "body is not an image Pillow can identify (PNG, JPEG, BMP, TIFF, WebP...)") from error
    except _DECODE_ERRORS as error:
        raise _Rejected(400, f"image could not be decoded: {error}") from error
    pixels = preprocess(rgb, spec)
    height, width = spec.content_size(*rgb.shape[:2])
    overlay_rgb = None
    if heatmap:
        # The same bilinear resize `render_overlay` applies, done now so the full-size image is not kept waiting.
        overlay_rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
    return _Upload(pixels, (height, width), overlay_rgb)


def _overlay_png(rgb: np.ndarray, anomaly_map: np.ndarray, threshold: float | None) -> str:
    """Base64 PNG of the heatmap overlay, coloured on the scale `reconray predict` uses."""
    buffer = io.BytesIO()
    render_overlay(rgb, anomaly_map, *heatmap_scale(threshold, anomaly_map)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class _Replica:
    """What a scoring replica is, whatever it serves: torch on as many threads as it holds CPUs, a decode pool, one
    model thread and a batch queue (`@serve.batch`, settings per deployment)."""

    def __init__(self, max_batch_size: int, batch_wait_timeout_s: float, max_side: int) -> None:
        self._threads = max(1, round(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))
        torch.set_num_threads(self._threads)
        # Pillow's decompression-bomb guard at the per-side limit's area: it refuses absurd headers inside Image.open.
        Image.MAX_IMAGE_PIXELS = max_side * max_side
        self._max_side = max_side
        self._device = pick_device()
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._decode_pool = ThreadPoolExecutor(self._threads, thread_name_prefix="reconray-decode")
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="reconray-model")
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _answer(self, model: _LoadedModel, data: bytes, heatmap: bool, threshold: float | None,
                      category: str | None) -> ScoreResponse:
        """Decodes the upload, scores it in the next batch and decides with `threshold` (latency set by the caller)."""
        loop = asyncio.get_running_loop()
        upload = await loop.run_in_executor(self._decode_pool, _decode, model.spec, data, heatmap, self._max_side)
        scored: _Scored = await self._score_batch((model, upload.pixels, category, upload.content))
        response = ScoreResponse(score=scored.score, is_anomalous=is_anomalous(scored.score, threshold),
                                 threshold=threshold, model=model.ref, latency_ms=0.0)
        if upload.overlay_rgb is not None:
            response.heatmap_png = await loop.run_in_executor(
                self._decode_pool, _overlay_png, upload.overlay_rgb, scored.anomaly_map, threshold
            )
            response.heatmap_size = list(scored.anomaly_map.shape)
            response.patch_map_size = scored.patch_map_size
        return response

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(
        self, requests: list[tuple[_LoadedModel, torch.Tensor, str | None, tuple[int, int]]]
    ) -> list[_Scored]:
        """Scores the images of concurrent requests in one backbone pass per model; each with its request's category,
        which a model extended with `--add-to` routes on, and its map cropped to the image's own region of the
        canvas."""
        loop = asyncio.get_running_loop()
        rows_of: dict[_LoadedModel, list[int]] = {}
        for row, request in enumerate(requests):
            rows_of.setdefault(request[0], []).append(row)
        results: list[_Scored] = [None] * len(requests)  # type: ignore[list-item]  # every row is filled below
        for model, rows in rows_of.items():
            _, images, categories, content = zip(*(requests[row] for row in rows), strict=True)
            scored = await loop.run_in_executor(self._model_thread, model.scorer, torch.stack(images),
                                                list(categories), content)
            patch_map_size = list(scored.patch_scores.shape[1:])
            for position, (row, (height, width)) in enumerate(zip(rows, content, strict=True)):
                results[row] = _Scored(float(scored.image_scores[position]),
                                       scored.anomaly_maps[position, :height, :width].numpy(), patch_map_size)
        return results


# Everything the routes call must be defined above these classes: `serve.ingress` freezes a copy of the FastAPI app
# (routes included) with cloudpickle when the decorator runs, capturing only the module globals defined by then.
# A 2 s health-check period (Serve default 10 s) replaces a dead replica within seconds; the check is a no-op call.
@serve.deployment(name="AnomalyScorer", health_check_period_s=2.0)
@serve.ingress(app)
class AnomalyScorer(_Replica):
    """One replica of a one-model service: the artifact, loaded and verified before the replica answers.

    Args:
        model_dir: artifact directory or URI, readable from every node that runs a replica.
        threshold: deployment threshold overriding the artifact's calibrated one (None keeps it).
        max_batch_size, batch_wait_timeout_s: `@serve.batch` settings; a batch runs when full or when the oldest
            request has waited this long.
        max_bytes, max_side: upload limits.
    """

    def __init__(self, model_dir: str, threshold: float | None, max_batch_size: int, batch_wait_timeout_s: float,
                 max_bytes: int, max_side: int) -> None:
        super().__init__(max_batch_size, batch_wait_timeout_s, max_side)
        self._model = _load_model(model_dir, self._device)
        self._threshold = threshold
        self._max_bytes = max_bytes
        config = self._model.config
        spec = config.spec
        self._info = ModelInfo(
            method=config.method, backbone=spec.backbone, levels=spec.levels, image_size=spec.image_size,
            aggregation=spec.aggregation, pool=spec.pool, resize=spec.resize, tile=spec.tile,
            threshold=config.threshold if threshold is None else threshold, calibrated_threshold=config.threshold,
            category_thresholds=config.category_thresholds, categories=config.categories, sha256=self._model.ref.sha256,
            device=str(self._device), torch_threads=self._threads, max_batch_size=max_batch_size, max_bytes=max_bytes,
            max_side=max_side,
        )

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
        threshold = _decision_threshold(self._model.config, threshold, category, self._threshold)
        data = await _image_bytes(request, self._max_bytes)
        response = await self._answer(self._model, data, heatmap, threshold, category)
        response.latency_ms = 1000.0 * (time.perf_counter() - started)
        return response

    @app.get("/v1/health", response_model=HealthResponse)
    async def health(self) -> HealthResponse:
        """Answers once this replica has loaded and verified its artifact."""
        return HealthResponse(status="ok", replica=self._replica, model=self._model.ref)

    @app.get("/v1/model", response_model=ModelInfo)
    async def model(self) -> ModelInfo:
        """What is being served: method, backbone, input size, thresholds, categories, artifact hash, limits."""
        return self._info


@serve.deployment(name="ModelPool", health_check_period_s=2.0)
class ModelPool(_Replica):
    """A replica of a many-model service: loads each model on its first request (hash-checked) and keeps the
    `max_models` most recently used, through `serve.multiplexed`; the request's multiplexed model id is its model's
    name, so Serve routes it to a replica that holds that model when one does.

    Args:
        catalog: model name → artifact directory or URI, readable from every node that runs a replica.
        max_models: models one replica keeps loaded; the least recently used is dropped for a new one.
        max_batch_size, batch_wait_timeout_s, max_side: as for `AnomalyScorer` (a batch holds one model's images).
    """

    def __init__(self, catalog: dict[str, str], max_models: int, max_batch_size: int, batch_wait_timeout_s: float,
                 max_side: int) -> None:
        super().__init__(max_batch_size, batch_wait_timeout_s, max_side)

        async def load(name: str) -> _LoadedModel:
            # in the model thread: fetching and loading take seconds, and the event loop keeps serving meanwhile
            return await asyncio.get_running_loop().run_in_executor(self._model_thread, _load_model, catalog[name],
                                                                    self._device)

        # wrapped here rather than decorated: the LRU size is a deployment setting
        self._models = serve.multiplexed(max_num_models_per_replica=max_models)(load)

    async def score(self, data: bytes, heatmap: bool, threshold: float | None, category: str | None) -> ScoreResponse:
        """Scores one upload with the model named by the request's multiplexed model id, under its own threshold."""
        name = serve.get_multiplexed_model_id()
        try:
            model = await self._models(name)
        except ArtifactError as error:
            raise _Rejected(503, f"model {name!r} cannot be loaded: {error}") from None
        cold_start, model.fresh = model.fresh, False
        threshold = _decision_threshold(model.config, threshold, category, None)
        response = await self._answer(model, data, heatmap, threshold, category)
        response.cold_start = cold_start
        return response


@serve.deployment(name="ModelRouter", health_check_period_s=2.0)
@serve.ingress(router_app)
class ModelRouter:
    """The ingress of a many-model service: reads and checks each upload, then forwards it to a `ModelPool` replica
    with the model's name as the multiplexed model id.

    Args:
        pool: handle of the `ModelPool` deployment.
        models: what `/v1/models` lists, read from each artifact's config.json when the app was built.
        max_bytes: upload limit.
    """

    def __init__(self, pool: DeploymentHandle, models: list[ModelEntry], max_bytes: int) -> None:
        self._pool = pool
        self._models = {entry.name: entry for entry in models}
        self._max_bytes = max_bytes
        self._replica = serve.get_replica_context().replica_id.unique_id

    @router_app.post("/v1/score/{name}", response_model=ScoreResponse, response_model_exclude_unset=True,
                     responses=_ERRORS | {404: {"model": ErrorResponse, "description": "no model of that name"},
                                          503: {"model": ErrorResponse, "description": "the model failed to load"}},
                     openapi_extra=_SCORE_BODY)
    async def score(
        self,
        name: str,
        request: Request,
        heatmap: bool = Query(False, description="add a base64 PNG overlay of the anomaly map"),
        threshold: float | None = Query(None, description="threshold for this request only"),
        category: str | None = Query(None, description="decide with the threshold calibrated for this category"),
    ) -> ScoreResponse:
        """Scores one image with model `name`: raw bytes (image/* or application/octet-stream) or multipart field
        `image`; decided with that model's own calibrated threshold unless the request gives one."""
        started = time.perf_counter()
        if name not in self._models:
            raise _Rejected(404, f"no model named {name!r}; served: {sorted(self._models)}")
        data = await _image_bytes(request, self._max_bytes)
        response: ScoreResponse = await self._pool.options(multiplexed_model_id=name).score.remote(
            data, heatmap, threshold, category)
        response.latency_ms = 1000.0 * (time.perf_counter() - started)
        return response

    @router_app.get("/v1/models", response_model=list[ModelEntry])
    async def models(self) -> list[ModelEntry]:
        """The models served, each with its method, artifact hash, input size and calibrated thresholds."""
        return list(self._models.values())

    @router_app.get("/v1/health", response_model=ServiceHealth)
    async def health(self) -> ServiceHealth:
        """Answers once the router is up; each model loads (and is hash-checked) on its first request."""
        return ServiceHealth(status="ok", replica=self._replica, models=sorted(self._models))


def model_catalog(options: ServeOptions) -> dict[str, str] | None:
    """The models to serve by name, or None for a one-model service (`model_dir` is one artifact).

    `models` names each artifact; a `model_dir` without config.json is a folder of artifacts, served under their
    folder names. Each location is kept as given: a URI as text, a local path made absolute.
    """
    if options.models is not None:
        catalog = dict(options.models)
    else:
        assert options.model_dir is not None  # ServeOptions requires one of the two
        if (as_location(options.model_dir) / "config.json").exists():
            return None
        found = glob_locations(joined(options.model_dir, "*/config.json"))
        if not found:
            raise ArtifactError(f"{options.model_dir}: not a reconray model (no config.json) nor a folder of models "
                                "(no */config.json)")
        catalog = {location.parent.name: str(location.parent) for location in found}
    for name in catalog:
        try:
            check_model_name(name)
        except ValueError as error:
            raise OptionError(f"{options.model_dir}: {error}") from None
    return {name: location if is_uri(location) else str(as_location(location)) for name, location in catalog.items()}


def _entry(name: str, location: str) -> ModelEntry:
    """A model's listing, after checking every file's hash, so a broken artifact fails the build and not a replica
    Serve would restart forever."""
    directory = local_model(location)
    try:
        config = verify_files(directory)
    except ArtifactError as error:
        raise ArtifactError(f"model {name!r}: {error}") from None
    return ModelEntry(name=name, method=config.method, sha256=config_sha256(directory),
                      image_size=config.spec.image_size, threshold=config.threshold,
                      category_thresholds=config.category_thresholds, categories=config.categories)


def build_app(args: dict[str, Any] | ServeOptions) -> Application:
    """Serve application builder: `args` holds `ServeOptions` fields (strings are converted and range-checked).

    Checks every artifact before anything is deployed, so a wrong path fails here instead of in a replica that Serve
    would restart forever.
    """
    options = args if isinstance(args, ServeOptions) else ServeOptions.model_validate(args)
    scaling = {
        "min_replicas": options.min_replicas,
        "max_replicas": options.max_replicas,
        "target_ongoing_requests": options.target_ongoing_requests or max(2, options.batch_size),
        "upscale_delay_s": options.upscale_delay_s,
        "downscale_delay_s": options.downscale_delay_s,
    }
    scorer_options = {
        "autoscaling_config": scaling,
        "max_ongoing_requests": options.max_ongoing_requests or max(32, 2 * options.batch_size),
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
    }
    catalog = model_catalog(options)
    if catalog is None:
        model_dir = str(options.model_dir if is_uri(options.model_dir) else as_location(options.model_dir))
        verify_files(local_model(model_dir))
        logger.info("one model, %s: POST /v1/score", model_dir)
        return AnomalyScorer.options(**scorer_options).bind(
            model_dir, options.threshold, options.batch_size, options.batch_wait_timeout_s, options.max_bytes,
            options.max_side)
    if options.threshold is not None:
        raise OptionError("threshold: with several models each decides with its own calibrated threshold; give "
                          "?threshold= per request instead")
    models = [_entry(name, location) for name, location in catalog.items()]
    logger.info("%d models (%s): POST /v1/score/{name}, listed at GET /v1/models", len(models), ", ".join(catalog))
    pool = ModelPool.options(**scorer_options).bind(
        catalog, options.max_models_per_replica, options.batch_size, options.batch_wait_timeout_s, options.max_side)
    # A router replica holds each request while a pool replica scores it: it takes one pool replica's load as its
    # target and the whole pool's at most.
    per_replica = scorer_options["max_ongoing_requests"]
    return ModelRouter.options(
        autoscaling_config=scaling | {"target_ongoing_requests": per_replica},
        max_ongoing_requests=per_replica * options.max_replicas, ray_actor_options={"num_cpus": ROUTER_CPUS},
    ).bind(pool, models, options.max_bytes)


def serve_model(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000,
                proxy_location: str = "EveryNode") -> None:
    """`reconray serve`: deploys on this Ray (RAY_ADDRESS or a local one) and blocks until Ctrl-C or SIGTERM.

    Stopping deletes this application only, so other Serve applications on a shared cluster keep running; a local
    Ray started here shuts down with the process. `proxy_location` places Serve's HTTP proxies when this call starts
    Serve (a Serve already running keeps its own).
    """
    application = build_app(options)
    ensure_ray()
    # Replaces the SIGTERM handling ray.init installed, which ends the process without the cleanup below; set before
    # deploying, since a replica answers (and a user may stop the server) before serve.run returns.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port})
        serve.run(application, name=APP_NAME, route_prefix="/")
        logger.info("serving at http://%s:%d (OpenAPI: /docs); Ctrl-C stops", host, port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        serve.delete(APP_NAME)
