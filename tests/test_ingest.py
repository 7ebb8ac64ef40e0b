"""Ray Data ingest: decode/resize/normalize, masks, actor-pool features and scores equal to in-process results."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reconray.methods.artifact import ModelSpec, load_artifact, read_config
from reconray.methods.scoring import calibrated_threshold
from reconray.pipelines import ingest
from reconray.pipelines.datasets import Sample, decode_rgb, discover, load_mask, split_samples
from reconray.pipelines.evaluate import evaluate_model, predict_images
from reconray.pipelines.fit import fit_model
from reconray.pipelines.ingest import (
    Resources,
    feature_dataset,
    image_dataset,
    level_tensors,
    plan_resources,
    preprocess,
    preprocess_mask,
    sample_rows,
    score_dataset,
)
from reconray.pipelines.report import FIGURE_GAP, FIGURE_MIN_PANEL
from reconray.pipelines.validation import calibration_split


def _nut_samples(synthetic_root: Path) -> list[Sample]:
    """Two normal and two defective test images of one category (a defect mask for each defective one)."""
    test = [sample for sample in discover(synthetic_root, ["nut"]) if sample.split == "test"]
    return [sample for sample in test if sample.label == 0][:2] + [sample for sample in test if sample.label == 1][:2]


def _collect(dataset, order: list[Sample]) -> dict[str, np.ndarray]:
    """All rows of a dataset, put back in the order of `order` (Ray Data streams rows in completion order)."""
    batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    rows = {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
    position = {str(image): row for row, image in enumerate(rows["image"])}
    permutation = [position[sample.image] for sample in order]
    return {key: values[permutation] for key, values in rows.items()}


def test_preprocess_resizes_and_normalizes(model_spec: ModelSpec) -> None:
    white = preprocess(np.full((30, 50, 3), 255, np.uint8), model_spec)
    black = preprocess(np.zeros((100, 80, 3), np.uint8), model_spec)
    assert white.shape == black.shape == (3, 64, 64) and white.dtype == torch.float32
    torch.testing.assert_close(white, torch.ones(3, 64, 64))
    torch.testing.assert_close(black, -torch.ones(3, 64, 64))
    ramp = np.repeat(np.linspace(0, 255, 128).astype(np.uint8)[None, :, None], 3, axis=2).repeat(96, axis=0)
    pixels = preprocess(ramp, model_spec)
    assert torch.all(pixels[:, :, 1:] >= pixels[:, :, :-1])
    assert abs(float(pixels.mean())) < 0.02


def test_masks_are_resized_nearest_and_stay_binary(model_spec: ModelSpec) -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:5, 3:7] = True
    upscaled = preprocess_mask(mask, dataclasses.replace(model_spec, image_size=32))
    assert upscaled.dtype == np.uint8 and set(np.unique(upscaled)) == {0, 1}
    assert np.array_equal(upscaled, np.kron(mask, np.ones((4, 4), dtype=np.uint8)))
    odd = np.random.default_rng(0).random((37, 53)) > 0.7
    for size in (16, 64):
        resized = preprocess_mask(odd, dataclasses.replace(model_spec, image_size=size))
        assert resized.shape == (size, size) and set(np.unique(resized)) <= {0, 1}


def test_keep_aspect_fits_the_long_side_and_pads_below_and_right(model_spec: ModelSpec) -> None:
    spec = dataclasses.replace(model_spec, resize="keep-aspect")
    tall = np.full((128, 32, 3), 255, np.uint8)  # 4:1, like an elongated part
    assert spec.content_size(128, 32) == (64, 16) and spec.content_size(30, 90) == (21, 64)
    pixels = preprocess(tall, spec)
    assert pixels.shape == (3, 64, 64)
    torch.testing.assert_close(pixels[:, :, :16], torch.ones(3, 64, 16))  # the image, not squashed
    torch.testing.assert_close(pixels[:, :, 16:], torch.zeros(3, 64, 48))  # padding: the backbone's mean colour
    mask = np.zeros((128, 32), dtype=bool)
    mask[64:, 8:24] = True
    placed = preprocess_mask(mask, spec)
    assert placed.shape == (64, 64) and placed[32:, 4:12].all() and placed.sum() == 32 * 8
    assert dataclasses.replace(model_spec, resize="square").content_size(128, 32) == (64, 64)


def test_plan_resources_fits_every_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Actors on three quarters of each node's CPUs, each small enough for the smallest node: on two 1-CPU nodes
    one 0.75-CPU actor per node (a 1.5-CPU actor would wait forever for a node that holds it)."""
    for nodes in ([2.0], [4.0], [16.0], [1.0, 1.0], [2.0, 8.0]):
        monkeypatch.setattr(ingest.ray, "cluster_resources", lambda nodes=nodes: {"CPU": sum(nodes)})
        monkeypatch.setattr(ingest.ray, "nodes", lambda nodes=nodes: [
            {"Alive": True, "Resources": {"CPU": cpus}} for cpus in nodes] + [{"Alive": False, "Resources": {}}])
        plan = plan_resources()
        assert plan.gpus_per_actor == 0 and plan.actors >= len(nodes), (nodes, plan)
        assert plan.cpus_per_actor <= min(nodes) * 0.75 and plan.decode_cpus <= min(nodes) * 0.25, (nodes, plan)
        assert plan.actors * plan.cpus_per_actor + plan.decode_cpus <= sum(nodes), (nodes, plan)
        assert plan.torch_threads == max(1, round(plan.cpus_per_actor))
    assert (plan_resources().actors, plan_resources().cpus_per_actor) == (5, 1.5)  # 1 on the 2-CPU node, 4 on 8
    monkeypatch.setattr(ingest.ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    plan = plan_resources(batch_size=8)
    assert (plan.actors, plan.gpus_per_actor, plan.batch_size) == (2, 1.0, 8)


def test_rows_carry_samples_without_none() -> None:
    rows = sample_rows([Sample("/a.png", "nut", "train", 0), Sample("/b.png", "nut", "test", 1, "hole", "/m.png")])
    assert rows == [
        {"image": "/a.png", "category": "nut", "split": "train", "label": 0, "defect": "good", "mask": ""},
        {"image": "/b.png", "category": "nut", "split": "test", "label": 1, "defect": "hole", "mask": "/m.png"},
    ]


def test_decode_names_the_file_it_cannot_read(files, model_spec: ModelSpec) -> None:
    bad = files.truncated("bad.png")
    batch = {"image": np.array([str(bad)]), "mask": np.array([""])}
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: cannot decode image"):
        ingest._decode_batch(batch, model_spec, masks=False)


def test_empty_inputs_are_refused(model_spec: ModelSpec) -> None:
    with pytest.raises(ValueError, match="no images to process"):
        image_dataset([], model_spec, Resources(1, 1.0, 0.0, 0.5), masks=False)
    with pytest.raises(ValueError, match=r"no feature columns \(level_0, \.\.\.\) among \['image'\]"):
        level_tensors({"image": np.array(["a.png"])})


def test_feature_actors_match_the_in_process_backbone(
    ray_session, synthetic_root: Path, model_spec: ModelSpec, extractor, pixels
) -> None:
    samples = _nut_samples(synthetic_root)
    rows = _collect(feature_dataset(samples, model_spec, Resources(1, 1.0, 0.0, 0.5, batch_size=3)), samples)
    assert "pixels" not in rows
    assert rows["image"].tolist() == [sample.image for sample in samples]
    expected = extractor(pixels([sample.image for sample in samples]))
    got = level_tensors(rows)
    assert [tuple(level.shape) for level in got] == [(4, 40, 8, 8), (4, 112, 4, 4)]
    for level, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(level, reference, atol=1e-4, rtol=1e-4)


def test_a_pool_of_several_actors_is_up_before_the_first_image_is_decoded(
    ray_session, synthetic_root: Path, model_spec: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two actors and four one-image batches: no decode task starts before both actors are constructed (Ray's task
    records), so decode tasks never hold the CPUs an actor is waiting for. A job of one batch starts one actor and is
    not held up by a plan that would not fit (three 1-CPU actors on the session's 2 CPUs)."""
    from ray.util.state import list_tasks

    monkeypatch.setattr(ingest, "_ACTOR_START_TIMEOUT_S", 20)
    samples = _nut_samples(synthetic_root)
    rows = _collect(feature_dataset(samples[:1], model_spec, Resources(3, 1.0, 0.0, 0.5, batch_size=1)), samples[:1])
    assert rows["image"].tolist() == [samples[0].image]

    began_ms = time.time() * 1000
    rows = _collect(feature_dataset(samples, model_spec, Resources(2, 0.75, 0.0, 0.25, batch_size=1)), samples)
    assert rows["image"].tolist() == [sample.image for sample in samples]
    deadline = time.monotonic() + 30
    while True:  # task records reach the State API a second or so after the tasks end, times in parts
        tasks = [task for task in list_tasks(detail=True, limit=10_000, raise_on_missing_output=False)
                 if (task.creation_time_ms or 0) >= began_ms and task.start_time_ms and task.end_time_ms]
        actors = [task.end_time_ms for task in tasks if "_FeatureActor" in task.func_or_class_name
                  and task.type == "ACTOR_CREATION_TASK"]
        decodes = [task.start_time_ms for task in tasks if "_decode_batch" in task.name]
        if len(actors) == 2 and len(decodes) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(actors) == 2 and decodes, (actors, decodes)
    assert min(decodes) >= max(actors), (actors, decodes)


def test_score_actors_match_the_in_process_scorer(
    ray_session, synthetic_root: Path, fitted_model: Path, model_spec: ModelSpec, pixels
) -> None:
    samples = _nut_samples(synthetic_root)
    resources = Resources(1, 1.0, 0.0, 0.5, batch_size=3)
    rows = _collect(score_dataset(str(fitted_model), samples, resources, masks=True), samples)
    assert "pixels" not in rows
    assert rows["image"].tolist() == [sample.image for sample in samples]
    reference = load_artifact(fitted_model).scorer()(pixels([sample.image for sample in samples]))
    np.testing.assert_allclose(rows["image_score"], reference.image_scores.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows["anomaly_map"], reference.anomaly_maps.numpy(), rtol=1e-5, atol=1e-5)
    assert rows["anomaly_map"].shape == (4, 64, 64) and rows["gt_mask"].shape == (4, 64, 64)
    for row, sample in enumerate(samples):
        expected = preprocess_mask(load_mask(sample.mask), model_spec) if sample.mask else np.zeros((64, 64), np.uint8)
        assert np.array_equal(rows["gt_mask"][row], expected)
    assert rows["gt_mask"][2:].any() and not rows["gt_mask"][:2].any()
    assert np.all(rows["extract_ms"] > 0) and np.all(rows["score_ms"] > 0)


def test_bank_fits_sharing_a_feature_cache_extract_once_and_build_the_same_bank(
    ray_session, synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, pixels
) -> None:
    """`reconray run` fits every method from one feature cache: the bank must equal the one fitted from the backbone.
    The calibration images ride along in the fit's feature pass: the thresholds are what the saved artifact gives.
    A fit does not depend on how Ray Data batched its images (a task retried on a surviving node, another batch
    size): the same sgfr fit from the cache in batches of 3 instead of 16 gives the same basis and threshold."""
    caplog.set_level("INFO", logger="reconray")
    options = {"coreset_ratio": 1.0}
    direct = fit_model(synthetic_root, "patchcore", tmp_path / "direct", categories=["nut"], image_size=64,
                       options=options)
    cache = tmp_path / "cache"
    first = fit_model(synthetic_root, "patchcore", tmp_path / "first", categories=["nut"], image_size=64,
                      options=options, feature_cache=cache)
    second = fit_model(synthetic_root, "sgfr", tmp_path / "second", categories=["nut"], image_size=64,
                       options={"basis_ratio": 0.5}, feature_cache=cache)
    regrouped = fit_model(synthetic_root, "sgfr", tmp_path / "regrouped", categories=["nut"], image_size=64,
                          options={"basis_ratio": 0.5}, feature_cache=cache, resources=plan_resources(batch_size=3))
    log = caplog.text
    assert log.count("extracting features of") == 1 and log.count("reusing cached features") == 2
    assert len(list(cache.iterdir())) == 1
    sgfr_fits = [load_artifact(result.model_dir) for result in (second, regrouped)]
    assert torch.equal(sgfr_fits[0].method.basis, sgfr_fits[1].method.basis)
    assert sgfr_fits[0].threshold == sgfr_fits[1].threshold
    banks = [load_artifact(result.model_dir).method.index for result in (direct, first)]
    vectors = [np.sort(index.reconstruct_n(0, index.ntotal), axis=0) for index in banks]
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=1e-5, atol=1e-5)
    assert load_artifact(second.model_dir).method.bank_stats()[0] == math.ceil(0.5 * vectors[0].shape[0])
    assert "calibrate threshold" not in log  # no second Ray Data pass
    (_, calibration) = calibration_split(split_samples(discover(synthetic_root, ["nut"]), "train"))
    for result in (direct, first, second):
        artifact = load_artifact(result.model_dir)
        scores = artifact.scorer()(pixels([sample.image for sample in calibration])).image_scores.numpy()
        assert artifact.threshold == pytest.approx(calibrated_threshold(scores), rel=1e-5)
        assert artifact.config.category_thresholds["nut"] == pytest.approx(artifact.threshold, rel=1e-12)


def test_keep_aspect_fits_scores_and_measures_the_image_region_only(
    ray_session, tall_root: Path, tall_model: Path, tmp_path: Path
) -> None:
    """An elongated part on a padded canvas: the Ray fit banks its own patches only, as the in-process fit does; the
    score reads its region only; evaluate measures the region and predict's figure has the part's shape."""
    fitted = fit_model(tall_root, "patchcore", tmp_path / "model", image_size=64, resize="keep-aspect",
                       options={"coreset_ratio": 1.0})
    config = read_config(fitted.model_dir)
    assert (config.spec.resize, config.spec.tile) == ("keep-aspect", None)
    assert config.bank_vectors == fitted.n_fit * 8 * 4  # 8 x 8 cells of 8 px; the image fills 4 columns of them
    assert read_config(tall_model).bank_vectors == 10 * 8 * 4
    samples = _nut_samples(tall_root)
    rows = _collect(score_dataset(str(tall_model), samples, Resources(1, 1.0, 0.0, 0.5, batch_size=3), masks=True),
                    samples)
    assert rows["content"].tolist() == [[64, 32]] * 4
    spec = read_config(tall_model).spec
    images = torch.stack([preprocess(decode_rgb(sample.image), spec) for sample in samples])
    reference = load_artifact(tall_model).scorer()(images, content=rows["content"])
    np.testing.assert_allclose(rows["image_score"], reference.image_scores.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows["image_score"], rows["anomaly_map"][:, :, :32].max(axis=(1, 2)), rtol=1e-6)
    assert rows["gt_mask"][:, :, :32].any() and not rows["gt_mask"][:, :, 32:].any()

    metrics = evaluate_model(tall_model, tall_root, tmp_path / "evaluate")
    assert metrics["features"]["resize"] == "keep-aspect" and metrics["categories"]["nut"]["pixel_auroc"] is not None
    prediction = predict_images(tall_model, [samples[-1].image], tmp_path / "predict")[0]
    zoom = -(-FIGURE_MIN_PANEL // 64)
    assert Image.open(prediction["heatmap"]).width == 2 * (32 * zoom + FIGURE_GAP) + FIGURE_GAP  # input | overlay
