"""Artifact: a saved model scores exactly like the fitted one, damaged files are refused by name, no pickle."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from reconray.methods import METHODS, create_method
from reconray.methods.artifact import (
    CONFIG_FILE,
    SCHEMA_VERSION,
    TENSORS_FILE,
    ArtifactConfig,
    ArtifactError,
    FitRecord,
    ModelSpec,
    load_artifact,
    read_config,
    save_artifact,
    set_thresholds,
)
from reconray.methods.base import AnomalyMethod, MethodOptions, MethodState
from reconray.methods.errors import OptionError

PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".npy", ".npz", ".joblib"}


class _NearestMean(AnomalyMethod):
    """A method with tensor state (the per-channel mean of nominal features), to exercise the safetensors path."""

    class Options(MethodOptions):
        scale: float = 1.0

    name = "test_nearest_mean"

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.mean: torch.Tensor | None = None

    def fit(self, feature_batches: Iterable[list[torch.Tensor]]) -> None:
        self.mean = torch.cat([features[0] for features in feature_batches]).mean(dim=(0, 2, 3))

    def score(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.options.scale * (features[0] - self.mean[None, :, None, None]).norm(dim=1)

    def state(self) -> MethodState:
        return MethodState(options=self.options.model_dump(), tensors={"mean": self.mean},
                           info={"channels": len(self.mean)})

    @classmethod
    def from_state(cls, state: MethodState) -> _NearestMean:
        method = cls(**state.options)
        method.mean = state.tensors["mean"]
        return method


@pytest.fixture
def model_copy(fitted_model: Path, tmp_path: Path) -> Path:
    """A private copy of the session's fitted patchcore artifact, free to damage."""
    return Path(shutil.copytree(fitted_model, tmp_path / "model"))


def _test_images(synthetic_root: Path) -> list[Path]:
    return sorted((synthetic_root / "nut" / "test").glob("*/00[01].png"))


def test_round_trip_gives_identical_scores(fitted_model: Path, synthetic_root: Path, extractor, pixels) -> None:
    artifact = load_artifact(fitted_model)
    assert artifact.method.name == "patchcore" and artifact.threshold == 1.0 and artifact.categories == ["nut"]
    images = pixels(_test_images(synthetic_root))
    train = sorted((synthetic_root / "nut" / "train" / "good").glob("*.png"))
    fresh = create_method("patchcore")
    fresh.fit([extractor(pixels(train))])
    features = extractor(images)
    assert torch.equal(artifact.method.score(features), fresh.score(features))
    first, second = artifact.scorer()(images), load_artifact(fitted_model).scorer()(images)
    assert torch.equal(first.image_scores, second.image_scores)
    assert torch.equal(first.anomaly_maps, second.anomaly_maps)


def test_tensor_state_round_trip(tmp_path: Path, model_spec: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, _NearestMean.name, _NearestMean)
    features = [torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(0))]
    method = _NearestMean(scale="2.5")
    method.fit([features])
    record = FitRecord(fit_s=1.5, n_fit=4, n_calibration=1)
    directory = save_artifact(tmp_path / "mean", method, model_spec, threshold=None, categories=["a", "b"],
                              fit=record)
    assert sorted(path.name for path in directory.iterdir()) == [CONFIG_FILE, TENSORS_FILE]
    artifact = load_artifact(directory)
    assert isinstance(artifact.method, _NearestMean) and artifact.method.options.scale == 2.5
    assert torch.equal(artifact.method.score(features), method.score(features))
    assert artifact.spec == model_spec and artifact.threshold is None and artifact.config.fit == record
    config = read_config(directory)
    assert config.method_info == {"channels": 6}
    assert (config.bank_vectors, config.bank_bytes) == (None, None)  # a method without a bank says so


def test_config_lists_what_design_requires(fitted_model: Path, model_spec: ModelSpec) -> None:
    config = json.loads((fitted_model / CONFIG_FILE).read_text())
    assert config["schema_version"] == SCHEMA_VERSION and config["method"] == "patchcore"
    spec = config["spec"]
    assert (spec["backbone"], spec["levels"], spec["image_size"]) == ("tf_efficientnet_lite0", [2, 3], 64)
    assert (spec["mean"], spec["std"]) == (model_spec.mean, model_spec.std)
    assert config["options"] == create_method("patchcore").options.model_dump()
    assert set(config["sha256"]) == {"bank.faiss"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in config["sha256"].values())
    assert config["bank_vectors"] == 8 * 8 * 10
    assert "basis_vectors" not in json.dumps(config)  # one name for the bank size, whatever the method


def test_no_pickle_in_the_artifact(fitted_model: Path) -> None:
    files = [path for path in fitted_model.rglob("*") if path.is_file()]
    assert sorted(path.name for path in files) == ["bank.faiss", CONFIG_FILE]
    assert not [path for path in files if path.suffix in PICKLE_SUFFIXES]
    for path in files:
        assert path.read_bytes()[:1] != b"\x80", f"{path} starts like a pickle stream"


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "append"])
def test_damaged_index_is_refused_by_name(model_copy: Path, damage: str) -> None:
    index = model_copy / "bank.faiss"
    content = bytearray(index.read_bytes())
    if damage == "flip_byte":
        content[len(content) // 2] ^= 0xFF
    elif damage == "truncate":
        content = content[: len(content) // 2]
    else:
        content += b"\0"
    index.write_bytes(bytes(content))
    with pytest.raises(ArtifactError, match=rf"{re.escape(str(index))}: sha256 does not match config\.json"):
        load_artifact(model_copy)


def test_damaged_tensors_are_refused(tmp_path: Path, model_spec: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, _NearestMean.name, _NearestMean)
    method = _NearestMean()
    method.fit([[torch.ones(1, 3, 2, 2)]])
    directory = save_artifact(tmp_path / "mean", method, model_spec, threshold=0.5, categories=["a"])
    tensors = directory / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-4])
    with pytest.raises(ArtifactError, match=rf"{re.escape(str(tensors))}: sha256 does not match .*truncated"):
        load_artifact(directory)


