"""Fit: discover → validate → distributed fit of the method → artifact → threshold calibration.

How a method is fitted on Ray is its own registered hook (`reconray.pipelines.fitting`): bank methods condense feature
batches on the workers, rlr trains on Ray Train. A slice of the normal training images never reaches the fit: it
calibrates the decision threshold (see `calibration_split`); a method that chooses its training state on a validation
split (rlr's checkpoint) also gets one, carved and painted by `reconray.pipelines.validation`. Training byproducts
(feature cache, checkpoints, the log) go to a work directory beside the artifact, never into it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reconray.methods import create_method
from reconray.methods.artifact import ArtifactConfig, FitRecord, ModelSpec, load_artifact, save_artifact, set_thresholds
from reconray.methods.backbone import (
    DEFAULT_AGGREGATION,
    DEFAULT_BACKBONE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_LEVELS,
    DEFAULT_POOL,
    DEFAULT_RESIZE,
    backbone_normalization,
    check_aggregation,
    check_geometry,
)
from reconray.methods.errors import DatasetError, OptionError
from reconray.methods.extended import ExtendedBank, check_extensible
from reconray.methods.scoring import calibrated_threshold, category_thresholds
from reconray.pipelines.console import stage
from reconray.pipelines.datasets import Sample, discover, split_samples, validate
from reconray.pipelines.fitting import FitContext, TrainConfig, distributed_fit, work_dir_for
from reconray.pipelines.ingest import Resources, plan_resources, score_dataset
from reconray.pipelines.runtime import ensure_ray
from reconray.pipelines.storage import as_location, is_uri, local_model, staged_output, upload
from reconray.pipelines.validation import calibration_split, carve, paint_validation_split

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FitResult:
    model_dir: str | Path
    method: str
    fit_s: float
    threshold: float | None
    n_fit: int
    n_calibration: int
    skipped: list[dict[str, str]]


def fit_model(
    data: str | Path,
    method_name: str,
    out_dir: str | Path,
    *,
    categories: Sequence[str] | None = None,
    backbone: str = DEFAULT_BACKBONE,
    levels: Sequence[int] = DEFAULT_LEVELS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    aggregation: str = DEFAULT_AGGREGATION,
    pool: int = DEFAULT_POOL,
    resize: str = DEFAULT_RESIZE,
    tile: int | None = None,
    weights: str | None = None,
    options: dict[str, Any] | None = None,
    training: TrainConfig | None = None,
    work_dir: str | Path | None = None,
    on_bad_image: str = "error",
    resources: Resources | None = None,
    feature_cache: str | Path | None = None,
    exclude: Collection[str] = (),
    add_to: str | Path | None = None,
) -> FitResult:
    """Fits `method_name` on the normal training images of `data` and writes the artifact to `out_dir`.

    Options and feature settings are validated first (`--set index=foo` fails before any image is read). `work_dir`
    (default: `<out>-work` beside the artifact) holds training byproducts; `feature_cache` is a folder of
    backbone-feature caches shared by fits of the same images, so fitting several methods extracts the features once.
    `exclude` names training images kept out of the fit (a validation split, `validation.carve`); the calibration
    images do not depend on it.

    `add_to` names a bank-method artifact to extend with the categories of `data` (see `methods.extended`): the
    method, its options and the feature spec are the artifact's (`method_name`, `options` and the feature settings
    are then ignored), the existing categories keep their parts and thresholds, and `out_dir` gets the new model.
    """
    base = load_artifact(local_model(add_to)) if add_to is not None else None  # hash-checked before the fit
    if base is not None:
        check_extensible(base.method)
        method_name, spec = base.config.method, base.spec
        method = create_method(method_name, **base.config.options)
    else:
        method = create_method(method_name, **(options or {}))
        check_aggregation(aggregation, pool)
        check_geometry(image_size, resize, tile)
        mean, std = backbone_normalization(backbone, weights)
        spec = ModelSpec(backbone, list(levels), image_size, list(mean), list(std), weights, aggregation, pool, resize,
                         tile)
    out_dir = out_dir if is_uri(out_dir) else Path(out_dir)
    work_dir = as_location(work_dir) if work_dir else work_dir_for(out_dir)
    began = time.perf_counter()
    train = split_samples(discover(data, categories), "train")
    new_categories = sorted({sample.category for sample in train})
    if base is not None and set(new_categories) & set(base.categories):
        raise OptionError(f"--add-to {add_to}: categories {sorted(set(new_categories) & set(base.categories))} of "
                          f"{data} are already in the model; --add-to adds new categories (use --categories to pick "
                          "them), refit the model to change existing ones")
    validation = validate(train, on_bad_image)
    if method.selects_on_validation:
        fit_samples, calibration, selection = _selection_split(method_name, validation.samples, work_dir)
    else:
        (fit_samples, calibration), selection = calibration_split(validation.samples), []
    excluded = {str(as_location(image)) for image in exclude}
    fit_samples = [sample for sample in fit_samples if str(as_location(sample.image)) not in excluded]
    stages = {"validate": time.perf_counter() - began}
    ensure_ray()
    resources = resources or plan_resources()
    stages["ray_start"] = time.perf_counter() - began - stages["validate"]
    logger.info("fit %s: %d images, %d held out for the threshold%s, %d skipped", method_name, len(fit_samples),
                len(calibration), f", {len(selection)} to validate on" if selection else "", len(validation.skipped))
    context = FitContext(
        samples=fit_samples,
        spec=spec,
        resources=resources,
        work_dir=work_dir,
        training=training or TrainConfig(),
        feature_cache=as_location(feature_cache) if feature_cache else None,
        validation=selection,
        calibration=calibration,
    )
    started = time.perf_counter()
    method = distributed_fit(method, context)
    fit_s = time.perf_counter() - started
    stages |= context.stage_s
    record = FitRecord(fit_s=fit_s, n_fit=len(fit_samples), n_calibration=len(calibration), skipped=validation.skipped,
                       extends=base.sha256 if base is not None else None)
    fitted_categories = new_categories
    if base is not None:
        method = ExtendedBank.extending(base.method, base.categories, method, new_categories)
        fitted_categories = sorted([*base.categories, *new_categories])
    with staged_output(out_dir) as local_out:
        save_artifact(local_out, method, spec, threshold=None, categories=fitted_categories, fit=record)
        if is_uri(out_dir) and context.calibration_scores is None:
            upload(local_out, out_dir)  # the actors that calibrate it fetch it from there, on whichever node
        threshold, per_category = calibrate(out_dir, calibration, resources, context.calibration_scores)
        if base is not None:
            threshold, per_category = _extended_thresholds(base.config, threshold, per_category)
        stages["save_calibrate"] = time.perf_counter() - started - fit_s
        set_thresholds(local_out, threshold, per_category, fit=record.model_copy(update={"stages": stages}))
    logger.info("fit %s: stages %s", method_name,
                ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stages.items()))
    logger.info("fit %s: done in %.1f s, threshold %s%s, model in %s", method_name, fit_s,
                "none" if threshold is None else f"{threshold:.4g}",
                "".join(f", {name} {value:.4g}" for name, value in per_category.items()) if len(per_category) > 1
                else "", out_dir)
    return FitResult(out_dir, method_name, fit_s, threshold, len(fit_samples), len(calibration), validation.skipped)


def _extended_thresholds(
    base: ArtifactConfig, threshold: float | None, per_category: dict[str, float]
) -> tuple[float | None, dict[str, float]]:
    """Thresholds of an extended model: every existing category keeps the one it decided with (its own, else the old
    global one), the new ones get theirs; the global threshold, for images of no named category, is the higher of
    the old and the new global ones, since such an image is scored by every part (fewer false alarms, not more)."""
    kept = {category: base.threshold_for(category) for category in base.categories}
    merged = {category: value for category, value in kept.items() if value is not None} | per_category
    candidates = [value for value in (base.threshold, threshold) if value is not None]
    return (max(candidates) if candidates else None), merged


def _selection_split(
    method_name: str, samples: Sequence[Sample], work_dir: Any
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Fit, calibration and painted validation images for a method that chooses its training state on a validation
    split (`validation.carve`: the calibration images are the ones `calibration_split` holds out)."""
    try:
        carving = carve(samples)
    except DatasetError as error:
        raise DatasetError(f"{error}; {method_name} keeps the checkpoint that scores best on a validation split of "
                           "the training images: --set select=last trains on every image instead") from error
    return carving.fit, carving.calibration, paint_validation_split(carving.validation, work_dir / "validation")


def calibrate(
    model_dir: str | Path, calibration: Sequence[Sample], resources: Resources, scores: np.ndarray | None = None
) -> tuple[float | None, dict[str, float]]:
    """The global threshold (None without any held-out image) and one threshold per category that held images out,
    from the held-out normal images' `scores` when the fit scored them in its own pass, else scored here with the
    saved artifact."""
    if not calibration:
        return None, {}
    if scores is not None:
        return calibrated_threshold(scores), category_thresholds(scores, [sample.category for sample in calibration])
    scores, categories = [], []
    with stage("calibrate threshold", total=len(calibration)) as advance:
        for batch in score_dataset(str(model_dir), calibration, resources).iter_batches(batch_size=None,
                                                                                        batch_format="numpy"):
            scores.append(batch["image_score"])
            categories += [str(name) for name in batch["category"]]
            advance(len(batch["image_score"]))
    scores = np.concatenate(scores)
    return calibrated_threshold(scores), category_thresholds(scores, categories)
