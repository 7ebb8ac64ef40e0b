"""Shared fixtures: one local Ray for the whole session, a small synthetic dataset, a fitted model, file builders.

Ray is started once (2 CPUs, no dashboard) by the first test that asks for `ray_session` and shut down at the end;
`pipelines.runtime.ensure_ray()` is a no-op while it runs, so every pipeline under test reuses it. Tests that need a
cluster of their own (RAY_ADDRESS) run their driver in a child process and leave this one alone.

Tiers: every test is `unit` or `integration` (see "tiers" below), so `pytest -m unit` is a fast run without Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from reconray.methods import create_method
from reconray.methods.artifact import ModelSpec, save_artifact, set_thresholds
from reconray.methods.backbone import DEFAULT_BACKBONE, DEFAULT_LEVELS, FeatureExtractor, backbone_normalization
from reconray.methods.scoring import content_mask
from reconray.pipelines.datasets import decode_rgb
from reconray.pipelines.ingest import preprocess
from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset

TEST_IMAGE_SIZE = 64
"""Input side used by every test that runs the backbone: 8x8 patch grid at level 2, fast on 2 shared cores."""

SYNTHETIC = SyntheticConfig(image_size=TEST_IMAGE_SIZE, n_train=10, n_test_good=4, n_test_defect=4,
                            categories=("fabric", "nut", "wood"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Picked once per test process: collecting the suite again in-process (tests/test_tiers.py) imports this module again,
# and a second pick would point the environment at a port no server listens on.
S3_ENDPOINT = os.environ.setdefault("RECONRAY_TEST_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
# Object storage is configured the usual way, through the environment, and set here before any test starts Ray:
# Ray's worker processes inherit the driver's environment when the session's Ray starts, so every Ray Data worker and
# Serve replica reaches the same loopback S3 server the test fixture starts (and no test can reach a real bucket).
os.environ |= {"AWS_ENDPOINT_URL": S3_ENDPOINT, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
               "AWS_CONFIG_FILE": os.devnull}
GCS_ENDPOINT = os.environ.setdefault("RECONRAY_TEST_GCS_ENDPOINT", f"http://127.0.0.1:{free_port()}")
# gs:// goes to a loopback GCS emulator the same way (gcsfs reads STORAGE_EMULATOR_HOST); gcsfs's probe of a bucket's
# type (zonal, hierarchical) speaks gRPC over TLS, which no emulator answers, so it is switched off before import.
os.environ |= {"STORAGE_EMULATOR_HOST": GCS_ENDPOINT, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def _server(command: list[str], endpoint: str, name: str) -> Iterator[str]:
    """Runs the server `command` until the block ends, once it accepts connections on `endpoint`; yields it."""
    port = int(endpoint.rsplit(":", 1)[1])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start on {endpoint}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto's standalone server) on loopback for the whole session; yields its URL."""
    port = S3_ENDPOINT.rsplit(":", 1)[1]
    with _server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port], S3_ENDPOINT, "moto server"):
        yield S3_ENDPOINT


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    """A GCS emulator (the PyPI package gcp-storage-emulator, in memory) on loopback; yields its URL. Requests go
    unauthenticated (fsspec's gcs token "anon")."""
    import fsspec

    command = [str(Path(sys.executable).with_name("gcp-storage-emulator")), "start", "--host", "127.0.0.1", "--port",
               GCS_ENDPOINT.rsplit(":", 1)[1], "--in-memory"]
    with pytest.MonkeyPatch.context() as patch, _server(command, GCS_ENDPOINT, "GCS emulator"):
        patch.setitem(fsspec.config.conf, "gcs", {"token": "anon", "project": "test"})
        yield GCS_ENDPOINT


