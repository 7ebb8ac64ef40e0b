"""`reconray tune`: hyperparameter sweeps on Ray Tune, scored on the validation split, never on the test split.

The driver carves each category's normal training images (`validation.carve`: fit, calibration, validation), paints a
synthetic anomaly on a copy of every validation image, and extracts the backbone features of those three sets once
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
import itertools
import json
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
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from scipy import stats

from reconray.methods import METHODS, create_method
from reconray.methods.artifact import ModelSpec
from reconray.methods.backbone import (
    AGGREGATIONS,
    DEFAULT_AGGREGATION,
    DEFAULT_BACKBONE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_LEVELS,
    DEFAULT_POOL,
    DEFAULT_RESIZE,
    RESIZES,
    backbone_normalization,
    check_geometry,
)
from reconray.methods.errors import OptionError
from reconray.methods.rlr import RLR
from reconray.methods.scoring import calibrated_threshold, content_mask, score_features
from reconray.pipelines.datasets import Sample, discover, split_samples, validate
from reconray.pipelines.fit import fit_model
from reconray.pipelines.fitting import FitContext, TrainConfig
from reconray.pipelines.ingest import Resources, feature_batches, level_tensors, plan_resources
from reconray.pipelines.report import plot_grid, scatter_plot
from reconray.pipelines.runtime import ensure_ray
from reconray.pipelines.storage import as_location, staged_output
from reconray.pipelines.train_rlr import ValidationFeatures, train_rlr
from reconray.pipelines.validation import (
    VALIDATION_METRICS,
    Carving,
    carve,
    paint_validation_split,
    validation_metrics,
)

logger = logging.getLogger(__name__)

OBJECTIVES = ("mean_auroc", "image_auroc", "pixel_auroc", "aupro")
"""What a sweep maximises on the validation split; `mean_auroc` is the mean of image and pixel AUROC."""
ASHA_REDUCTION = 2
"""ASHA stops an rlr trial below the median of those that reached the same rung (a quarter and a half of the longest
setting's epochs)."""
SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
FEATURE_KEYS = ("levels", "image_size", "aggregation", "pool", "resize", "tile")
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
    "rlr": {
        "lr": {"loguniform": [3e-4, 1e-2]},
        "reference_lr": {"loguniform": [1e-3, 1e-1]},
        "warmup": {"choice": [0.0, 0.05]},
        "batch_size": {"choice": [4, 8, 16]},
        "layers": {"choice": [1, 2]},
        "d_model": {"choice": [32, 64]},
        "heads": 4,
        "jitter": {"choice": [0.2, 0.4, 0.8]},
        "ref_len": {"choice": [1, 2]},
        "epochs": {"choice": [8, 16]},
    },
}
"""Documented default search spaces per method: the options the method's notes name as the levers of quality and
cost, over ranges around the defaults (`--preset NAME`). rlr's preset searches around the CPU recipe
(`methods.rlr.RECIPES["cpu"]`, which fills the options it leaves out: cosine decay, rms jitter, standardised
features, balanced sampling): narrow, short models, since the reference's width and 200 epochs are a GPU budget;
ASHA stops its weak trials early."""


