"""Object storage: datasets, artifacts and outputs on a real S3-compatible server (moto's) on loopback, real HTTP."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import FileBuilder, upload_tree

from reconray.methods.errors import ArtifactError, DatasetError
from reconray.pipelines.cli import main
from reconray.pipelines.datasets import decode_rgb, discover, load_mask, validate
from reconray.pipelines.evaluate import predict_images
from reconray.pipelines.storage import local_model, staged_output


def _s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def _relative(samples: list, root: str) -> list[tuple]:
    """Samples with their image and mask named relative to the dataset root, to compare a folder with a bucket."""
    def rel(location: str | None) -> str | None:
        return None if location is None else Path(str(location).removeprefix(root)).as_posix().lstrip("/")

    return sorted((rel(sample.image), sample.category, sample.split, sample.label, sample.defect, rel(sample.mask))
                  for sample in samples)


def test_a_bucket_prefix_is_discovered_and_decoded_like_the_folder(synthetic_root: Path, files: FileBuilder,
                                                                    bucket: str) -> None:
    """MVTec layout, split CSV, plain folder and MVTec 3D (root and category), each under a bucket prefix: the same
    samples as on disk, the same pixels and masks, and the validation pass reads every object."""
    uri = upload_tree(synthetic_root, f"{bucket}/synthetic")
    assert _relative(discover(uri), uri) == _relative(discover(synthetic_root), str(synthetic_root))
    samples = discover(uri, ["nut"])
    defective = next(sample for sample in samples if sample.label == 1)
    local = synthetic_root / defective.image.removeprefix(f"{uri}/")
    assert np.array_equal(decode_rgb(defective.image), decode_rgb(local))
    assert np.array_equal(load_mask(defective.mask), load_mask(synthetic_root / defective.mask.removeprefix(f"{uri}/")))
    checked = validate(samples)
    assert len(checked.samples) == len(samples) and not checked.skipped

    table = files.root / "table"
    files.image(table / "img" / "a.png"), files.image(table / "img" / "b.png", seed=1)
    files.mask(table / "masks" / "b.png")
    with (table / "split.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["object", "split", "label", "image", "mask"],
                                      ["part", "train", "normal", "img/a.png", ""],
                                      ["part", "test", "anomaly", "img/b.png", "masks/b.png"]])
    csv_uri = upload_tree(table, f"{bucket}/table")
    found = discover(f"{csv_uri}/split.csv")
    assert [(sample.image, sample.split, sample.mask) for sample in found] == [
        (f"{csv_uri}/img/a.png", "train", None), (f"{csv_uri}/img/b.png", "test", f"{csv_uri}/masks/b.png")]
    assert len(validate(found).samples) == 2
    folder = discover(f"{csv_uri}/img")
    assert [(sample.image, sample.category, sample.split) for sample in folder] == [
        (f"{csv_uri}/img/a.png", "img", "train"), (f"{csv_uri}/img/b.png", "img", "train")]

    mvtec3d = files.mvtec3d("mvtec3d", categories=("bagel", "cookie"))
    mvtec3d_uri = upload_tree(mvtec3d, f"{bucket}/mvtec3d")
    assert _relative(discover(mvtec3d_uri), mvtec3d_uri) == _relative(discover(mvtec3d), str(mvtec3d))
    assert _relative(discover(f"{mvtec3d_uri}/cookie"), mvtec3d_uri) == _relative(discover(mvtec3d / "cookie"),
                                                                                   str(mvtec3d))


def test_missing_bucket_missing_credentials_and_truncated_objects_name_the_uri(
    files: FileBuilder, fitted_model: Path, bucket: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(DatasetError, match=r"s3://no-such-bucket-x/data: not found \(bucket 'no-such-bucket-x' does "):
        discover("s3://no-such-bucket-x/data")
    assert main(["fit", "--data", f"{bucket}/nothing-here", "--method", "patchcore", "--out", f"{bucket}/m"]) == 2
    assert f"{bucket}/nothing-here: not found" in capsys.readouterr().err

    root = files.mvtec("broken", categories=("part",), train=3)
    files.truncated(root / "part" / "train" / "good" / "001.png")
    uri = upload_tree(root, f"{bucket}/broken")
    with pytest.raises(DatasetError, match=rf"{uri}/part/train/good/001\.png: unreadable image"):
        validate(discover(uri))

    model = upload_tree(fitted_model, f"{bucket}/model")
    tensors = next(key for key in _s3().find(model) if not key.endswith("config.json"))
    _s3().pipe_file(tensors, _s3().cat_file(tensors)[:100])  # an interrupted upload
    with pytest.raises(ArtifactError, match=rf"{model}/\S+: sha256 does not match"):
        local_model(model)

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(DatasetError, match=rf"{uri}: no credentials for object storage"):
            discover(uri)
        assert main(["evaluate", "--model", model, "--data", uri, "--out", f"{bucket}/eval"]) == 2
        assert f"{model}: no credentials for object storage" in capsys.readouterr().err
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_evaluate_and_predict_read_and_write_a_bucket(ray_session: None, fitted_model: Path, synthetic_root: Path,
                                                     bucket: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The model, the test images, the metrics, report and heatmaps all live in the bucket (a fit writing there runs
    in tests/test_cluster.py); the artifact fetched back scores the local copies of the test images exactly as
    evaluate scored the objects."""
    data = upload_tree(synthetic_root, f"{bucket}/synthetic")
    model, evaluation = upload_tree(fitted_model, f"{bucket}/models/patchcore"), f"{bucket}/evaluation"
    assert main(["evaluate", "--model", model, "--data", data, "--categories", "nut", "--out", evaluation]) == 0, \
        capsys.readouterr().err
    stored = {key.removeprefix(f"{bucket.removeprefix('s3://')}/") for key in _s3().find(bucket)}
    assert {"evaluation/metrics.json", "evaluation/report.md", "evaluation/scores.json"} <= stored
    assert any(key.startswith("evaluation/heatmaps/nut/") for key in stored)
    metrics = json.loads(_s3().cat_file(f"{evaluation}/metrics.json"))
    assert metrics["categories"]["nut"]["n_images"] == 8 and metrics["mean"]["image_auroc"] > 0.5

    scored = {"/".join(entry["image"].split("/")[-2:]): entry["score"]
              for entry in json.loads(_s3().cat_file(f"{evaluation}/scores.json"))["nut"]}
    images = sorted((synthetic_root / "nut" / "test").glob("*/*.png"))
    listing = tmp_path / "images.csv"
    listing.write_text("image\n" + "".join(f"{path}\n" for path in images))  # a CSV list, absolute paths
    written = predict_images(local_model(model), [listing], tmp_path / "predict", output="parquet",
                             heatmaps="anomalous")
    table = pq.read_table(written.path).to_pylist()
    assert written.count == len(table) == len(images)
    assert sorted(row["index"] for row in table) == list(range(len(images)))
    assert {"/".join(Path(row["image"]).parts[-2:]): row["score"] for row in table} == pytest.approx(scored,
                                                                                                   rel=1e-5, abs=1e-5)
    flagged = [row for row in table if row["is_anomalous"]]
    assert flagged, table  # the defective images are above the calibrated threshold
    assert written.anomalous == len(flagged) and all(Path(row["heatmap"]).is_file() for row in flagged)
    assert all(row["heatmap"] is None for row in table if not row["is_anomalous"])


