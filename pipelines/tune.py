"""`reconray tune`: hyperparameter sweeps on Ray Tune, scored on the validation split, never on the test split.

The driver carves each category's normal training images (`validation.carve`: fit, calibration, validation), paints
synthetic anomalies on half of the validation images, and extracts the backbone features of those three sets once
per feature setting; they go to the object store, so every trial reads the same arrays instead of re-running the
backbone. A trial builds the method with its options, fits it in its own process (the methods' in-process `fit`),
scores the validation features through `methods.scoring.score_features` (the scoring path every entry point uses)
and reports the validation metrics with `ray.tune.report`. The sweep itself is a `Tuner` whose run lives under
`<out>/sweep`, so rerunning the same command resumes it and finished trials are not run again.

Example:
    >>> summary = tune_method("data/", "sgfr", "runs/tune-sgfr", space=PRESETS["sgfr"], num_samples=16)
    >>> summary.best_options, summary.best_objective
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import yaml
from ray import tune

from reconray.methods import METHODS, create_method
from reconray.methods.artifact import ModelSpec
from reconray.methods.backbone import DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE, DEFAULT_LEVELS, backbone_normalization
from reconray.methods.errors import OptionError
from reconray.methods.metrics import compute_metrics, mean_metrics
from reconray.methods.scoring import score_features
from reconray.pipelines.console import stage
from reconray.pipelines.datasets import Sample, discover, split_samples, validate
from reconray.pipelines.fit import THRESHOLD_QUANTILE, fit_model
from reconray.pipelines.ingest import Resources, feature_dataset, level_tensors, plan_resources
from reconray.pipelines.runtime import ensure_ray
from reconray.pipelines.validation import carve, paint_validation_set, write_split_csv

logger = logging.getLogger(__name__)

OBJECTIVES = ("mean_auroc", "image_auroc", "pixel_auroc", "aupro")
"""What a sweep maximises on the validation split; `mean_auroc` is the mean of image and pixel AUROC."""
SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
FEATURE_KEYS = ("levels", "image_size")
"""Space keys that change the features rather than the method: features are extracted once per distinct value."""

PRESETS: dict[str, dict[str, Any]] = {
    "patchcore": {
        "coreset_ratio": {"choice": [0.01, 0.05, 0.1, 0.25, 1.0]},
        "nprobe": {"choice": [4, 8, 16, 32]},
    },
    "sgfr": {
        "k": {"choice": [4, 8, 16, 32]},
        "lam": {"loguniform": [0.001, 0.1]},
        "tau": {"choice": [0.0, 0.5]},
        "basis_ratio": {"choice": [0.05, 0.1, 0.2]},
        "search_dims": {"choice": [0, 16, 32, 64]},
        "nprobe": {"choice": [2, 4, 8, 16]},
        "sampling": {"choice": ["sparse", "coreset", "random"]},
    },
}
"""Documented default search spaces per method: the options the method's notes name as the levers of quality and
cost, over ranges around the defaults (`--preset NAME`)."""


@dataclasses.dataclass
class SweepSummary:
    """What a finished sweep found: one row per trial, and the best setting on the validation objective."""

    trials: list[dict[str, Any]]
    best_options: dict[str, Any]
    best_features: dict[str, Any]
    best_objective: float
    out_dir: Path


def load_space(path: str | Path) -> dict[str, Any]:
    """Reads a YAML search space: `key: value` (fixed) or `key: {kind: [...]}` with a kind of `SPACE_KINDS`."""
    path = Path(path)
    try:
        space = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise OptionError(f"{path}: cannot read the search space ({error})") from error
    if not isinstance(space, dict) or not space:
        raise OptionError(f"{path}: a search space is a non-empty mapping of option names to values or ranges")
    return space


def check_space(method: str, space: dict[str, Any]) -> None:
    """Refuses, before any trial runs, an unknown parameter, an unknown range kind, an empty range or a value the
    method's options reject, naming the key."""
    if method not in METHODS:
        raise OptionError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    options = METHODS[method].Options.model_fields
    for key, spec in space.items():
        if key not in options and key not in FEATURE_KEYS:
            raise OptionError(f"search space key {key!r} is not an option of {method} (options: {sorted(options)}; "
                              f"feature settings: {list(FEATURE_KEYS)})")
        for value in _candidate_values(key, spec):
            if key in options:
                create_method(method, **{key: value})
            elif key == "image_size" and not (isinstance(value, int) and value >= 32):
                raise OptionError(f"search space key 'image_size': {value!r} is not an image side >= 32")


