"""Distributed, resumable RLR training on Ray Train (Train V2, the default engine in Ray 2.60).

Reads like Ray's torch_fashion_mnist example: `_train_func` runs on every worker (DDP through `prepare_model`,
batches from this worker's shard of the cached backbone features, fresh feature jitter every epoch, the epoch itself
being `methods.rlr.train_epoch`, the loop `RLR.fit` runs in-process) and reports every epoch; `train_rlr` builds
the `TorchTrainer` around it and shows the epochs as a progress bar on the driver.

Fault tolerance is Ray Train's: a worker that dies is restarted up to `max_failures` times and resumes from the
last checkpoint (`ray.train.get_checkpoint()`). A run is named after what defines it (the model options and the
training features), and Train V2 keeps a snapshot of the run's checkpoints under `storage_path/name`: calling
`train_rlr` again after an interruption (Ctrl-C, lost driver, exhausted retries) resumes from the latest checkpoint,
while different options or data start a fresh run beside the old one, and the log says which. Checkpoints hold
tensors only (safetensors) plus a JSON progress file: no pickle.

Example:
    >>> method = RLR(epochs=5, d_model=64, layers=2, heads=4)
    >>> fitted = train_rlr(features, method, Path("runs/rlr-work/train"), TrainConfig(num_workers=2))
    >>> fitted.info["loss"], fitted.info["images_per_s"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from safetensors.torch import load_file, save_file

from reconray.methods.errors import DatasetError
from reconray.methods.rlr import (
    RLR,
    LRSchedule,
    budget_spent,
    category_repeats,
    channel_statistics,
    epoch_record,
    jitter_seed,
    make_optimizer,
    patience_ran_out,
    train_epoch,
)
from reconray.pipelines.console import FILE_ONLY_LOGGER, stage
from reconray.pipelines.fitting import FitContext, TrainConfig, register_distributed_fit, worker_cpus
from reconray.pipelines.ingest import as_tensor, feature_batches, level_columns, level_count
from reconray.pipelines.report import scatter_plot
from reconray.pipelines.storage import as_location
from reconray.pipelines.validation import validation_metrics

logger = logging.getLogger(__name__)
epoch_log = logging.getLogger(f"{FILE_ONLY_LOGGER}.rlr")

MODEL_FILE = "model.safetensors"
VALIDATION_PLOT = "validation.png"
OPTIMIZER_FILE = "optimizer.safetensors"
PROGRESS_FILE = "progress.json"
_SHUFFLE_BATCHES = 16
"""Local shuffle buffer, in batches: mixes categories within a shard without a full shuffle of the features."""
SELECTION_METRIC = "mean_auroc"
"""What checkpoint selection maximises on the validation split: the mean of image and pixel AUROC, tune's default."""
_POLL_S = 0.5
"""How often the driver reads the epochs reported so far, to advance its progress bar."""


@dataclasses.dataclass(frozen=True)
class ValidationFeatures:
    """The painted validation split's features (an object-store reference to a list of numpy batches with
    `level_<n>`, `category`, `label` and `gt_mask`), scored by the rank-0 worker every `validate_every` epochs."""

    batches: ray.ObjectRef
    image_size: int


@register_distributed_fit(RLR)
def fit_rlr(method: RLR, context: FitContext) -> RLR:
    """RLR's distributed fit: train on Ray Train from the cached features, checkpoints in the work directory, the
    kept checkpoint chosen on the context's validation split when it has one."""
    validation = None
    if context.validation:
        batches = feature_batches(context.spec, {"validation": context.validation}, context.resources,
                                  "fit rlr: features of the")["validation"]
        validation = ValidationFeatures(ray.put(batches), context.spec.image_size)
    return train_rlr(context.cached_features(), method, context.work_dir / "train", context.training,
                     data_key=context.feature_key(), validation=validation)