def test_gs_uris_take_the_same_discovery_reads_model_fetch_and_uploads(gcs_server: str, synthetic_root: Path,
                                                                      fitted_model: Path, tmp_path: Path) -> None:
    """gs:// on a loopback GCS emulator, through the functions every command and Ray worker uses for a URI: the same
    samples and pixels as on disk, a model fetched and hash-checked, outputs uploaded, a missing bucket named."""
    import fsspec

    gcs = fsspec.filesystem("gs", skip_instance_cache=True)
    gcs.mkdir("factory")
    for path in sorted((synthetic_root / "nut").rglob("*")):
        if path.is_file():
            gcs.put_file(str(path), f"factory/data/nut/{path.relative_to(synthetic_root / 'nut').as_posix()}")
    gcs.put(str(fitted_model), "factory/models/nut", recursive=True)
    uri = "gs://factory/data"
    assert _relative(discover(uri), uri) == _relative(discover(synthetic_root, ["nut"]), str(synthetic_root))
    defective = next(sample for sample in discover(uri) if sample.label == 1)
    assert np.array_equal(decode_rgb(defective.image), decode_rgb(synthetic_root / defective.image.removeprefix(
        f"{uri}/")))
    assert len(validate(discover(uri)).samples) == len(discover(uri))
    fetched = local_model("gs://factory/models/nut")
    assert (fetched / "config.json").read_bytes() == (fitted_model / "config.json").read_bytes()
    with staged_output("gs://factory/runs/nut") as local:
        (local / "metrics.json").write_text("{}")
    assert gcs.cat_file("factory/runs/nut/metrics.json") == b"{}"
    with pytest.raises(DatasetError, match=r"gs://nowhere/data: not found \(bucket 'nowhere' does not exist\)"):
        discover("gs://nowhere/data")
