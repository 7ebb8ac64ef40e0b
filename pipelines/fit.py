"""Fit: discover → validate → features in Ray Data → method fit → artifact → threshold calibration.

Bank methods (patchcore, sgfr) condense each feature batch on the workers and gather only candidate vectors on the
driver; rlr trains on Ray Train from features cached once per backbone setting. A slice of the normal training
images never reaches the fit: it calibrates the decision threshold (see `calibration_split`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from reconray.methods import BankMethod, create_method
from reconray.methods.artifact import ModelSpec, save_artifact, set_threshold
from reconray.methods.backbone import DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE, DEFAULT_LEVELS, backbone_normalization
from reconray.pipelines.datasets import Sample, discover, split_samples, validate
from reconray.pipelines.ingest import (
    LEVEL_COLUMN,
    Resources,
    as_tensor,
    feature_dataset,
    level_tensors,
    log_every,
    plan_resources,
    progress,
    score_dataset,
)
from reconray.pipelines.runtime import ensure_ray

CALIBRATION_RATIO = 0.1
"""Share of each category's normal training images held out of the fit to calibrate the threshold."""
THRESHOLD_QUANTILE = 0.99
"""Threshold = this quantile of the held-out normal images' scores: about 1% false alarms on normal parts."""


@dataclasses.dataclass
class FitResult:
    model_dir: Path
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
    weights: str | None = None,
    options: dict[str, Any] | None = None,
    on_bad_image: str = "error",
    resources: Resources | None = None,
    feature_cache: str | Path | None = None,
) -> FitResult:
    """Fits `method_name` on the normal training images of `data` and writes the artifact to `out_dir`.

    `feature_cache` is a folder of backbone-feature caches (see `cached_features`) shared by fits of the same images,
    so fitting several methods extracts the features once. rlr always trains from a cache (`<out_dir>/cache` unless
    given); bank methods use one only when given, else condense features straight from the backbone.
    """
    method = create_method(method_name, **(options or {}))
    train = split_samples(discover(data, categories), "train")
    validation = validate(train, on_bad_image)
    fit_samples, calibration = calibration_split(validation.samples)
    mean, std = backbone_normalization(backbone, weights)
    spec = ModelSpec(backbone, list(levels), image_size, list(mean), list(std), weights)
    ensure_ray()
    resources = resources or plan_resources()
    print(f"[reconray] fit {method_name}: {len(fit_samples)} images, {len(calibration)} held out for the threshold, "
          f"{len(validation.skipped)} skipped", flush=True)
    started = time.perf_counter()
    if isinstance(method, BankMethod):
        if feature_cache:
            features = cached_features(fit_samples, spec, resources, Path(feature_cache))
        else:
            features = feature_dataset(fit_samples, spec, resources)
        _fit_bank(method, features, len(fit_samples), resources)
    else:
        from reconray.pipelines.train_rlr import train_rlr

        features = cached_features(fit_samples, spec, resources, Path(feature_cache or Path(out_dir) / "cache"))
        method = train_rlr(features, method, Path(out_dir).resolve() / "train", name=method_name)
    fit_s = time.perf_counter() - started
    out_dir = save_artifact(
        out_dir,
        method,
        spec,
        threshold=None,
        categories=sorted({sample.category for sample in train}),
        info={"fit_s": fit_s, "n_fit": len(fit_samples), "n_calibration": len(calibration),
              "skipped": validation.skipped},
    )
    threshold = calibrate(out_dir, calibration, resources)
    set_threshold(out_dir, threshold)
    print(f"[reconray] fit {method_name}: done in {fit_s:.1f}s, threshold {threshold}", flush=True)
    return FitResult(out_dir, method_name, fit_s, threshold, len(fit_samples), len(calibration), validation.skipped)