def test_missing_file_config_and_schema_are_refused(model_copy: Path, tmp_path: Path) -> None:
    config_path = model_copy / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["schema_version"] = SCHEMA_VERSION + 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=rf"schema version {SCHEMA_VERSION + 1} is not supported"):
        load_artifact(model_copy)
    config_path.write_text("{not json")
    with pytest.raises(ArtifactError, match=r"config\.json: not valid JSON"):
        load_artifact(model_copy)
    config_path.unlink()
    with pytest.raises(ArtifactError, match=rf"{re.escape(str(model_copy))}: not a reconray model"):
        load_artifact(model_copy)
    with pytest.raises(ArtifactError, match="not a reconray model"):
        load_artifact(tmp_path / "nowhere")


def test_a_config_with_a_wrong_field_is_refused_naming_it(model_copy: Path) -> None:
    config_path = model_copy / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["spec"]["image_size"] = "large"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"config\.json: spec\.image_size: Input should be a valid integer"):
        read_config(model_copy)


def test_feature_aggregation_is_part_of_the_spec(model_copy: Path) -> None:
    """An artifact written before aggregation and pool were recorded was fitted with pool-align 3x3 and loads so; a
    recorded setting reaches the scorer's extractor; an unknown one is refused naming the field."""
    config_path = model_copy / CONFIG_FILE
    config = json.loads(config_path.read_text())
    assert (config["spec"]["aggregation"], config["spec"]["pool"]) == ("pool-align", 3)
    del config["spec"]["aggregation"], config["spec"]["pool"]
    config_path.write_text(json.dumps(config))
    assert (read_config(model_copy).spec.aggregation, read_config(model_copy).spec.pool) == ("pool-align", 3)
    config["spec"] |= {"aggregation": "align-pool", "pool": 5}
    config_path.write_text(json.dumps(config))
    extractor = load_artifact(model_copy).scorer().extractor
    assert (extractor.aggregation, extractor.pool) == ("align-pool", 5)
    config["spec"]["aggregation"] = "mean"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"config\.json: spec.*unknown feature aggregation 'mean'"):
        read_config(model_copy)


def test_missing_listed_file_and_unknown_method(model_copy: Path) -> None:
    config = json.loads((model_copy / CONFIG_FILE).read_text())
    (model_copy / "bank.faiss").rename(model_copy / "moved.faiss")
    with pytest.raises(ArtifactError, match=r"bank\.faiss: file listed in config\.json is missing"):
        load_artifact(model_copy)
    (model_copy / "moved.faiss").rename(model_copy / "bank.faiss")
    config["method"] = "nonexistent"
    (model_copy / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"unknown method 'nonexistent'; known: \[.*'patchcore'"):
        load_artifact(model_copy)


def test_set_thresholds_rewrites_only_the_config(model_copy: Path) -> None:
    before = {path.name: path.read_bytes() for path in model_copy.iterdir() if path.name != CONFIG_FILE}
    set_thresholds(model_copy, 3.25, {"nut": 4.5})
    artifact = load_artifact(model_copy)
    assert (artifact.threshold, artifact.config.category_thresholds) == (3.25, {"nut": 4.5})
    set_thresholds(model_copy, None)
    assert load_artifact(model_copy).threshold is None and load_artifact(model_copy).config.category_thresholds == {}
    after = {path.name: path.read_bytes() for path in model_copy.iterdir() if path.name != CONFIG_FILE}
    assert after == before
    assert not list(model_copy.glob(".*"))


def test_threshold_for_a_category() -> None:
    """A category's own threshold, the global one for a category calibrated without images or for no category, and a
    clear error for a category the model was not fitted on."""
    config = ArtifactConfig(method="patchcore", options={}, spec=ModelSpec("b", [1], 64, [0.0] * 3, [1.0] * 3),
                            threshold=2.0, category_thresholds={"nut": 3.0}, categories=["nut", "tile"])
    assert [config.threshold_for(name) for name in ("nut", "tile", None)] == [3.0, 2.0, 2.0]
    with pytest.raises(OptionError, match=r"unknown category 'bolt': the model was fitted on \['nut', 'tile'\]"):
        config.threshold_for("bolt")


def test_loaded_bank_is_the_saved_bank(fitted_model: Path) -> None:
    artifact = load_artifact(fitted_model)
    vectors, size = artifact.method.bank_stats()
    config = read_config(fitted_model)
    assert (vectors, size) == (config.bank_vectors, config.bank_bytes)
    assert size > vectors * 152 * 4


def test_refitting_into_the_same_directory_leaves_no_file_of_the_old_model(
    model_copy: Path, model_spec: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(METHODS, _NearestMean.name, _NearestMean)
    method = _NearestMean()
    method.fit([[torch.ones(1, 3, 2, 2)]])
    save_artifact(model_copy, method, model_spec, threshold=None, categories=["a"])
    assert sorted(path.name for path in model_copy.iterdir()) == [CONFIG_FILE, TENSORS_FILE]
    assert isinstance(load_artifact(model_copy).method, _NearestMean)