@pytest.fixture
def bucket(s3_server: str) -> str:
    """A new empty bucket on the loopback S3 server; yields `s3://<name>`."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


def upload_tree(folder: Path, uri: str) -> str:
    """Copies every file under `folder` to the same relative keys under `uri`; returns `uri`."""
    import s3fs

    filesystem = s3fs.S3FileSystem(skip_instance_cache=True)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            filesystem.put_file(str(path), f"{uri.removeprefix('s3://')}/{path.relative_to(folder).as_posix()}")
    return uri


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local 2-CPU Ray shared by every test that needs one, whatever cluster the environment points at; with the
    dashboard, whose State API lets Ray Train free the workers of a stopped rlr trial."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
        ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small deterministic MVTec-layout dataset (3 categories, 64 px); tests must not write into it."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), SYNTHETIC)


@pytest.fixture(scope="session")
def model_spec() -> ModelSpec:
    """The default backbone and levels at the tests' 64 px input, with the offline weights' normalization."""
    mean, std = backbone_normalization(DEFAULT_BACKBONE)
    return ModelSpec(DEFAULT_BACKBONE, list(DEFAULT_LEVELS), TEST_IMAGE_SIZE, list(mean), list(std))


@pytest.fixture(scope="session")
def extractor() -> FeatureExtractor:
    """The default frozen backbone, built once: loading its weights is the slow part of every in-process test."""
    torch.set_num_threads(1)  # two threads on two shared cores ran up to 5x slower when the machine was busy
    return FeatureExtractor().eval()


@pytest.fixture(scope="session")
def pixels(model_spec: ModelSpec) -> Callable[[Sequence[str | Path]], torch.Tensor]:
    """Decodes and normalizes image files exactly as the Ray ingest does, in-process: `(B, 3, 64, 64)`."""
    return lambda paths: torch.stack([preprocess(decode_rgb(path), model_spec) for path in paths])


@pytest.fixture(scope="session")
def fitted_model(
    tmp_path_factory: pytest.TempPathFactory,
    synthetic_root: Path,
    model_spec: ModelSpec,
    extractor: FeatureExtractor,
    pixels: Callable[[Sequence[str | Path]], torch.Tensor],
) -> Path:
    """A patchcore artifact fitted in-process (no Ray) on the `nut` training images; threshold 1.0, and 1.5 for
    `nut` (as a multi-category fit would store it)."""
    train = sorted((synthetic_root / "nut" / "train" / "good").glob("*.png"))
    method = create_method("patchcore")
    method.fit([extractor(pixels(train))])
    directory = save_artifact(tmp_path_factory.mktemp("model"), method, model_spec, threshold=1.0, categories=["nut"])
    set_thresholds(directory, 1.0, {"nut": 1.5})
    return directory


TALL_SIZE = (TEST_IMAGE_SIZE // 2, TEST_IMAGE_SIZE)
"""(W, H) of the `tall_root` images: an elongated part, half as wide as it is tall."""


@pytest.fixture(scope="session")
def tall_root(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    """The synthetic `nut` category narrowed to 32 x 64 px (images bilinear, masks nearest): an elongated part for
    `keep-aspect`, in the same MVTec layout."""
    root = tmp_path_factory.mktemp("tall")
    for path in sorted((synthetic_root / "nut").rglob("*.png")):
        target = root / "nut" / path.relative_to(synthetic_root / "nut")
        target.parent.mkdir(parents=True, exist_ok=True)
        resample = Image.NEAREST if path.parent.parent.name == "ground_truth" else Image.BILINEAR
        Image.open(path).resize(TALL_SIZE, resample).save(target)
    return root


@pytest.fixture(scope="session")
def tall_model(tmp_path_factory: pytest.TempPathFactory, tall_root: Path, model_spec: ModelSpec,
               extractor: FeatureExtractor) -> Path:
    """A keep-aspect patchcore artifact fitted in-process on the `tall_root` training images, on their own patches
    only (threshold 1.0)."""
    spec = dataclasses.replace(model_spec, resize="keep-aspect")
    train = sorted((tall_root / "nut" / "train" / "good").glob("*.png"))
    images = torch.stack([preprocess(decode_rgb(path), spec) for path in train])
    content = np.array([spec.content_size(TALL_SIZE[1], TALL_SIZE[0])] * len(train))
    features = extractor(images)
    method = create_method("patchcore", coreset_ratio=1.0)
    method.fit([features], [content_mask(content, features[0].shape[-2:], spec.image_size)])
    return save_artifact(tmp_path_factory.mktemp("tall-model"), method, spec, threshold=1.0, categories=["nut"])


@dataclasses.dataclass
class FileBuilder:
    """Writes small images, masks and dataset trees under `root` for discovery and validation tests."""

    root: Path

    def image(self, relative: str | Path, size: tuple[int, int] = (32, 24), seed: int = 0, mode: str = "RGB") -> Path:
        """A random image of `size` (W, H) in `mode`, format chosen by the suffix."""
        rng = np.random.default_rng(seed)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        return self._save(relative, Image.fromarray(pixels).convert(mode))

    def mask(self, relative: str | Path, size: tuple[int, int] = (32, 24)) -> Path:
        """A 0/255 mask of `size` (W, H) with a defect rectangle in the top-left quarter."""
        pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
        pixels[: size[1] // 2, : size[0] // 2] = 255
        return self._save(relative, Image.fromarray(pixels))

    def truncated(self, relative: str | Path, size: tuple[int, int] = (32, 24)) -> Path:
        """The first half of a valid image file of the suffix's format: what an interrupted copy leaves."""
        path = self.root / relative
        buffer = io.BytesIO()
        image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        image.save(buffer, format=Image.registered_extensions()[path.suffix.lower()])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        return path

    def mvtec(self, relative: str | Path, categories: Sequence[str] = ("bottle", "grid"), train: int = 2,
              good: int = 1, defects: Sequence[str] = ("crack",), per_defect: int = 1) -> Path:
        """An MVTec AD tree: train/good, test/good, test/<defect> and ground_truth/<defect>/<stem>_mask.png."""
        root = self.root / relative
        for category in categories:
            for index in range(train):
                self.image(root / category / "train" / "good" / f"{index:03d}.png", seed=index)
            for index in range(good):
                self.image(root / category / "test" / "good" / f"{index:03d}.png", seed=100 + index)
            for defect in defects:
                for index in range(per_defect):
                    self.image(root / category / "test" / defect / f"{index:03d}.png", seed=200 + index)
                    self.mask(root / category / "ground_truth" / defect / f"{index:03d}_mask.png")
        return root

    def mvtec3d(self, relative: str | Path, categories: Sequence[str] = ("bagel", "cookie")) -> Path:
        """An MVTec 3D-AD tree (rgb, gt, xyz; a validation split that reconray does not use)."""
        root = self.root / relative
        for category in categories:
            self.image(root / category / "train" / "good" / "rgb" / "000.png")
            self.image(root / category / "train" / "good" / "xyz" / "000.tiff")
            self.image(root / category / "validation" / "good" / "rgb" / "000.png")
            self.image(root / category / "test" / "good" / "rgb" / "000.png")
            self.image(root / category / "test" / "hole" / "rgb" / "000.png")
            self.mask(root / category / "test" / "hole" / "gt" / "000.png")
        return root

    def _save(self, relative: str | Path, image: Image.Image) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        return path