def train_rlr(
    train_features: ray.data.Dataset,
    method: RLR,
    run_dir: str | Path,
    training: TrainConfig | None = None,
    data_key: str = "",
    validation: ValidationFeatures | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> RLR:
    """Trains `method`'s model on Ray Train and returns the fitted method, loaded from the final checkpoint.

    Args:
        train_features: rows with one `level_<n>` column per level holding float32 `(C_l, H_l, W_l)` arrays
            (cached backbone features of normal images; every epoch rereads them, so pass a cached dataset).
        method: an unfitted `RLR`; its options define the model and its optimisation.
        run_dir: Ray Train storage path, a folder or a URI (s3://...: every worker writes its checkpoints there,
            whichever node it runs on); each run is a folder in it.
        training: workers, CPUs, GPUs, retries and checkpoint interval (None: `TrainConfig()`).
        data_key: identity of the training features (part of the run's name, so other data never resumes it).
        validation: when given, every `training.validate_every` epochs, at every checkpoint and after the last epoch
            the rank-0 worker scores it; the epoch's record carries `validation.VALIDATION_METRICS`, each scored epoch
            is checkpointed, and the fitted model is the checkpoint with the best `SELECTION_METRIC` (Ray Train keeps
            it and the latest one, which resumes the run). Without it, the model is the last epoch's.
        on_epoch: called on the driver with each finished epoch's record (a Tune trial passes `ray.tune.report`).
    """
    training = training or TrainConfig()
    survey = _survey(train_features)
    use_gpu = training.use_gpu and ray.cluster_resources().get("GPU", 0) > 0
    method.use_recipe(use_gpu)
    options = method.options
    name = run_name(method, data_key)
    run_dir = as_location(run_dir)
    result = _finished_run(run_dir / name, options.epochs)
    if result is not None:  # e.g. a Tune sweep's best trial, fitted again as best/: its run is loaded as it is
        logger.info("rlr: run %s finished earlier: its checkpoints are loaded, nothing is trained again", name)
    else:
        trainer, epochs = _trainer(train_features, method, run_dir, name, training, use_gpu, survey, validation)
        result = _fit_showing_epochs(trainer, epochs, options.epochs, on_epoch)
    if result.checkpoint is None:
        raise RuntimeError(f"rlr run {name!r} in {run_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        reached = json.loads(Path(directory, PROGRESS_FILE).read_text())
    if reached.get("early_stop"):
        logger.info("rlr: early stop after epoch %d of %d: %d scored epochs in a row did not beat the best",
                    reached["epoch"], options.epochs, options.patience)
    elif reached["epoch"] < options.epochs:
        logger.info("rlr: the time budget of %g s ran out after epoch %d of %d (%.0f s of training)",
                    options.time_budget_s, reached["epoch"], options.epochs, reached["elapsed_s"])
    chosen = result.get_best_checkpoint(SELECTION_METRIC, "max") if validation else result.checkpoint
    with chosen.as_directory() as directory:
        tensors = load_file(Path(directory, MODEL_FILE))
        progress = json.loads(Path(directory, PROGRESS_FILE).read_text())
    if validation:
        history = reached.get("validation_history", [])
        _plot_validation(history, run_dir / name / VALIDATION_PLOT)
        logger.info("rlr: kept epoch %d of %d, validation %s %.4f (best of %d scored epochs; curve in %s)",
                    progress["epoch"], reached["epoch"], SELECTION_METRIC, progress[SELECTION_METRIC], len(history),
                    run_dir / name / VALIDATION_PLOT)
    return method.load_trained(tensors, survey.channels, survey.grids, {**progress, "checkpoint": chosen.path})


def _trainer(train_features: ray.data.Dataset, method: RLR, run_dir: Any, name: str, training: TrainConfig,
             use_gpu: bool, survey: _Survey, validation: ValidationFeatures | None) -> tuple[TorchTrainer, Any]:
    """The `TorchTrainer` of run `name` (resuming it from its latest checkpoint, if any) and the channel its rank-0
    worker posts each finished epoch to."""
    options = method.options
    columns = survey.columns
    _say_resume_or_fresh(run_dir, name)
    cpus = worker_cpus(training)
    logger.info("rlr: %d worker(s) with %g CPU(s)%s each", training.num_workers, cpus, " and a GPU" if use_gpu else "")
    train_features, rows = _sampled(train_features, options.sampling, survey.counts)
    images_per_worker = rows // training.num_workers  # Ray Train splits the rows equally
    # On the driver's own node: a node lost under training then takes workers (which Ray Train restarts from the last
    # checkpoint), never the channel the driver reads.
    epochs = _EpochChannel.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote()
    config = {
        "options": options.model_dump(),
        "columns": columns,
        "channels": survey.channels,
        "grids": survey.grids,
        "statistics": survey.statistics if options.standardize else None,
        "steps_per_epoch": math.ceil(images_per_worker / options.batch_size),
        "threads": max(1, math.floor(cpus)),
        "checkpoint_every": training.checkpoint_every,
        "validate_every": training.validate_every,
        "validation": validation,
        "epochs": epochs,
    }
    trainer = TorchTrainer(
        _train_func,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=training.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus} | ({"GPU": 1} if use_gpu else {}),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SELECTION_METRIC,
                                               checkpoint_score_order="max") if validation else CheckpointConfig(),
        ),
        datasets={"train": _streamable(train_features.select_columns(columns), training.num_workers * cpus)},
    )
    return trainer, epochs