def _candidate_values(key: str, spec: Any) -> list[Any]:
    """The values a space entry can take, or its bounds for continuous ranges (checked like values)."""
    if not isinstance(spec, dict):
        return [spec]
    if len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
        raise OptionError(f"search space key {key!r}: expected one of {list(SPACE_KINDS)}, got {sorted(spec)}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise OptionError(f"search space key {key!r}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("choice", "grid"):
        return values
    if len(values) != 2 or not all(isinstance(bound, int | float) for bound in values) or values[0] >= values[1]:
        raise OptionError(f"search space key {key!r}: {kind} needs [low, high] numbers with low < high, got {values}")
    if kind == "loguniform" and values[0] <= 0:
        raise OptionError(f"search space key {key!r}: loguniform needs a positive low bound, got {values[0]}")
    return [values[0], values[1] - 1] if kind == "randint" else values


def tune_param_space(space: dict[str, Any]) -> dict[str, Any]:
    """The space as Ray Tune sampling objects."""
    samplers = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda bounds: tune.uniform(*bounds),
                "loguniform": lambda bounds: tune.loguniform(*bounds), "randint": lambda bounds: tune.randint(*bounds)}
    converted = {}
    for key, spec in space.items():
        if isinstance(spec, dict):
            kind, values = next(iter(spec.items()))
            converted[key] = samplers[kind](values)
        else:
            converted[key] = spec
    return converted


def tune_method(
    data: str | Path,
    method: str,
    out_dir: str | Path,
    *,
    space: dict[str, Any],
    num_samples: int = 16,
    max_concurrent: int | None = None,
    objective: str = "mean_auroc",
    time_budget_s: float | None = None,
    trial_cpus: float = 1.0,
    trial_gpus: float = 0.0,
    categories: Sequence[str] | None = None,
    backbone: str = DEFAULT_BACKBONE,
    levels: Sequence[int] = DEFAULT_LEVELS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    resources: Resources | None = None,
) -> SweepSummary:
    """Sweeps `method`'s options over `space` on the validation split of `data`'s training images.

    Writes `<out_dir>/results.csv`, `results.md`, `best.yaml`, `best/` (the best setting fitted on the same fit
    images, with its threshold) and `validation/split.csv` (the validation split, for `reconray evaluate`); rerunning
    with the same `out_dir` resumes the sweep.
    """
    if objective not in OBJECTIVES:
        raise OptionError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
    if num_samples < 1 or trial_cpus <= 0 or trial_gpus < 0:
        raise OptionError(f"num_samples must be >= 1 and trial_cpus > 0, got {num_samples} and {trial_cpus}")
    check_space(method, space)
    out_dir = Path(out_dir).resolve()
    train = validate(split_samples(discover(data, categories), "train")).samples  # the test split is never opened
    carving = carve(train)
    painted = paint_validation_set(carving.validation, out_dir / "validation", seed=seed)
    write_split_csv(painted, out_dir / "validation" / "split.csv")
    ensure_ray()
    resources = resources or plan_resources()
    specs = _feature_specs(space, backbone, list(levels), image_size)
    logger.info("tune %s: %d fit, %d calibration and %d validation images (%d painted), %d feature setting(s)",
                method, len(carving.fit), len(carving.calibration), len(painted),
                sum(sample.label for sample in painted), len(specs))
    features = {key: _extract(spec, carving.fit, carving.calibration, painted, resources)
                for key, spec in specs.items()}
    trainable = tune.with_resources(
        tune.with_parameters(_trial, method=method, features=features, default_key=_spec_key(levels, image_size)),
        {"cpu": trial_cpus, "gpu": trial_gpus},
    )
    sweep_dir = out_dir / "sweep"
    if tune.Tuner.can_restore(str(sweep_dir)):
        logger.info("resuming the sweep in %s: finished trials are kept", sweep_dir)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_param_space(space),
            tune_config=tune.TuneConfig(metric=objective, mode="max", num_samples=num_samples,
                                        max_concurrent_trials=max_concurrent, time_budget_s=time_budget_s),
            run_config=tune.RunConfig(name=sweep_dir.name, storage_path=str(out_dir),
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    started = time.perf_counter()
    results = tuner.fit()
    trials = [_trial_row(result, objective) for result in results]
    summary = _summarize(trials, objective, method, out_dir)
    best_features = {key: summary.best_features.get(key, default) for key, default in
                     (("levels", list(levels)), ("image_size", image_size))}
    fit_model(data, method, out_dir / "best", categories=categories, backbone=backbone, options=summary.best_options,
              exclude=[sample.image for sample in carving.validation], resources=resources, **best_features)
    logger.info("tune %s: %d trials (%d failed) in %.0f s; best %s %s", method, len(trials),
                sum(row["status"] == "error" for row in trials), time.perf_counter() - started, objective,
                f"{summary.best_objective:.4f}")
    return summary


def _spec_key(levels: Sequence[int], image_size: int) -> str:
    return f"levels={','.join(map(str, levels))};image_size={image_size}"


def _feature_specs(space: dict[str, Any], backbone: str, levels: list[int], image_size: int) -> dict[str, ModelSpec]:
    """One `ModelSpec` per distinct (levels, image size) the space can ask for."""
    level_values = _candidate_values("levels", space["levels"]) if "levels" in space else [levels]
    size_values = _candidate_values("image_size", space["image_size"]) if "image_size" in space else [image_size]
    mean, std = backbone_normalization(backbone)
    return {_spec_key(level_set, size): ModelSpec(backbone, list(level_set), size, list(mean), list(std))
            for level_set in level_values for size in size_values}


def _extract(spec: ModelSpec, fit: Sequence[Sample], calibration: Sequence[Sample], validation: Sequence[Sample],
             resources: Resources) -> dict[str, Any]:
    """Backbone features of the three sets, once, as object-store references the trials share."""
    extracted = {}
    for name, samples in (("fit", fit), ("calibration", calibration), ("validation", validation)):
        batches = []
        with stage(f"tune: features of the {name} images", total=len(samples)) as advance:
            rows = feature_dataset(samples, spec, resources, masks=name == "validation")
            for batch in rows.iter_batches(batch_size=resources.batch_size, batch_format="numpy"):
                kept = {key: value for key, value in batch.items() if key.startswith("level_") or key in
                        ("category", "label", "gt_mask")}
                batches.append(kept)
                advance(len(batch["image"]))
        extracted[name] = ray.put(batches)
    extracted["image_size"] = spec.image_size
    return extracted


def _trial(config: dict[str, Any], method: str, features: dict[str, Any], default_key: str) -> None:
    """One trial: fit the method on the cached fit features, calibrate, score the validation split, report."""
    torch.set_num_threads(max(1, math.floor(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))))
    options = {key: value for key, value in config.items() if key not in FEATURE_KEYS}
    key = _spec_key(config.get("levels", []), config.get("image_size", 0)) if set(config) & set(FEATURE_KEYS) else None
    data = features[key or default_key]
    size = (data["image_size"], data["image_size"])
    model = create_method(method, **options)
    started = time.perf_counter()
    model.fit([level_tensors(batch) for batch in ray.get(data["fit"])])
    fitted = time.perf_counter()
    calibration = [score_features(model, level_tensors(batch), size)[0] for batch in ray.get(data["calibration"])]
    threshold = float(np.quantile(torch.cat(calibration).numpy(), THRESHOLD_QUANTILE)) if calibration else None
    per_category: dict[str, dict[str, list]] = {}
    for batch in ray.get(data["validation"]):
        scores, maps, _ = score_features(model, level_tensors(batch), size)
        for row, category in enumerate(batch["category"]):
            entry = per_category.setdefault(str(category), {"labels": [], "scores": [], "masks": [], "maps": []})
            entry["labels"].append(int(batch["label"][row]))
            entry["scores"].append(float(scores[row]))
            entry["masks"].append(np.asarray(batch["gt_mask"][row], dtype=bool))
            entry["maps"].append(maps[row].numpy())
    metrics = mean_metrics({category: compute_metrics(np.array(entry["labels"]), np.array(entry["scores"]),
                                                       np.stack(entry["masks"]), np.stack(entry["maps"]))
                            for category, entry in per_category.items()})
    image_auroc, pixel_auroc = metrics["image_auroc"], metrics["pixel_auroc"]
    tune.report({
        "mean_auroc": None if image_auroc is None or pixel_auroc is None else (image_auroc + pixel_auroc) / 2,
        **{name: metrics[name] for name in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")},
        "threshold": threshold,
        "fit_s": fitted - started,
        "score_s": time.perf_counter() - fitted,
    })


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "/")


