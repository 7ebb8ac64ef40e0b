"""End-to-end tests of `pipelines.serve`: the session's local Ray, a real Serve deployment, real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import dataclasses
import io
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
from conftest import free_port, upload_tree
from PIL import Image
from ray import serve

from reconray.methods.artifact import load_artifact, set_thresholds
from reconray.methods.backbone import DEFAULT_BACKBONE
from reconray.pipelines.cli import _served_models, main
from reconray.pipelines.evaluate import predict_images
from reconray.pipelines.ingest import Resources
from reconray.pipelines.serve import APP_NAME, build_app, model_catalog
from reconray.pipelines.serve_options import DEFAULT_MAX_BYTES, GPU_BATCH_SIZE, ServeOptions

REPLICA_CPUS = 0.5


@dataclasses.dataclass
class Service:
    client: httpx.Client
    model_dir: Path
    normal: list[Path]
    defective: list[Path]
    sha256: str
    threshold: float
    image_size: int


@pytest.fixture(scope="module")
def service(ray_session: None, fitted_model: Path, synthetic_root: Path) -> Iterator[Service]:
    """The conftest patchcore model served on the session's Ray: one replica of half a CPU, batches of up to 4."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_dir": str(fitted_model), "num_cpus": str(REPLICA_CPUS), "min_replicas": "1",
                         "max_replicas": "1", "max_batch_size": "4", "batch_wait_timeout_s": "0.05"}),
              name=APP_NAME)
    artifact = load_artifact(fitted_model)
    test_dir = synthetic_root / "nut" / "test"
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0)
    try:
        yield Service(
            client, fitted_model,
            normal=sorted((test_dir / "good").glob("*.png")),
            defective=sorted(path for path in test_dir.glob("*/*.png") if path.parent.name != "good"),
            sha256=artifact.sha256, threshold=artifact.threshold, image_size=artifact.spec.image_size,
        )
    finally:
        client.close()
        serve.shutdown()