def _finished_run(path: Any, epochs: int) -> ray.train.Result | None:
    """The result of the run at `path` when it trained its last epoch or stopped early, else None (none there, or
    one to resume): a finished run is loaded from its checkpoints without starting any worker."""
    try:
        result = ray.train.Result.from_path(str(path))
    except RuntimeError:  # no such run, or no checkpoint registered yet
        return None
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as directory:
        reached = json.loads(Path(directory, PROGRESS_FILE).read_text())
    return result if reached["epoch"] >= epochs or reached.get("early_stop") else None


def run_name(method: RLR, data_key: str) -> str:
    """`rlr-<hash>` of the model options and the training data: the same fit resumes, any other starts fresh."""
    identity = json.dumps({"options": method.options.model_dump(), "data": data_key}, sort_keys=True)
    return f"rlr-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _say_resume_or_fresh(run_dir: Any, name: str) -> None:
    """Logs whether this fit resumes an earlier run or starts fresh beside runs with other options or data."""
    checkpoints = sorted(path for path in (run_dir / name).glob("checkpoint_*") if path.is_dir())
    if checkpoints:
        logger.info("rlr: resuming run %s from its latest checkpoint (%s)", name, checkpoints[-1].name)
        return
    others = sorted(path.name for path in run_dir.glob("rlr-*") if path.is_dir() and path.name != name)
    if others:
        logger.info("rlr: earlier runs in %s used other options or data (%s): training %s from scratch", run_dir,
                    ", ".join(others), name)


@ray.remote(num_cpus=0)
class _EpochChannel:
    """Where the rank-0 worker posts each finished epoch, for the driver's progress bar."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def post(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def since(self, count: int) -> list[dict[str, Any]]:
        return self.records[count:]


def _fit_showing_epochs(
    trainer: TorchTrainer, epochs: Any, total: int, on_epoch: Callable[[dict[str, Any]], None] | None
) -> ray.train.Result:
    """Runs `trainer.fit()` in a thread while the driver advances an epoch progress bar from the posted records."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised on the driver thread below
            outcome["error"] = error

    thread = threading.Thread(target=run, name="reconray-train", daemon=True)
    thread.start()
    seen = 0
    with stage("fit rlr: training", total=total, unit="epoch") as advance:
        while thread.is_alive() or seen < total:
            thread.join(_POLL_S)
            records = ray.get(epochs.since.remote(seen))
            for record in records:
                if seen == 0 and record["resumed_from_epoch"]:
                    advance(record["resumed_from_epoch"])
                score = record.get(SELECTION_METRIC)
                scored = "" if score is None else f", validation {SELECTION_METRIC} {score:.4f}"
                epoch_log.info("rlr epoch %d: loss %.4f%s", record["epoch"], record["loss"], scored)
                advance(1)
                if on_epoch is not None:
                    on_epoch(_scalars(record))
            seen += len(records)
            if not thread.is_alive() and not records:
                break
    ray.kill(epochs)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _streamable(train_features: ray.data.Dataset, reserved_cpus: float) -> ray.data.Dataset:
    """The features as the workers' shards read them: block order shuffled every epoch, materialized first when needed.

    Ray Data feeds the shards with read tasks that each need a whole CPU, and Ray Train keeps Data off the CPUs its
    workers reserve. When the workers leave less than one CPU of the cluster (one worker holding both cores of a
    laptop), those tasks could never start and training would wait forever, so the features are read into the
    object store before training instead.
    """
    total_cpus = ray.cluster_resources().get("CPU", 0.0)
    if total_cpus - reserved_cpus < 1:
        logger.info("rlr workers reserve %g of the cluster's %g CPUs, leaving Ray Data none to stream the features: "
                    "reading them into the object store first", reserved_cpus, total_cpus)
        train_features = train_features.materialize()
    return train_features.randomize_block_order()


@dataclasses.dataclass(frozen=True)
class _Survey:
    """What one pass of the driver over the training features tells it before training starts.

    Attributes:
        columns: the level columns, finest first; channels and grids: per level.
        counts: rows per category ({"": rows} for features without a `category` column).
        statistics: per level, `[mean, std]` of every channel (`methods.rlr.channel_statistics`), as plain lists
            so the config travels to the workers as plain data.
    """

    columns: list[str]
    channels: list[int]
    grids: list[list[int]]
    counts: dict[str, int]
    statistics: list[list[list[float]]]