def calibration_split(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Holds out `CALIBRATION_RATIO` of each category's images (at least one when it has two or more).

    The choice is by a hash of the file name, not by order, so it is stable across runs and machines and not
    biased by how files were numbered.
    """
    fit, held_out = [], []
    for category in sorted({sample.category for sample in samples}):
        members = sorted(
            (sample for sample in samples if sample.category == category),
            key=lambda sample: hashlib.sha1(Path(sample.image).name.encode()).hexdigest(),
        )
        count = max(1, round(len(members) * CALIBRATION_RATIO)) if len(members) >= 2 else 0
        held_out += members[:count]
        fit += members[count:]
    return fit, held_out


def calibrate(model_dir: Path, calibration: Sequence[Sample], resources: Resources) -> float | None:
    """Scores the held-out normal images with the saved artifact and returns the threshold (None without any)."""
    if not calibration:
        return None
    scores = np.concatenate(
        [batch["image_score"] for batch in score_dataset(str(model_dir), calibration, resources).iter_batches(
            batch_size=None, batch_format="numpy")]
    )
    return float(np.quantile(scores, THRESHOLD_QUANTILE))


def _fit_bank(method: BankMethod, features: ray.data.Dataset, image_count: int, resources: Resources) -> None:
    """Per-batch condensing of the features runs on the workers; the driver gathers candidates and builds the index."""
    condensed = features.map_batches(
        _condense_batch,
        fn_kwargs={"method_name": method.name, "options": method.options},
        batch_size=resources.batch_size,
        num_cpus=resources.decode_cpus,
    )
    candidates, total_vectors, done = [], 0, 0
    for batch in condensed.iter_batches(batch_size=None, batch_format="numpy"):
        candidates.append(as_tensor(batch["vectors"]))
        total_vectors += int(batch["patch_count"].sum())
        done += int((batch["patch_count"] > 0).sum())
        if done % log_every(image_count) < len(batch["patch_count"]) or done == image_count:
            progress(f"fit {method.name} features", done, image_count)
    method.fit_bank(torch.cat(candidates), total_vectors=total_vectors)


def _condense_batch(batch: dict[str, np.ndarray], method_name: str, options: dict[str, Any]) -> dict[str, np.ndarray]:
    """Embeds one feature batch and keeps its candidate vectors, one row per vector.

    `patch_count` tells the driver how many patches the batch had before condensing: each of the batch's first B rows
    carries one image's patch count, the other rows 0 (Ray Data columns must all have one value per row).
    """
    torch.set_num_threads(1)
    method = create_method(method_name, **options)
    vectors = method.embed(level_tensors(batch))
    candidates = method.condense(vectors).float().numpy()
    images = len(batch[LEVEL_COLUMN.format(0)])
    patch_count = np.zeros(len(candidates), dtype=np.int64)
    patch_count[:images] = len(vectors) // images
    return {"vectors": candidates, "patch_count": patch_count}


def cached_features(
    samples: Sequence[Sample], spec: ModelSpec, resources: Resources, cache_root: Path
) -> ray.data.Dataset:
    """Backbone features of `samples`, extracted once and kept as Parquet shards keyed by backbone setting and files.

    Training methods read these every epoch instead of re-running the frozen backbone; a different backbone, level
    set, image size or file list gets a new key and so a fresh extraction.
    """
    levels = [LEVEL_COLUMN.format(level) for level in range(len(spec.levels))]
    key_source = json.dumps({
        "spec": dataclasses.asdict(spec),
        "columns": levels,
        "images": sorted((sample.image, _mtime(sample.image)) for sample in samples),
    })
    cache_dir = (cache_root / hashlib.sha256(key_source.encode()).hexdigest()[:16]).resolve()
    complete = cache_dir / "COMPLETE"
    if not complete.exists():
        print(f"[reconray] extracting features of {len(samples)} images into {cache_dir}", flush=True)
        feature_dataset(samples, spec, resources).select_columns(levels).write_parquet(str(cache_dir))
        complete.write_text(key_source)
    else:
        print(f"[reconray] reusing cached features in {cache_dir}", flush=True)
    return ray.data.read_parquet(str(cache_dir), file_extensions=["parquet"])


def _mtime(path: str) -> float:
    return Path(path).stat().st_mtime
