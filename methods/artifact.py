"""Save and load fitted models as a directory of plain, hash-checked files: never pickle.

Layout of an artifact directory:
    config.json          `ArtifactConfig`: method, options, feature spec (backbone, levels, image size,
                         normalization), threshold, categories, fit record, bank size, schema version and the sha256
                         of every other file
    tensors.safetensors  the method's tensors (absent when it has none)
    <name>.faiss         each FAISS index, written with `faiss.write_index`

Loading recomputes every hash first and refuses a missing, truncated or altered file by name, so a scorer never
runs on a model that is not the one that was fitted and evaluated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import faiss
import pydantic
import torch
from safetensors.torch import load_file, save_file

from reconray.methods.backbone import DEFAULT_POOL, DEFAULT_RESIZE, FeatureExtractor, check_aggregation, check_geometry
from reconray.methods.base import METHODS, AnomalyMethod, MethodState
from reconray.methods.errors import ArtifactError, OptionError
from reconray.methods.extended import ExtendedBank, is_extended
from reconray.methods.scoring import Scorer

SCHEMA_VERSION = 2
CONFIG_FILE = "config.json"
TENSORS_FILE = "tensors.safetensors"


@pydantic.dataclasses.dataclass
class ModelSpec:
    """How images become features: the part of a model that is not the method.

    `aggregation`, `pool`, `resize` and `tile` (methods.backbone) default to what every artifact written before they
    were recorded was fitted with, so such an artifact still scores as it was evaluated.
    """

    backbone: str
    levels: list[int]
    image_size: int
    mean: list[float]
    std: list[float]
    weights: str | None = None
    aggregation: str = "pool-align"
    pool: int = DEFAULT_POOL
    resize: str = DEFAULT_RESIZE
    tile: int | None = None

    def __post_init__(self) -> None:
        check_aggregation(self.aggregation, self.pool)
        check_geometry(self.image_size, self.resize, self.tile)

    def extractor(self) -> FeatureExtractor:
        return FeatureExtractor(self.backbone, self.levels, weights=self.weights, aggregation=self.aggregation,
                                pool=self.pool, tile=self.tile)

    def content_size(self, height: int, width: int) -> tuple[int, int]:
        """Where an `height` x `width` image lands on the `image_size` square canvas, from its top-left corner:
        the whole canvas when squashed (`square`), the long side across it and the aspect kept (`keep-aspect`)."""
        if self.resize == "square":
            return self.image_size, self.image_size
        scale = self.image_size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))


class FitRecord(pydantic.BaseModel):
    """What the fit saw: its duration, how many images it fitted on and held out, the images it skipped, and the
    model it extended, if any (these counts are then the new categories' alone)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    fit_s: float | None = None
    n_fit: int = 0
    n_calibration: int = 0
    skipped: list[dict[str, str]] = []
    extends: str | None = None
    """sha256 of the config.json of the model this one extends (`fit --add-to`), None for a model fitted whole."""
    stages: dict[str, float] = {}
    """Seconds per stage of the whole `fit_model` call (discovery and validation pass, Ray start, the method's own
    stages, saving and calibration), so a report says where a fit's time went."""


class ArtifactConfig(pydantic.BaseModel):
    """The schema of config.json: read and written only here, so every reader sees typed, checked fields."""

    model_config = pydantic.ConfigDict(extra="forbid")

    schema_version: Literal[2] = SCHEMA_VERSION
    method: str
    options: dict[str, Any]
    method_info: dict[str, Any] = {}
    spec: ModelSpec
    threshold: float | None = None
    category_thresholds: dict[str, float] = {}
    categories: list[str] = []
    fit: FitRecord = FitRecord()
    bank_vectors: int | None = None
    bank_bytes: int | None = None
    sha256: dict[str, str] = {}

    def threshold_for(self, category: str | None = None) -> float | None:
        """The threshold that decides for an image of `category`: the category's own calibrated one, the global one
        for a category calibrated without held-out images, and the global one when no category is named.

        Raises:
            OptionError: `category` is not one the model was fitted on; the message lists those.
        """
        if category is None:
            return self.threshold
        if category not in self.categories:
            raise OptionError(f"unknown category {category!r}: the model was fitted on {self.categories}")
        return self.category_thresholds.get(category, self.threshold)


@dataclasses.dataclass
class Artifact:
    """A loaded model: the method, how to extract its features, its threshold and what it was fitted on."""

    method: AnomalyMethod
    config: ArtifactConfig
    sha256: str

    @property
    def spec(self) -> ModelSpec:
        return self.config.spec

    @property
    def threshold(self) -> float | None:
        return self.config.threshold

    @property
    def categories(self) -> list[str]:
        return self.config.categories

    def scorer(self, device: torch.device | str = "cpu") -> Scorer:
        return Scorer(self.spec.extractor(), self.method, device)


def save_artifact(
    directory: str | Path,
    method: AnomalyMethod,
    spec: ModelSpec,
    threshold: float | None,
    categories: list[str],
    fit: FitRecord | None = None,
) -> Path:
    """Writes `method` and its feature spec to `directory`; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = method.state()
    files: list[str] = []
    if state.tensors:
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in state.tensors.items()},
                  str(directory / TENSORS_FILE))
        files.append(TENSORS_FILE)
    for name, index in state.indexes.items():
        faiss.write_index(index, str(directory / f"{name}.faiss"))
        files.append(f"{name}.faiss")
    for stale in [directory / TENSORS_FILE, *directory.glob("*.faiss")]:
        if stale.name not in files and stale.is_file():
            stale.unlink()  # left by an earlier fit into the same directory: not part of this model
    bank_vectors, bank_bytes = method.bank_stats()
    config = ArtifactConfig(
        method=method.name,
        options=state.options,
        method_info=state.info,
        spec=spec,
        threshold=threshold,
        categories=categories,
        fit=fit or FitRecord(),
        bank_vectors=bank_vectors,
        bank_bytes=bank_bytes,
        sha256={name: _sha256(directory / name) for name in files},
    )
    _write_config(directory, config)
    return directory


def load_artifact(directory: str | Path) -> Artifact:
    """Loads an artifact written by `save_artifact`, after checking the schema and every file's sha256."""
    directory = Path(directory)
    config = verify_files(directory)
    method_class = METHODS.get(config.method)
    if method_class is None:
        raise ArtifactError(f"{directory}: unknown method {config.method!r}; known: {sorted(METHODS)}")
    state = MethodState(
        options=config.options,
        tensors=load_file(str(directory / TENSORS_FILE)) if TENSORS_FILE in config.sha256 else {},
        indexes={name[: -len(".faiss")]: faiss.read_index(str(directory / name)) for name in config.sha256
                 if name.endswith(".faiss")},
        info=config.method_info,
    )
    method = ExtendedBank.from_state(state, method_class) if is_extended(config.method_info) else \
        method_class.from_state(state)
    return Artifact(method=method, config=config, sha256=config_sha256(directory))


def verify_files(directory: str | Path) -> ArtifactConfig:
    """The artifact's config, after checking that every file it lists is there with its recorded sha256."""
    directory = Path(directory)
    config = read_config(directory)
    for name, expected in config.sha256.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: file listed in {CONFIG_FILE} is missing")
        if _sha256(path) != expected:
            raise ArtifactError(f"{path}: sha256 does not match {CONFIG_FILE} (file truncated or modified)")
    return config


def set_thresholds(
    directory: str | Path, threshold: float | None, category_thresholds: dict[str, float] | None = None,
    fit: FitRecord | None = None,
) -> None:
    """Stores (re)calibrated decision thresholds, the global one and one per category, and the fit record when given
    (a fit's last stages are timed only once it is calibrated); config.json is rewritten atomically, the tensors
    untouched."""
    config = read_config(directory)
    update = {"threshold": threshold, "category_thresholds": dict(category_thresholds or {})}
    if fit is not None:
        update["fit"] = fit
    _write_config(Path(directory), config.model_copy(update=update))


def config_sha256(directory: str | Path) -> str:
    """An artifact's identity: the sha256 of its config.json, which lists the hash of every other file."""
    return _sha256(Path(directory) / CONFIG_FILE)


def read_config(directory: str | Path) -> ArtifactConfig:
    """Reads and checks `config.json` of an artifact without loading tensors (cheap, for listings and the CLI)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory}: not a reconray model (no {CONFIG_FILE})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path}: not valid JSON ({error})") from error
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema version {version!r} is not supported (this reconray reads {SCHEMA_VERSION}); refit the "
            "model with this version"
        )
    try:
        return ArtifactConfig.model_validate(raw)
    except pydantic.ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors())
        raise ArtifactError(f"{path}: {problems}") from None


def _write_config(directory: Path, config: ArtifactConfig) -> None:
    temporary = directory / f".{CONFIG_FILE}.tmp"
    temporary.write_text(config.model_dump_json(indent=2))
    os.replace(temporary, directory / CONFIG_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
