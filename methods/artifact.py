"""Save and load fitted models as a directory of plain, hash-checked files: never pickle.

Layout of an artifact directory:
    config.json          method, options, backbone, levels, image size, normalization, threshold, categories,
                         schema version and the sha256 of every other file
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
from typing import Any

import faiss
import torch
from safetensors.torch import load_file, save_file

from methods.backbone import FeatureExtractor
from methods.base import METHODS, AnomalyMethod, MethodState
from methods.scoring import Scorer

SCHEMA_VERSION = 1
CONFIG_FILE = "config.json"
TENSORS_FILE = "tensors.safetensors"


class ArtifactError(ValueError):
    """An artifact directory that cannot be loaded as it is (missing, tampered, or from another schema)."""


@dataclasses.dataclass
class ModelSpec:
    """How images become features: the part of a model that is not the method."""

    backbone: str
    levels: list[int]
    image_size: int
    mean: list[float]
    std: list[float]
    weights: str | None = None

    def extractor(self) -> FeatureExtractor:
        return FeatureExtractor(self.backbone, self.levels, weights=self.weights)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSpec:
        """The spec stored in an artifact's config.json."""
        return cls(**{field.name: config[field.name] for field in dataclasses.fields(cls)})


@dataclasses.dataclass
class Artifact:
    """A loaded model: the method, how to extract its features, its threshold and what it was fitted on."""

    method: AnomalyMethod
    spec: ModelSpec
    threshold: float | None
    categories: list[str]
    info: dict[str, Any]
    sha256: str

    def scorer(self, device: torch.device | str = "cpu") -> Scorer:
        return Scorer(self.spec.extractor(), self.method, device)


def save_artifact(
    directory: str | Path,
    method: AnomalyMethod,
    spec: ModelSpec,
    threshold: float | None,
    categories: list[str],
    info: dict[str, Any] | None = None,
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
    config = {
        "schema_version": SCHEMA_VERSION,
        "method": method.name,
        "options": state.options,
        "method_info": state.info,
        **dataclasses.asdict(spec),
        "threshold": threshold,
        "categories": categories,
        "info": info or {},
        "sha256": {name: _sha256(directory / name) for name in files},
    }
    _write_config(directory, config)
    return directory


def load_artifact(directory: str | Path) -> Artifact:
    """Loads an artifact written by `save_artifact`, after checking the schema and every file's sha256."""
    directory = Path(directory)
    config = read_config(directory)
    for name, expected in config["sha256"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: file listed in {CONFIG_FILE} is missing")
        if _sha256(path) != expected:
            raise ArtifactError(f"{path}: sha256 does not match {CONFIG_FILE} (file truncated or modified)")
    method_class = METHODS.get(config["method"])
    if method_class is None:
        raise ArtifactError(f"{directory}: unknown method {config['method']!r}; known: {sorted(METHODS)}")
    files = config["sha256"]
    state = MethodState(
        options=config["options"],
        tensors=load_file(str(directory / TENSORS_FILE)) if TENSORS_FILE in files else {},
        indexes={name[: -len(".faiss")]: faiss.read_index(str(directory / name)) for name in files
                 if name.endswith(".faiss")},
        info=config["method_info"],
    )
    spec = ModelSpec.from_config(config)
    return Artifact(
        method=method_class.from_state(state),
        spec=spec,
        threshold=config["threshold"],
        categories=config["categories"],
        info=config["info"],
        sha256=_sha256(directory / CONFIG_FILE),
    )


def set_threshold(directory: str | Path, threshold: float | None) -> None:
    """Stores a (re)calibrated decision threshold; config.json is rewritten atomically, the tensors untouched."""
    config = read_config(directory)
    config["threshold"] = threshold
    _write_config(Path(directory), config)


def read_config(directory: str | Path) -> dict[str, Any]:
    """Reads and checks `config.json` of an artifact without loading tensors (cheap, for listings and the CLI)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory}: not a reconray model (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path}: not valid JSON ({error})") from error
    if config.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema version {config.get('schema_version')!r} is not supported (this reconray reads "
            f"{SCHEMA_VERSION})"
        )
    return config


def _write_config(directory: Path, config: dict[str, Any]) -> None:
    temporary = directory / f".{CONFIG_FILE}.tmp"
    temporary.write_text(json.dumps(config, indent=2))
    os.replace(temporary, directory / CONFIG_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