def _trial_row(result: Any, objective: str) -> dict[str, Any]:
    """One trial as a flat row: its options, its validation metrics, timings and status (error text if it failed)."""
    metrics = result.metrics or {}
    row = {key: value for key, value in (result.config or {}).items()}
    row |= {name: metrics.get(name) for name in (*OBJECTIVES, "pixel_ap", "threshold", "fit_s", "score_s")}
    row["status"] = "error" if result.error else "ok"
    row["error"] = str(result.error).strip().splitlines()[-1] if result.error else ""
    row["objective"] = metrics.get(objective)
    return row


def _summarize(trials: list[dict[str, Any]], objective: str, method: str, out_dir: Path) -> SweepSummary:
    """Writes results.csv, results.md and best.yaml; refuses a sweep in which every trial failed."""
    columns = list(dict.fromkeys(key for row in trials for key in row))
    with (out_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(trials)
    lines = [f"# reconray tune: {method}, objective {objective} on the validation split", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in trials]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    finished = [row for row in trials if row["status"] == "ok" and row["objective"] is not None]
    if not finished:
        errors = sorted({row["error"] for row in trials})
        raise OptionError(f"every one of the {len(trials)} trials failed; errors: {errors}; see "
                          f"{out_dir / 'results.md'}")
    best = max(finished, key=lambda row: row["objective"])
    options = {key: best[key] for key in METHODS[method].Options.model_fields if key in best}
    features = {key: best[key] for key in FEATURE_KEYS if key in best}
    (out_dir / "best.yaml").write_text(yaml.safe_dump({"method": method, "options": options, **features,
                                                       objective: float(best["objective"])}, sort_keys=False))
    return SweepSummary(trials, options, features, float(best["objective"]), out_dir)