@dataclasses.dataclass
class SweepSummary:
    """What a finished sweep found: one row per trial, and the best setting on the validation objective."""

    trials: list[dict[str, Any]]
    best_options: dict[str, Any]
    best_features: dict[str, Any]
    best_objective: float
    best_trial: str
    out_dir: Any
    """The sweep's folder (`Path`) or URI (`UPath`)."""
    timing: dict[str, float] = dataclasses.field(default_factory=dict)
    """Wall seconds of the sweep's stages: `features_s` (backbone, once), `trials_s` (every trial), `best_s`."""


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
            elif key == "aggregation" and value not in AGGREGATIONS:
                raise OptionError(f"search space key 'aggregation': {value!r} is not one of {list(AGGREGATIONS)}")
            elif key == "pool" and not (isinstance(value, int) and value >= 1 and value % 2):
                raise OptionError(f"search space key 'pool': {value!r} is not an odd window side >= 1")
            elif key == "resize" and value not in RESIZES:
                raise OptionError(f"search space key 'resize': {value!r} is not one of {list(RESIZES)}")
            elif key == "tile" and not (value is None or isinstance(value, int) and value >= 32):
                raise OptionError(f"search space key 'tile': {value!r} is neither null nor a tile side >= 32")


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
    search: str = "random",
    objective: str = "mean_auroc",
    time_budget_s: float | None = None,
    trial_cpus: float = 1.0,
    trial_gpus: float = 0.0,
    categories: Sequence[str] | None = None,
    backbone: str = DEFAULT_BACKBONE,
    levels: Sequence[int] = DEFAULT_LEVELS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    aggregation: str = DEFAULT_AGGREGATION,
    pool: int = DEFAULT_POOL,
    resize: str = DEFAULT_RESIZE,
    tile: int | None = None,
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
    _check_search(search, space)
    out_dir = as_location(out_dir)  # a URI keeps every trial, checkpoint and result in the bucket: a sweep then
    # spans the nodes of a cluster and resumes from any driver
    train = validate(split_samples(discover(data, categories), "train")).samples  # the test split is never opened
    carving = carve(train)
    painted = paint_validation_split(carving.validation, out_dir / "validation", seed=seed)
    trains = issubclass(METHODS[method], RLR)
    ensure_ray(dashboard=trains)
    resources = resources or plan_resources()
    default_features = {"levels": list(levels), "image_size": image_size, "aggregation": aggregation, "pool": pool,
                        "resize": resize, "tile": tile}
    specs = _feature_specs(space, backbone, default_features)
    logger.info("tune %s: %d fit, %d calibration and %d validation images (%d painted), %d feature setting(s)",
                method, len(carving.fit), len(carving.calibration), len(painted),
                sum(sample.label for sample in painted), len(specs))
    work_dir = out_dir / "work"
    began = time.perf_counter()
    features = {key: _sweep_features(spec, carving, painted, resources, work_dir, trains)
                for key, spec in specs.items()}
    features_s = time.perf_counter() - began
    setting = {"method": method, "features": features, "default_features": default_features}
    training = TrainConfig(cpus_per_worker=trial_cpus, use_gpu=trial_gpus > 0, max_failures=0)
    if trains:
        # The driver function only waits on its TorchTrainer, whose worker holds the trial's CPUs and GPUs; Tune
        # refuses an empty request, so the driver asks for one byte of memory and no CPU.
        trainable = tune.with_resources(
            tune.with_parameters(_rlr_trial, training=training, trials_dir=str(work_dir / "trials"), **setting),
            {"cpu": 0, "memory": 1})
        max_concurrent = max_concurrent or max(1, math.floor(ray.cluster_resources().get("CPU", 1) / trial_cpus))
        scheduler = _asha(method, space)
    else:
        trainable = tune.with_resources(tune.with_parameters(_bank_trial, **setting),
                                        {"cpu": trial_cpus, "gpu": trial_gpus})
        scheduler = None
    search_alg, num_samples = _search_algorithm(search, space, seed, num_samples, max_concurrent)
    sweep_dir = out_dir / "sweep"
    if tune.Tuner.can_restore(str(sweep_dir)):
        logger.info("resuming the sweep in %s: finished trials are kept", sweep_dir)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_param_space(space),
            tune_config=tune.TuneConfig(metric=objective, mode="max", num_samples=num_samples, scheduler=scheduler,
                                        search_alg=search_alg,
                                        time_budget_s=time_budget_s, reuse_actors=True),
            run_config=tune.RunConfig(name=sweep_dir.name, storage_path=str(out_dir),
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    started = time.perf_counter()
    results = tuner.fit()
    trials_s = time.perf_counter() - started
    trials = [_trial_row(result, objective) for result in results]
    with staged_output(str(out_dir)) as local_out:
        summary = _summarize(trials, objective, method, local_out, out_dir,
                             searched=[key for key, spec in space.items() if isinstance(spec, dict)])
    best_features = default_features | summary.best_features
    # An rlr fit resumes the best trial's finished run (same name: options and features), so it is not trained again.
    fit_model(data, method, str(out_dir / "best"), categories=categories, backbone=backbone,
              options=summary.best_options, exclude=[sample.image for sample in carving.validation],
              resources=resources, training=training,
              work_dir=work_dir / "trials" / summary.best_trial if trains else work_dir,
              feature_cache=work_dir / "cache", **best_features)
    summary.timing = {"features_s": features_s, "trials_s": trials_s,
                      "best_s": time.perf_counter() - started - trials_s}
    logger.info("tune %s: %d trials (%d failed) in %.0f s after %.0f s of features; best %s %s", method, len(trials),
                sum(row["status"] == "error" for row in trials), trials_s, features_s, objective,
                f"{summary.best_objective:.4f}")
    return summary


def _sweep_features(spec: ModelSpec, carving: Carving, painted: Sequence[Sample], resources: Resources,
                    work_dir: Any, trains: bool) -> dict[str, Any]:
    """The features every trial of one feature setting reads. Ray Train workers read a dataset shard, so a trained
    method gets its fit features as the Parquet cache (`fit_model`'s, for `best/`) read into the object store once."""
    if not trains:
        return _extract(spec, {"calibration": carving.calibration, "validation": painted, "fit": carving.fit},
                        resources)
    features = _extract(spec, {"calibration": carving.calibration, "validation": painted}, resources)
    context = FitContext(carving.fit, spec, resources, work_dir, feature_cache=work_dir / "cache")
    return features | {"fit": context.cached_features().materialize(), "data_key": context.feature_key()}


def _asha(method: str, space: dict[str, Any]) -> ASHAScheduler:
    """ASHA over epochs, up to the longest setting's (see `ASHA_REDUCTION`). A trial that reaches its last epoch is
    never stopped there (`stop_last_trials=False`), so its final report, with threshold and timings, arrives."""
    epochs = max(_candidate_values("epochs", space.get("epochs", METHODS[method].defaults()["epochs"])))
    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=max(1, epochs // 4),
                         reduction_factor=ASHA_REDUCTION, stop_last_trials=False)


def _check_search(search: str, space: dict[str, Any]) -> None:
    """Refuses an unknown search, or Optuna where it cannot run, before any image is read."""
    if search == "random":
        return
    if search != "optuna":
        raise OptionError(f"unknown search {search!r}; choose 'random' or 'optuna'")
    grids = [key for key, spec in space.items() if isinstance(spec, dict) and "grid" in spec]
    if grids:
        raise OptionError(f"--search optuna samples its own points: search space key(s) {grids} use 'grid'; use "
                          "'choice' instead")
    try:
        import optuna  # noqa: F401  (OptunaSearch imports it lazily; fail here with the install hint)
    except ImportError as error:
        raise OptionError(f"--search optuna needs the optuna package: pip install 'reconray[tune]' ({error})") \
            from error


def _search_algorithm(
    search: str, space: dict[str, Any], seed: int, num_samples: int, max_concurrent: int | None
) -> tuple[Any, int]:
    """The search algorithm, holding the concurrency limit, and how many trials it runs: Tune's random and grid
    search, seeded, or Optuna's TPE sampler, which learns from finished trials where to sample next and so needs
    fewer trials for the same objective (it has no grids). A space of choices alone is drawn without repeats
    (`distinct_settings`)."""
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # imports optuna, an optional dependency

        searcher = OptunaSearch(seed=seed)
        return (ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher), num_samples
    settings = distinct_settings(space, num_samples, seed)
    if settings is not None and len(settings) < num_samples:
        logger.info("tune: the space holds %d distinct settings, each tried once", len(settings))
    return BasicVariantGenerator(points_to_evaluate=settings, max_concurrent=max_concurrent or 0,
                                 random_state=seed), num_samples if settings is None else len(settings)


def distinct_settings(space: dict[str, Any], count: int, seed: int) -> list[dict[str, Any]] | None:
    """`count` distinct settings drawn at random from a space whose searched keys are all `choice`s, or every setting
    when it holds no more; None for any other space (a range never repeats, a grid is crossed with every sample).

    Independent draws repeat settings of a small discrete space: 16 draws from patchcore's preset of 20 settings
    repeat about 5 of them on average, trials that cost as much as new ones and tell nothing new.
    """
    searched = {key: spec for key, spec in space.items() if isinstance(spec, dict)}
    if not searched or any(next(iter(spec)) != "choice" for spec in searched.values()):
        return None
    choices = [(key, spec["choice"]) for key, spec in searched.items()]
    total = math.prod(len(values) for _, values in choices)
    picks = range(total) if total <= count else np.random.default_rng(seed).choice(total, count, replace=False)
    settings = []
    for pick in picks:
        setting, rest = {}, int(pick)
        for key, values in choices:
            rest, position = divmod(rest, len(values))
            setting[key] = values[position]
        settings.append(setting)
    return settings


def _spec_key(features: dict[str, Any]) -> str:
    """The identity of one feature setting (a value for every `FEATURE_KEYS` entry)."""
    return json.dumps({key: features[key] for key in FEATURE_KEYS}, sort_keys=True)


def _feature_specs(space: dict[str, Any], backbone: str, default_features: dict[str, Any]) -> dict[str, ModelSpec]:
    """One `ModelSpec` per distinct feature setting the space can ask for (the defaults where it searches none)."""
    values = [_candidate_values(key, space[key]) if key in space else [default_features[key]] for key in FEATURE_KEYS]
    mean, std = backbone_normalization(backbone)
    specs = {}
    for combination in itertools.product(*values):
        features = dict(zip(FEATURE_KEYS, combination, strict=True))
        check_geometry(features["image_size"], features["resize"], features["tile"])
        specs[_spec_key(features)] = ModelSpec(backbone, list(features["levels"]), features["image_size"], list(mean),
                                               list(std), aggregation=features["aggregation"], pool=features["pool"],
                                               resize=features["resize"], tile=features["tile"])
    return specs


def _extract(spec: ModelSpec, sets: dict[str, Sequence[Sample]], resources: Resources) -> dict[str, Any]:
    """Backbone features of each named set of images, in one pass, as object-store references the trials share:
    `{name: ref to a list of numpy batches}` plus the image size."""
    batches = feature_batches(spec, sets, resources, "tune: features of the")
    return {"image_size": spec.image_size} | {name: ray.put(parts) for name, parts in batches.items()}


def _trial_setting(config: dict[str, Any], features: dict[str, Any], default_features: dict[str, Any]
                   ) -> tuple[dict, dict]:
    """A trial's method options and the features of its feature setting (the sweep's defaults where it has none)."""
    options = {key: value for key, value in config.items() if key not in FEATURE_KEYS}
    setting = default_features | {key: value for key, value in config.items() if key in FEATURE_KEYS}
    return options, features[_spec_key(setting)]


def _threshold(model: Any, data: dict[str, Any]) -> float | None:
    """The decision threshold `fit_model` would calibrate: a quantile of the calibration images' scores."""
    size = (data["image_size"], data["image_size"])
    calibration = [score_features(model, level_tensors(batch), size, content=batch["content"])[0]
                   for batch in ray.get(data["calibration"])]
    return calibrated_threshold(torch.cat(calibration).numpy()) if calibration else None


def _bank_trial(config: dict[str, Any], method: str, features: dict[str, Any],
                default_features: dict[str, Any]) -> None:
    """A training-free method's trial: fit on the cached fit features in-process, calibrate, score the validation
    split, report once."""
    torch.set_num_threads(max(1, math.floor(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))))
    options, data = _trial_setting(config, features, default_features)
    model = create_method(method, **options)
    started = time.perf_counter()
    batches = ray.get(data["fit"])
    model.fit([level_tensors(batch) for batch in batches],
              [content_mask(batch["content"], batch["level_0"].shape[-2:], data["image_size"]) for batch in batches])
    fitted = time.perf_counter()
    threshold = _threshold(model, data)
    metrics = validation_metrics(model, ray.get(data["validation"]), data["image_size"])
    tune.report({**metrics, "threshold": threshold, "fit_s": fitted - started, "score_s": time.perf_counter() - fitted})