def _survey(train_features: ray.data.Dataset) -> _Survey:
    """Reads the features once: their layout from the first batch, the category counts and channel statistics."""
    layout: list[tuple[list[str], list[tuple[int, ...]]]] = []
    counts: Counter[str] = Counter()

    def level_batches() -> Iterator[list[torch.Tensor]]:
        for batch in train_features.iter_batches(batch_size=256, batch_format="numpy"):
            if not layout:
                columns = level_columns(level_count(batch))
                layout.append((columns, [batch[column].shape[1:] for column in columns]))
            columns, shapes = layout[0]
            if any(len(shape) != 3 for shape in shapes):
                raise DatasetError(f"rlr: feature columns must hold (C, H, W) arrays, got shapes {shapes}")
            counts.update(str(category) for category in batch.get("category", [""] * len(batch[columns[0]])))
            yield [as_tensor(batch[column]) for column in columns]

    try:
        statistics = channel_statistics(level_batches())
    except DatasetError as error:
        if layout:
            raise
        raise DatasetError("rlr: the training feature dataset is empty (no normal images?)") from error
    columns, shapes = layout[0]
    return _Survey(columns, [int(shape[0]) for shape in shapes], [[int(shape[1]), int(shape[2])] for shape in shapes],
                   dict(counts), [[mean.tolist(), std.tolist()] for mean, std in statistics])


def _sampled(train_features: ray.data.Dataset, sampling: str, counts: dict[str, int]) -> tuple[ray.data.Dataset, int]:
    """The rows one epoch reads, and how many: each once ("shuffle"), or each category's repeated to match the
    largest one ("balanced", `methods.rlr.category_repeats`), so a unified model sees its small categories as often.
    Features without a `category` column are one category."""
    if sampling == "shuffle" or "" in counts:
        return train_features, sum(counts.values())
    repeats = category_repeats(counts)
    logger.info("rlr: balanced sampling, one epoch reads %s", ", ".join(
        f"{category} {counts[category]} x {repeats[category]}" for category in sorted(counts)))
    balanced = train_features.map_batches(_repeat_rows, fn_kwargs={"repeats": repeats}, batch_format="numpy")
    return balanced, sum(counts[category] * repeats[category] for category in counts)


def _repeat_rows(batch: dict[str, Any], repeats: dict[str, int]) -> dict[str, Any]:
    """Every row of the batch `repeats[category]` times."""
    rows = np.repeat(np.arange(len(batch["category"])), [repeats[str(category)] for category in batch["category"]])
    return {key: value[rows] for key, value in batch.items()}


