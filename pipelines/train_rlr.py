"""Distributed, resumable RLR training on Ray Train (Train V2, the default engine in Ray 2.60).

Reads like Ray's torch_fashion_mnist example: `_train_func` runs on every worker (DDP through `prepare_model`,
batches from this worker's shard of the cached backbone features, fresh feature jitter every epoch) and reports
loss, images/s and elapsed time every epoch; `train_rlr` builds the `TorchTrainer` around it.

Fault tolerance is Ray Train's: a worker that dies is restarted up to `max_failures` times and resumes from the
last checkpoint (`ray.train.get_checkpoint()`); and because Train V2 keeps a snapshot of the run's checkpoints
under `storage_path/name`, calling `train_rlr` again with the same `run_dir` and `name` after an interruption
(Ctrl-C, lost driver, exhausted retries) resumes from the latest checkpoint instead of starting over; re-running a
finished run trains nothing and returns its final model. Checkpoints
hold tensors only (safetensors) plus a JSON progress file: no pickle.

Example:
    >>> method = RLR(epochs=5, d_model=64, layers=2, heads=4, num_workers=2, cpus_per_worker=1)
    >>> fitted = train_rlr(features, method, Path("runs"), name="rlr-unified")   # features: ray.data.Dataset
    >>> fitted.info["final_loss"], fitted.info["images_per_s"]
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from reconray.methods.base import MethodState
from reconray.methods.rlr import RLR, make_optimizer, train_step

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
PROGRESS_FILE = "progress.json"
LEVEL_PREFIX = "level_"
_SHUFFLE_BATCHES = 16
"""Local shuffle buffer, in batches: mixes categories within a shard without a full shuffle of the features."""


def train_rlr(
    train_features: ray.data.Dataset,
    method: RLR,
    run_dir: Path,
    name: str = "rlr",
    before_epoch: Callable[[int], None] | None = None,
) -> RLR:
    """Trains `method`'s model on Ray Train and returns the fitted method, loaded from the final checkpoint.

    Args:
        train_features: rows with columns `level_0`, `level_1`, ... holding float32 `(C_l, H_l, W_l)` arrays
            (cached backbone features of normal images; every epoch rereads them, so pass a cached dataset).
        method: an unfitted `RLR`; its options set the model, the schedule and the Ray resources.
        run_dir: Ray Train storage path; checkpoints go to `run_dir/name`.
        name: run name; reusing it with the same `run_dir` resumes that run from its latest checkpoint.
        before_epoch: called on every worker with the epoch index before each epoch (must be picklable), for
            per-epoch side work such as the fault injection in the tests.
    """
    levels, channels, grids = _feature_layout(train_features)
    options = method.options
    use_gpu = bool(options["use_gpu"]) and ray.cluster_resources().get("GPU", 0) > 0
    config = {
        "options": options,
        "levels": levels,
        "channels": channels,
        "grids": grids,
        "threads": max(1, math.floor(options["cpus_per_worker"])),
        "before_epoch": before_epoch,
    }
    trainer = TorchTrainer(
        _train_func,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=options["num_workers"],
            use_gpu=use_gpu,
            resources_per_worker={"CPU": options["cpus_per_worker"]} | ({"GPU": 1} if use_gpu else {}),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(run_dir).resolve()),
            failure_config=FailureConfig(max_failures=options["max_failures"]),
        ),
        datasets={"train": _streamable(train_features, options["num_workers"] * options["cpus_per_worker"])},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"rlr run {name!r} in {run_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        tensors = load_file(Path(directory, MODEL_FILE))
        progress = json.loads(Path(directory, PROGRESS_FILE).read_text())
    state = MethodState(
        options=options | {"channels": channels, "grids": grids},
        tensors=tensors,
        info={**progress, "checkpoint": result.checkpoint.path},
    )
    return RLR.from_state(state)


def _streamable(train_features: ray.data.Dataset, reserved_cpus: float) -> ray.data.Dataset:
    """The features as the workers' shards read them: block order shuffled every epoch, materialized first when needed.

    Ray Data feeds the shards with read tasks that each need a whole CPU, and Ray Train keeps Data off the CPUs its
    workers reserve. When the workers leave less than one CPU of the cluster (one worker holding both cores of a
    laptop), those tasks could never start and training would wait forever, so the features are read into the
    object store before training instead.
    """
    total_cpus = ray.cluster_resources().get("CPU", 0.0)
    if total_cpus - reserved_cpus < 1:
        print(
            f"[reconray] rlr workers reserve {reserved_cpus:g} of the cluster's {total_cpus:g} CPUs, leaving Ray Data "
            "none to stream the features: reading them into the object store first",
            flush=True,
        )
        train_features = train_features.materialize()
    return train_features.randomize_block_order()


def _feature_layout(train_features: ray.data.Dataset) -> tuple[list[str], list[int], list[list[int]]]:
    """Reads the level columns, channels and grids from the first row (finest level first)."""
    rows = train_features.take(1)
    if not rows:
        raise ValueError("rlr: the training feature dataset is empty (no normal images?)")
    levels = [key for key in rows[0] if key.startswith(LEVEL_PREFIX)]
    levels.sort(key=lambda key: int(key[len(LEVEL_PREFIX) :]))
    if not levels:
        raise ValueError(f"rlr: no {LEVEL_PREFIX}<n> columns in the training features, got {sorted(rows[0])}")
    shapes = [rows[0][key].shape for key in levels]
    if any(len(shape) != 3 for shape in shapes):
        raise ValueError(f"rlr: feature columns must hold (C, H, W) arrays, got shapes {shapes}")
    return levels, [int(shape[0]) for shape in shapes], [[int(shape[1]), int(shape[2])] for shape in shapes]


def _train_func(config: dict[str, Any]) -> None:
    """Runs on every worker: resume if a checkpoint exists, then train epoch by epoch, reporting each one."""
    options = config["options"]
    torch.set_num_threads(config["threads"])
    model = RLR(**options).build_model(config["channels"], config["grids"])
    start_epoch, optimizer_tensors = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model.load_state_dict(load_file(Path(directory, MODEL_FILE)))
            optimizer_tensors = load_file(Path(directory, OPTIMIZER_FILE))
            start_epoch = json.loads(Path(directory, PROGRESS_FILE).read_text())["epoch"]
    # Buffers (window indexes, masks, position codes) are fixed by the grid: no need to broadcast them every step.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    optimizer = make_optimizer(model, options["lr"])
    if optimizer_tensors is not None:
        _load_optimizer_tensors(optimizer, optimizer_tensors)

    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    torch.manual_seed(options["seed"] + 1000 * start_epoch + rank + 1)  # jitter differs per worker and attempt
    started = time.perf_counter()
    for epoch in range(start_epoch, options["epochs"]):
        if config["before_epoch"] is not None:
            config["before_epoch"](epoch)
        epoch_started = time.perf_counter()
        loss_sum, images = 0.0, 0
        batches = shard.iter_torch_batches(
            batch_size=options["batch_size"],
            dtypes=torch.float32,
            device=device,
            local_shuffle_buffer_size=options["batch_size"] * _SHUFFLE_BATCHES,
            local_shuffle_seed=options["seed"] + epoch,
        )
        for batch in batches:
            features = [batch[key] for key in config["levels"]]
            loss = train_step(model, optimizer, features, options["jitter"], options["precision"])
            loss_sum += loss * len(features[0])
            images += len(features[0])
        loss_sum, images = _sum_over_workers(loss_sum, images, device)
        metrics = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(images, 1),
            "images_per_s": images / (time.perf_counter() - epoch_started),
            "elapsed_s": time.perf_counter() - started,
            "resumed_from_epoch": start_epoch,
        }
        if rank == 0:
            print(
                f"rlr epoch {epoch + 1}/{options['epochs']}: loss {metrics['loss']:.4f}, "
                f"{metrics['images_per_s']:.1f} images/s, {metrics['elapsed_s']:.1f} s elapsed"
            )
        if epoch + 1 == options["epochs"] or (epoch + 1) % options["checkpoint_every"] == 0:
            with tempfile.TemporaryDirectory() as directory:
                if rank == 0:
                    _write_checkpoint(Path(directory), model, optimizer, metrics)
                checkpoint = Checkpoint.from_directory(directory) if rank == 0 else None
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)


def _sum_over_workers(loss_sum: float, images: int, device: torch.device) -> tuple[float, int]:
    """Totals an epoch's loss and image count over all workers, so the progress line speaks for the whole run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return loss_sum, images
    totals = torch.tensor([loss_sum, float(images)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return float(totals[0]), int(totals[1])


def _write_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, metrics: dict[str, Any]
) -> None:
    """Writes model and optimizer tensors (safetensors) and the epoch reached (JSON)."""
    module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    model_tensors = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
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