def _post_png(service: Service, path: Path, query: str = "") -> httpx.Response:
    return service.client.post(f"/v1/score{query}", content=path.read_bytes(), headers={"Content-Type": "image/png"})


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` but whose pixel data is a few bytes: what a bomb looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_health_model_and_openapi(service: Service) -> None:
    health = service.client.get("/v1/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["model"] == {"method": "patchcore", "sha256": service.sha256}
    info = service.client.get("/v1/model").json()
    assert info["method"] == "patchcore"
    assert info["backbone"] == DEFAULT_BACKBONE
    assert info["image_size"] == service.image_size
    assert (info["aggregation"], info["pool"]) == ("pool-align", 3)
    assert info["threshold"] == info["calibrated_threshold"] == service.threshold
    assert info["categories"] == ["nut"]
    assert info["sha256"] == service.sha256
    assert info["torch_threads"] == 1
    assert info["max_batch_size"] == 4
    schema = service.client.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/v1/score", "/v1/health", "/v1/model"}
    assert "multipart/form-data" in schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]


def test_score_raw_and_multipart(service: Service) -> None:
    raw = _post_png(service, service.defective[0])
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert set(body) == {"score", "is_anomalous", "threshold", "model", "latency_ms"}
    assert body["threshold"] == service.threshold
    assert body["is_anomalous"] == (body["score"] > service.threshold)
    assert body["model"]["sha256"] == service.sha256
    assert body["latency_ms"] > 0
    multipart = service.client.post(
        "/v1/score", files={"image": ("part.png", service.defective[0].read_bytes(), "image/png")}
    )
    octet = service.client.post("/v1/score", content=service.defective[0].read_bytes(),
                                headers={"Content-Type": "application/octet-stream"})
    assert multipart.json()["score"] == octet.json()["score"] == body["score"]


def test_heatmap(service: Service) -> None:
    response = _post_png(service, service.defective[0], "?heatmap=true")
    assert response.status_code == 200, response.text
    body = response.json()
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert overlay.format == "PNG"
    assert overlay.size == (service.image_size, service.image_size)
    assert body["heatmap_size"] == [service.image_size, service.image_size]
    assert body["patch_map_size"] == [service.image_size // 8, service.image_size // 8]
    assert np.asarray(overlay).std() > 0


def test_per_request_threshold(service: Service) -> None:
    score = _post_png(service, service.normal[0]).json()["score"]
    below = _post_png(service, service.normal[0], f"?threshold={score - 1.0}").json()
    above = _post_png(service, service.normal[0], f"?threshold={score + 1.0}").json()
    assert (below["is_anomalous"], below["threshold"]) == (True, score - 1.0)
    assert (above["is_anomalous"], above["threshold"]) == (False, score + 1.0)
    for bad in ("nan", "inf", "abc"):
        response = _post_png(service, service.normal[0], f"?threshold={bad}")
        assert response.status_code == 422
        assert "threshold" in response.json()["error"]


def test_category_threshold(service: Service) -> None:
    """?category= decides with that category's calibrated threshold; an unknown one is refused, naming the known."""
    info = service.client.get("/v1/model").json()
    assert info["category_thresholds"] == {"nut": 1.5} and info["threshold"] == service.threshold == 1.0
    body = _post_png(service, service.normal[0], "?category=nut").json()
    assert body["threshold"] == 1.5 and body["is_anomalous"] == (body["score"] > 1.5)
    # a model fitted over its categories at once scores an image alike whatever category the request names
    assert body["score"] == pytest.approx(_post_png(service, service.normal[0]).json()["score"], rel=1e-6)
    assert _post_png(service, service.normal[0], "?category=nut&threshold=2.5").json()["threshold"] == 2.5
    refused = _post_png(service, service.normal[0], "?category=bolt")
    assert refused.status_code == 422 and refused.json()["error"] == (
        "unknown category 'bolt': the model was fitted on ['nut']")


def test_concurrent_requests_get_their_own_scores(service: Service) -> None:
    """Requests batched together must each get the score of their own image."""
    images = service.normal + service.defective
    alone = [_post_png(service, path).json()["score"] for path in images]
    with ThreadPoolExecutor(len(images) * 2) as pool:
        together = list(pool.map(lambda path: _post_png(service, path).json()["score"], images * 2))
    # Batch composition changes float32 rounding in the search and blur kernels, never more than this.
    assert together == pytest.approx(alone * 2, rel=1e-5)
    assert len({round(score, 3) for score in alone}) == len(images)


def test_score_equals_predict(service: Service, tmp_path: Path) -> None:
    """One scoring path: the served score of an image is bit-identical to `reconray predict`'s.

    Both sides score the image in a batch of one on one torch thread (the replica holds 0.5 CPU, so does the predict
    actor); see README "Serving" for why batch composition may move the last float32 bit.
    """
    image = service.defective[0]
    served = _post_png(service, image).json()
    resources = Resources(actors=1, cpus_per_actor=REPLICA_CPUS, gpus_per_actor=0.0, decode_cpus=0.25)
    [predicted] = predict_images(service.model_dir, [image], tmp_path, resources=resources)
    assert served["score"] == predicted["score"]
    assert served["is_anomalous"] == predicted["is_anomalous"]
    assert served["threshold"] == predicted["threshold"]


def _bad_uploads() -> dict[str, tuple[dict, int, str]]:
    """name → (httpx request arguments, expected status, a word the error message must contain)."""
    good = _png(Image.fromarray(np.full((32, 32, 3), 128, np.uint8)))
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    broken_crc = bytearray(good)
    broken_crc[-20] ^= 0xFF

    def png(content: bytes) -> dict:
        return {"content": content, "headers": {"Content-Type": "image/png"}}

    def chunks() -> object:
        for _ in range(DEFAULT_MAX_BYTES // 1_000_000 + 1):
            yield b"\0" * 1_000_000

    return {
        "empty body": (png(b""), 400, "empty"),
        "text as png": (png(b"hello, this is not an image"), 400, "image"),
        "truncated png": (png(good[: len(good) // 2]), 400, "decoded"),
        "truncated jpeg": (png(jpeg.getvalue()[:600]), 400, "decoded"),
        "corrupt png data": (png(bytes(broken_crc)), 400, "decoded"),
        "text/plain": ({"content": good, "headers": {"Content-Type": "text/plain"}}, 415, "content type"),
        "json": ({"json": {"image": "x"}}, 415, "content type"),
        "no content type": ({"content": good}, 415, "content type"),
        "over byte limit": (png(b"\0" * (DEFAULT_MAX_BYTES + 1)), 413, "limit"),
        "over byte limit, chunked": ({"content": chunks(), "headers": {"Content-Type": "image/png"}}, 413, "limit"),
        "over side limit": (png(_png(Image.new("L", (9000, 1)))), 413, "8000"),
        "decompression bomb header": (png(_png_header_only(30000, 30000)), 413, "pixels"),
        "multipart without image": ({"files": {"picture": ("a.png", good, "image/png")}}, 400, "image"),
        "multipart, empty image": ({"files": {"image": ("a.png", b"", "image/png")}}, 400, "empty"),
        "malformed multipart": ({"content": b"--x\r\nnonsense",
                                 "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400, "multipart"),
    }


def test_bad_inputs_are_4xx_and_the_replica_survives(service: Service) -> None:
    replica = service.client.get("/v1/health").json()["replica"]
    failures = []
    for name, (arguments, status, word) in _bad_uploads().items():
        response = service.client.post("/v1/score", **arguments)
        body = response.json()
        if response.status_code != status or word not in body.get("error", "").lower():
            failures.append(f"{name}: {response.status_code} {body}")
    assert not failures, failures
    assert service.client.get("/v1/health").json()["replica"] == replica
    assert _post_png(service, service.normal[0]).status_code == 200


def test_options_defaults_and_range_checks(service: Service) -> None:
    assert ServeOptions(model_dir=str(service.model_dir)).batch_size == 1
    assert ServeOptions(model_dir=str(service.model_dir), num_gpus=1).batch_size == GPU_BATCH_SIZE
    assert ServeOptions(model_dir=str(service.model_dir), num_gpus=1, max_batch_size=3).batch_size == 3
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeOptions(model_dir=str(service.model_dir), max_batch_size=0)
    with pytest.raises(ValueError, match="exceeds max_replicas"):
        ServeOptions(model_dir=str(service.model_dir), min_replicas=3, max_replicas=2)
    assert (ServeOptions(model_dir="m").upscale_delay_s, ServeOptions(model_dir="m").downscale_delay_s) == (30, 600)
    with pytest.raises(ValueError, match="downscale_delay_s"):
        ServeOptions(model_dir=str(service.model_dir), downscale_delay_s=-1)
    with pytest.raises(ValueError, match="not a reconray model"):
        build_app({"model_dir": str(service.model_dir / "missing")})


def test_cli_refuses_bad_settings_before_deploying(service: Service, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", str(service.model_dir), "--min-replicas", "3", "--max-replicas", "2"]) == 2
    assert "min_replicas=3 exceeds max_replicas=2" in capsys.readouterr().err


def test_keep_aspect_model_answers_with_the_part_s_own_geometry(service: Service, tall_model: Path,
                                                                 tall_root: Path, tmp_path: Path) -> None:
    """A keep-aspect artifact served next to the first: its map and overlay have the elongated part's shape, and its
    score is predict's."""
    serve.run(build_app({"model_dir": str(tall_model), "num_cpus": str(REPLICA_CPUS), "min_replicas": "1",
                         "max_replicas": "1"}), name="tall", route_prefix="/tall")
    try:
        image = sorted((tall_root / "nut" / "test").glob("*/*.png"))[-1]
        response = service.client.post("/tall/v1/score?heatmap=true", content=image.read_bytes(),
                                       headers={"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["heatmap_size"] == [64, 32] and body["patch_map_size"] == [8, 8]
        assert Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"]))).size == (32, 64)
        assert service.client.get("/tall/v1/model").json()["resize"] == "keep-aspect"
        predicted = predict_images(tall_model, [image], tmp_path,
                                   resources=Resources(1, REPLICA_CPUS, 0.0, 0.25, batch_size=1))
        assert body["score"] == pytest.approx(predicted[0]["score"], rel=1e-5, abs=1e-5)
    finally:
        serve.delete("tall")


def test_a_model_in_object_storage_is_fetched_verified_and_served(service: Service, bucket: str) -> None:
    """`model_dir` an s3:// URI on the loopback S3 server: the replica fetches the artifact onto its node, checks its
    hashes and answers exactly as the replica that loaded the local copy."""
    uri = upload_tree(service.model_dir, f"{bucket}/models/patchcore")
    serve.run(build_app({"model_dir": uri, "num_cpus": str(REPLICA_CPUS), "min_replicas": "1", "max_replicas": "1"}),
              name="from-s3", route_prefix="/s3")
    try:
        assert service.client.get("/s3/v1/model").json()["sha256"] == service.sha256
        image = service.defective[0].read_bytes()
        scores = [service.client.post(f"{prefix}/v1/score", content=image, headers={"Content-Type": "image/png"})
                  .json()["score"] for prefix in ("/s3", "")]
        assert scores[0] == pytest.approx(scores[1], rel=1e-6, abs=1e-6)
    finally:
        serve.delete("from-s3")


def test_killed_replica_is_replaced(service: Service) -> None:
    before = service.client.get("/v1/health").json()["replica"]
    statuses: list[int | str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=service.client.base_url, timeout=60.0) as client:
            while not stop.is_set():
                try:
                    statuses.append(client.post("/v1/score", content=service.normal[0].read_bytes(),
                                                headers={"Content-Type": "image/png"}).status_code)
                except httpx.HTTPError as error:
                    statuses.append(type(error).__name__)

    sender = threading.Thread(target=load)
    sender.start()
    try:
        while len(statuses) < 3:
            time.sleep(0.05)
        [(name, namespace)] = [(actor["name"], actor["namespace"])
                               for actor in ray.util.list_named_actors(all_namespaces=True)
                               if actor["name"].startswith("SERVE_REPLICA::") and before in actor["name"]]
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        killed_at = len(statuses)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (len(statuses) >= killed_at + 3 and statuses[-3:] == [200] * 3):
            time.sleep(0.2)
    finally:
        stop.set()
        sender.join()
    after = service.client.get("/v1/health").json()["replica"]
    assert after != before
    assert statuses[-3:] == [200] * 3, statuses
    assert all(_post_png(service, path).status_code == 200 for path in service.normal)


@pytest.fixture(scope="module")
def models_folder(tmp_path_factory: pytest.TempPathFactory, fitted_model: Path, tall_model: Path) -> Path:
    """A folder of three artifacts: the conftest model, a copy calibrated stricter, and the keep-aspect model."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(fitted_model, folder / "nut")
    shutil.copytree(fitted_model, folder / "nut-strict")
    set_thresholds(folder / "nut-strict", 2.0, {"nut": 3.0})
    shutil.copytree(tall_model, folder / "tall")
    return folder


def test_model_catalog_names_and_refusals(models_folder: Path, fitted_model: Path, bucket: str) -> None:
    """A folder of artifacts, local or in a bucket, serves each under its folder name; one artifact is a one-model
    service; names must be one URL path segment; a global threshold is refused with several models."""
    assert model_catalog(ServeOptions(model_dir=str(models_folder))) == {
        name: str(models_folder / name) for name in ("nut", "nut-strict", "tall")}
    uri = upload_tree(models_folder, f"{bucket}/lines")
    names = ("nut", "nut-strict", "tall")
    assert model_catalog(ServeOptions(model_dir=uri)) == {name: f"{uri}/{name}" for name in names}
    assert model_catalog(ServeOptions(model_dir=f"{uri}/nut")) is None
    assert model_catalog(ServeOptions(model_dir=str(fitted_model))) is None
    assert model_catalog(ServeOptions(models={"a": str(fitted_model)})) == {"a": str(fitted_model)}
    with pytest.raises(ValueError, match="model name 'a/b'"):
        ServeOptions(models={"a/b": str(fitted_model)})
    with pytest.raises(ValueError, match="give one of model_dir"):
        ServeOptions()
    with pytest.raises(ValueError, match="no config.json"):
        model_catalog(ServeOptions(model_dir=str(models_folder / "nut" / "missing")))
    with pytest.raises(ValueError, match="its own calibrated threshold"):
        build_app({"model_dir": str(models_folder), "threshold": "1.0"})


def test_cli_serves_one_model_a_folder_or_named_models(models_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nut, tall = models_folder / "nut", models_folder / "tall"
    assert _served_models([str(models_folder)]) == {"model_dir": str(models_folder)}
    assert _served_models(["s3://bucket/models/nut"]) == {"model_dir": "s3://bucket/models/nut"}
    assert _served_models([f"nut={nut}", f"tall={tall}"]) == {"models": {"nut": str(nut), "tall": str(tall)}}
    for arguments, message in (
        (["--model", f"nut={nut}", "--model", str(tall)], "NAME=MODEL for each model"),
        (["--model", f"nut={nut}", "--model", f"nut={tall}"], "a name is given twice"),
        (["--model", f"n?t={nut}"], "model name 'n?t'"),
        (["--model", str(models_folder), "--threshold", "1"], "its own calibrated threshold"),
    ):
        assert main(["serve", *arguments]) == 2
        assert message in capsys.readouterr().err


def test_several_models_behind_one_service(service: Service, models_folder: Path, tall_root: Path) -> None:
    """`/v1/score/{name}` through the router and a one-replica pool that keeps two models (LRU): each model answers
    with its own score, threshold and hash, loads on its first request, is dropped when least recently used, and a
    model whose files no longer match its hashes is refused with 503 while the others keep answering."""
    serve.run(build_app({"model_dir": str(models_folder), "num_cpus": str(REPLICA_CPUS), "min_replicas": "1",
                         "max_replicas": "1", "max_models_per_replica": "2"}), name="models", route_prefix="/models")
    try:
        client = service.client
        listed = {entry["name"]: entry for entry in client.get("/models/v1/models").json()}
        assert sorted(listed) == ["nut", "nut-strict", "tall"]
        assert listed["nut"]["sha256"] == service.sha256 != listed["nut-strict"]["sha256"]
        assert (listed["nut-strict"]["threshold"], listed["nut-strict"]["category_thresholds"]) == (2.0, {"nut": 3.0})
        assert client.get("/models/v1/health").json()["models"] == ["nut", "nut-strict", "tall"]
        assert set(client.get("/models/openapi.json").json()["paths"]) == {
            "/v1/score/{name}", "/v1/models", "/v1/health"}

        image = service.defective[0].read_bytes()

        def score(name: str, query: str = "", content: bytes = image) -> httpx.Response:
            return client.post(f"/models/v1/score/{name}{query}", content=content,
                               headers={"Content-Type": "image/png"})

        alone = _post_png(service, service.defective[0]).json()
        first, second = score("nut").json(), score("nut").json()
        assert (first["cold_start"], second["cold_start"]) == (True, False)
        assert first["score"] == pytest.approx(alone["score"], rel=1e-6) == second["score"]
        assert (first["threshold"], first["model"]["sha256"]) == (1.0, service.sha256)
        strict = score("nut-strict").json()
        assert (strict["cold_start"], strict["threshold"]) == (True, 2.0)
        assert strict["score"] == pytest.approx(alone["score"], rel=1e-6)
        assert strict["is_anomalous"] == (strict["score"] > 2.0)
        assert score("nut-strict", "?category=nut").json()["threshold"] == 3.0
        tall_image = sorted((tall_root / "nut" / "test").glob("*/*.png"))[-1].read_bytes()
        tall = score("tall", "?heatmap=true", tall_image).json()
        assert tall["cold_start"] is True and tall["heatmap_size"] == [64, 32]
        assert score("nut").json()["cold_start"] is True  # the least recently used of two made room for `tall`

        missing = score("bolt")
        assert missing.status_code == 404 and "served: ['nut', 'nut-strict', 'tall']" in missing.json()["error"]
        not_image = score("nut", content=b"hello, this is not an image")
        assert not_image.status_code == 400 and "image" in not_image.json()["error"]
        unknown_category = score("nut", "?category=bolt")
        assert unknown_category.status_code == 422 and "fitted on ['nut']" in unknown_category.json()["error"]

        index = models_folder / "nut-strict" / "bank.faiss"
        index.write_bytes(index.read_bytes()[:-8])  # truncated after the app was built: caught on load
        broken = score("nut-strict")
        assert broken.status_code == 503
        assert "'nut-strict'" in broken.json()["error"] and "sha256 does not match" in broken.json()["error"]
        assert score("nut").status_code == score("tall", content=tall_image).status_code == 200
    finally:
        serve.delete("models")