@pytest.fixture
def files(tmp_path: Path) -> FileBuilder:
    """Builds test files under this test's own tmp_path."""
    return FileBuilder(tmp_path)


# --- tiers ---------------------------------------------------------------------------------------------------------

TIERS = ("unit", "integration")
_RAY_WAS_UP = pytest.StashKey[bool]()


def _explicit_tiers(item: pytest.Item) -> set[str]:
    return {mark.name for mark in item.iter_markers() if mark.name in TIERS}


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """Makes a test marked with both tiers, or marked unit yet using `ray_session`, a collection error of its module."""
    report = yield
    problems = []
    for item in report.result if report.passed else []:
        tiers = _explicit_tiers(item) if isinstance(item, pytest.Item) else set()
        if len(tiers) > 1:
            problems.append(f"{item.nodeid}: marked both unit and integration")
        elif tiers == {"unit"} and "ray_session" in item.fixturenames:
            problems.append(f"{item.nodeid}: marked unit but uses ray_session")
    if problems:
        report.outcome, report.longrepr, report.result = "failed", "\n".join(problems), []
    return report


@pytest.hookimpl(tryfirst=True)  # first: `-m` deselects in pytest's own implementation of this hook
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers every test not marked explicitly: integration if it needs the session's Ray (even through another
    fixture), else unit. Tests that start Ray some other way (a subprocess, their own cluster) are marked explicitly.
    Then orders the modules: those that never use the session's Ray first.
    """
    for item in items:
        if not _explicit_tiers(item):
            item.add_marker("integration" if "ray_session" in item.fixturenames else "unit")
    # Modules that never use the session's Ray run first, before it starts: the README and cluster tests start Ray
    # in subprocesses of their own, which then do not share 2 cores with an idle one. A module's tests stay together.
    with_session_ray = {item.path for item in items if "ray_session" in item.fixturenames}
    items.sort(key=lambda item: item.path in with_session_ray)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Notes, before any of the test's fixtures, whether Ray is already up: the teardown check blames only a start."""
    item.stash[_RAY_WAS_UP] = ray.is_initialized()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    """Fails a unit test that started Ray, in its fixtures or its body: the unit tier promises a run without one.

    Ray already up (the session's, after an integration test) hides a unit test that merely uses it; `-m unit` runs
    start with no Ray, so there the check is exact.
    """
    yield
    if item.get_closest_marker("unit") and not item.stash[_RAY_WAS_UP] and ray.is_initialized():
        pytest.fail(f"{item.nodeid} is a unit test but started Ray: mark it integration", pytrace=False)