def _rlr_trial(config: dict[str, Any], method: str, features: dict[str, Any], default_features: dict[str, Any],
               training: TrainConfig, trials_dir: str) -> None:
    """An rlr trial, a driver function as in Ray's Train + Tune guide: it builds and runs a `TorchTrainer`
    (its run in `trials_dir/<trial id>/train`, named like `fit_model`'s so that `best/` reuses the trained model) whose
    rank-0 worker scores the validation split every epoch; the driver
    reports each epoch's record with `ray.tune.report`, so ASHA can stop a weak trial early. A final report adds the
    threshold and timings of the finished model."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    options, data = _trial_setting(config, features, default_features)
    model = create_method(method, **options)
    started = time.perf_counter()
    epochs = model.options.epochs

    def report_epoch(record: dict[str, Any]) -> None:
        if record["epoch"] < epochs:  # the last epoch is reported once, below, with the threshold and timings
            tune.report(record)

    run = as_location(trials_dir) / tune.get_context().get_trial_id() / "train"
    model = train_rlr(data["fit"], model, run, training,
                      data_key=data["data_key"], validation=ValidationFeatures(data["validation"], data["image_size"]),
                      on_epoch=report_epoch)
    fitted = time.perf_counter()
    threshold = _threshold(model, data)
    final = {name: model.info.get(name) for name in (*VALIDATION_METRICS, "epoch", "loss")}
    tune.report({**final, "threshold": threshold, "fit_s": fitted - started, "score_s": time.perf_counter() - fitted})


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "/")


def _trial_row(result: Any, objective: str) -> dict[str, Any]:
    """One trial as a flat row: its options, its validation metrics, timings and status (error text if it failed).

    A trial ASHA stopped early is `stopped` at the epoch it reached, with that epoch's metrics; only finished trials
    compete for the best setting.
    """
    metrics = result.metrics or {}
    config = result.config or _stored_params(result)
    row = {"trial_id": metrics.get("trial_id") or Path(result.path).name, **config}
    row |= {name: metrics.get(name) for name in (*VALIDATION_METRICS, "threshold", "fit_s", "score_s")}
    row["trial_s"] = metrics.get("time_total_s")
    if "epoch" in metrics:  # a trained method: the epochs reached and the seconds spent training them
        row |= {"epoch": metrics["epoch"], "train_s": metrics.get("elapsed_s")}
    stopped = "epoch" in metrics and metrics.get("fit_s") is None  # the final report, with timings, never came
    row["status"] = "error" if result.error else "stopped" if stopped else "ok"
    row["error"] = str(result.error).strip().splitlines()[-1] if result.error else ""
    row["objective"] = metrics.get(objective)
    return row


def _stored_params(result: Any) -> dict[str, Any]:
    """A trial's params.json, read through its storage filesystem (a folder or a bucket): a trial that failed after
    a resume comes back without its config."""
    try:
        with result.filesystem.open_input_stream(f"{result.path}/params.json") as stream:
            return json.loads(stream.read())
    except (OSError, json.JSONDecodeError):
        return {}


def parameter_influence(trials: Sequence[dict[str, Any]], parameters: Sequence[str]) -> dict[str, float]:
    """How strongly the objective of the finished trials follows each parameter, in [0, 1], strongest first.

    Numbers with three or more distinct values: |Spearman rank correlation| (monotone trends, any scale). Anything
    else (choices of strings, two values): the correlation ratio, the share of the objective's spread explained by
    the groups' means (its square root, so both read alike). A parameter with one value or a constant objective: 0.
    """
    finished = [row for row in trials if row["status"] == "ok" and row["objective"] is not None]
    objective = np.array([row["objective"] for row in finished], dtype=np.float64)
    influence = {}
    for name in parameters:
        values = [row.get(name) for row in finished]
        distinct = {str(value) for value in values}
        if len(distinct) < 2 or np.ptp(objective) == 0:
            influence[name] = 0.0
        elif len(distinct) >= 3 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            influence[name] = float(abs(stats.spearmanr(values, objective).statistic))
        else:
            groups = [objective[[str(value) == key for value in values]] for key in distinct]
            between = sum(len(group) * (group.mean() - objective.mean()) ** 2 for group in groups)
            influence[name] = float(np.sqrt(between / ((objective - objective.mean()) ** 2).sum()))
    return dict(sorted(influence.items(), key=lambda item: -item[1]))


def _plot(trials: Sequence[dict[str, Any]], objective: str, searched: Sequence[str], path: Path) -> None:
    """objective.png: the objective of each trial in run order (blue: finished, orange: stopped early at the epoch
    shown), then against the (up to) three parameters it follows most (`parameter_influence`)."""
    shown = [(index, row) for index, row in enumerate(trials)
             if row["status"] in ("ok", "stopped") and row["objective"] is not None]
    if not shown:
        return
    ys = [row["objective"] for _, row in shown]
    groups = [int(row["status"] == "stopped") for _, row in shown]
    plots = [scatter_plot(f"{objective} of each trial", "trial", objective, [i for i, _ in shown], ys, groups)]
    for name, strength in list(parameter_influence(trials, searched).items())[:3]:
        plots.append(scatter_plot(f"{objective} against {name} (influence {strength:.2f})", name, objective,
                                  [row[name] for _, row in shown], ys, groups))
    plot_grid(plots).save(path)


def _summarize(trials: list[dict[str, Any]], objective: str, method: str, out_dir: Path, shown_dir: Any,
               searched: Sequence[str]) -> SweepSummary:
    """Writes results.csv, results.md, objective.png and best.yaml into `out_dir`, the local side of the sweep's
    `shown_dir`; refuses a sweep in which every trial failed."""
    columns = list(dict.fromkeys(key for row in trials for key in row))
    with (out_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(trials)
    lines = [f"# reconray tune: {method}, objective {objective} on the validation split", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in trials]
    lines += ["", "Trials ASHA stopped early (`stopped`) show the metrics of the epoch they reached.", "",
              "![objective across trials](objective.png)"]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    _plot(trials, objective, searched, out_dir / "objective.png")
    finished = [row for row in trials if row["status"] == "ok" and row["objective"] is not None]
    if not finished:
        errors = sorted({row["error"] for row in trials})
        raise OptionError(f"every one of the {len(trials)} trials failed; errors: {errors}; see "
                          f"{shown_dir / 'results.md'}")
    best = max(finished, key=lambda row: row["objective"])
    options = {key: best[key] for key in METHODS[method].Options.model_fields if key in best}
    features = {key: best[key] for key in FEATURE_KEYS if key in best}
    (out_dir / "best.yaml").write_text(yaml.safe_dump({"method": method, "options": options, **features,
                                                       objective: float(best["objective"])}, sort_keys=False))
    return SweepSummary(trials, options, features, float(best["objective"]), best["trial_id"], shown_dir)