def _train_func(config: dict[str, Any]) -> None:
    """Runs on every worker: resume if a checkpoint exists, then train epoch by epoch, reporting each one."""
    method = RLR(**config["options"])
    options = method.options
    torch.set_num_threads(config["threads"])
    model = method.build_model(config["channels"], config["grids"])
    if config["statistics"] is not None:
        model.set_feature_statistics([(torch.tensor(mean), torch.tensor(std)) for mean, std in config["statistics"]])
    start_epoch, history, optimizer_tensors, earlier_s, validation_history = 0, [], None, 0.0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model.load_state_dict(load_file(Path(directory, MODEL_FILE)))
            optimizer_tensors = load_file(Path(directory, OPTIMIZER_FILE))
            progress = json.loads(Path(directory, PROGRESS_FILE).read_text())
            start_epoch, history, earlier_s = progress["epoch"], progress["losses"], progress["elapsed_s"]
            validation_history = progress.get("validation_history", [])
    # Buffers (window indexes, masks, position codes) are fixed by the grid: no need to broadcast them every step.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    optimizer = make_optimizer(model, options.lr, options.reference_lr)
    if optimizer_tensors is not None:
        _load_optimizer_tensors(optimizer, optimizer_tensors)
    schedule = LRSchedule(options, config["steps_per_epoch"], step=start_epoch * config["steps_per_epoch"])

    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    validation = config["validation"]
    validation_batches = ray.get(validation.batches) if validation is not None and rank == 0 else None  # read once
    torch.manual_seed(jitter_seed(options.seed, start_epoch, rank))
    started = time.perf_counter()
    for epoch in range(start_epoch, options.epochs):
        epoch_started = time.perf_counter()
        batches = shard.iter_torch_batches(
            batch_size=options.batch_size,
            dtypes=torch.float32,
            device=device,
            local_shuffle_buffer_size=options.batch_size * _SHUFFLE_BATCHES,
            local_shuffle_seed=options.seed + epoch,
        )
        level_batches = ([batch[column] for column in config["columns"]] for batch in batches)
        loss_sum, images = train_epoch(model, optimizer, level_batches, options, schedule)
        loss_sum, images = _sum_over_workers(loss_sum, images, device)
        now = time.perf_counter()
        elapsed = _max_over_workers(earlier_s + now - started, device)  # the same time-budget decisions everywhere
        record = epoch_record(epoch + 1, loss_sum, images, now - epoch_started, elapsed, history, start_epoch)
        record["steps"] = schedule.step
        history = record["losses"]
        schedule.fit_budget(elapsed)
        out_of_time = budget_spent(options, elapsed)
        last = epoch + 1 == options.epochs or out_of_time
        checkpointing = last or (epoch + 1) % config["checkpoint_every"] == 0
        validating = validation is not None and (checkpointing or (epoch + 1) % config["validate_every"] == 0)
        if validating and rank == 0:
            record |= _validate(method, model, config, validation_batches, validation.image_size)
            validation_history.append({"epoch": record["epoch"], SELECTION_METRIC: record[SELECTION_METRIC]})
            record["validation_history"] = list(validation_history)
        if validating and options.patience is not None:
            scores = [entry[SELECTION_METRIC] for entry in validation_history]
            rank_0_says = rank == 0 and patience_ran_out(scores, options.patience)  # only rank 0 holds the scores
            record["early_stop"] = _max_over_workers(float(rank_0_says), device) > 0
            last = last or record["early_stop"]
        if rank == 0:
            config["epochs"].post.remote(record)
        if checkpointing or validating:
            with tempfile.TemporaryDirectory() as directory:
                if rank == 0:
                    _write_checkpoint(Path(directory), model, optimizer, record)
                checkpoint = Checkpoint.from_directory(directory) if rank == 0 else None
                ray.train.report(_scalars(record), checkpoint=checkpoint)
        else:
            ray.train.report(_scalars(record))
        if last:
            break


def _validate(method: RLR, model: torch.nn.Module, config: dict[str, Any], batches: list, image_size: int) -> dict:
    """Scores the validation batches with a copy of the current weights (training state stays untouched)."""
    module = _unwrapped(model)
    scorer = RLR(**method.options.model_dump()).load_trained(module.state_dict(), config["channels"], config["grids"],
                                                             {})
    return validation_metrics(scorer.to(next(module.parameters()).device), batches, image_size)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, without the DDP wrapper `prepare_model` puts around it on several workers."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _scalars(record: dict[str, Any]) -> dict[str, Any]:
    """The epoch record without its histories: what Ray Train keeps as each report's metrics."""
    return {key: value for key, value in record.items() if key not in ("losses", "validation_history")}


def _plot_validation(history: list[dict[str, Any]], path: Any) -> None:
    """The validation metric of every scored epoch, as a PNG beside the run's checkpoints (a path or a URI)."""
    if history:
        figure = scatter_plot(f"validation {SELECTION_METRIC} per epoch", "epoch", SELECTION_METRIC,
                              [entry["epoch"] for entry in history], [entry[SELECTION_METRIC] for entry in history])
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            figure.save(handle, format="PNG")


def _sum_over_workers(loss_sum: float, images: int, device: torch.device) -> tuple[float, int]:
    """Totals an epoch's loss and image count over all workers, so the progress line speaks for the whole run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return loss_sum, images
    totals = torch.tensor([loss_sum, float(images)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return float(totals[0]), int(totals[1])


def _max_over_workers(value: float, device: torch.device) -> float:
    """The largest `value` over the workers: decisions taken from it (stop now, the schedule's horizon) are then the
    same on every worker, so they stop at the same epoch (DDP would wait forever) with equal weights."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


def _write_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, metrics: dict[str, Any]
) -> None:
    """Writes model and optimizer tensors (safetensors) and the epoch reached (JSON)."""
    model_tensors = {key: value.detach().cpu().contiguous() for key, value in _unwrapped(model).state_dict().items()}
    save_file(model_tensors, directory / MODEL_FILE)
    save_file(_optimizer_tensors(optimizer), directory / OPTIMIZER_FILE)
    (directory / PROGRESS_FILE).write_text(json.dumps(metrics))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flattens the optimizer's per-parameter state into `{"<param index>.<name>": tensor}`."""
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors


def _load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restores per-parameter state saved by `_optimizer_tensors`; hyperparameters come from the live optimizer."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for flat_key, value in tensors.items():
        index, key = flat_key.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
