"""RLR on a real local Ray Train: two workers, a worker process killed mid-run, and a run resumed by re-running it."""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import ray.train
import torch

from reconray.methods.rlr import RLR, patience_ran_out
from reconray.pipelines.fitting import TrainConfig, worker_cpus
from reconray.pipelines.train_rlr import PROGRESS_FILE, ValidationFeatures, _sampled, _survey, run_name, train_rlr


@pytest.fixture(scope="module")
def features(ray_session) -> ray.data.Dataset:
    """16 'normal images' as two feature levels (6x8x8 and 12x4x4): stripes at random phases, like textures; 12 of
    category "wide", 4 of "narrow" (the CPU recipe's balanced sampling reads narrow's 3 times: 24 per epoch)."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(16):
        phase = rng.uniform(0, 2 * math.pi)
        fine = np.sin(np.arange(8)[None, :, None] / 2 + phase + np.arange(6)[:, None, None]) + 1.5
        fine = np.broadcast_to(fine, (6, 8, 8)).astype(np.float32)
        coarse = fine.reshape(6, 4, 2, 4, 2).mean(axis=(2, 4))
        rows.append({"level_0": fine, "level_1": np.concatenate([coarse, coarse]).astype(np.float32),
                     "category": "wide" if index < 12 else "narrow"})
    return ray.data.from_items(rows).materialize()


EPOCHS = 8
"""Long enough that a worker killed after the second checkpoint dies mid-run, not after the last epoch."""


def _method(**options) -> RLR:
    """A tiny model with the CPU recipe, resolved up front (as `train_rlr` does) so `run_name` names its run; every
    image once per epoch unless a test asks for balanced sampling (the repeats add a Ray Data stage to each epoch)."""
    method = RLR(**({"d_model": 16, "heads": 2, "layers": 1, "batch_size": 4, "sampling": "shuffle"} | options))
    method.use_recipe(gpu=False)
    return method


def _training(**settings) -> TrainConfig:
    return TrainConfig(**({"checkpoint_every": 1, "use_gpu": False, "cpus_per_worker": 0.5} | settings))


def _checkpointed_losses(run: Path) -> dict[int, float]:
    progress = [json.loads(path.read_text()) for path in run.glob(f"checkpoint_*/{PROGRESS_FILE}")]
    return {entry["epoch"]: entry["loss"] for entry in progress}


def _registered_checkpoints(run: Path) -> int:
    """Checkpoints the Train controller has registered (its snapshot file): only those survive a worker crash, since
    a report still queued in a killed worker dies with it."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _kill_a_worker_after(run: Path, epochs: int) -> threading.Thread:
    """Kills one training worker's process (SIGKILL) once `epochs` checkpoints are registered: a real crash."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and _registered_checkpoints(run) < epochs:
            time.sleep(0.1)
        # Ray titles each actor's process `ray::<class>...`, so the training workers are found by their command line.
        workers = [process for process in psutil.process_iter(["cmdline"])
                   if "RayTrainWorker" in " ".join(process.info["cmdline"] or [])]
        os.kill(workers[0].pid, signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_two_workers_recover_from_a_killed_worker_and_the_loss_goes_down(features, tmp_path):
    method = _method(epochs=EPOCHS)
    run = tmp_path / "runs" / run_name(method, "stripes")
    killer = _kill_a_worker_after(run, epochs=2)
    fitted = train_rlr(features, method, tmp_path / "runs", _training(num_workers=2, max_failures=1),
                       data_key="stripes")
    killer.join(timeout=5)
    assert fitted.info["epoch"] == EPOCHS
    assert 2 <= fitted.info["resumed_from_epoch"] < EPOCHS  # restarted workers continued from a checkpoint
    assert len(fitted.info["losses"]) == EPOCHS  # the loss history survives the restart
    losses = _checkpointed_losses(run)
    assert sorted(losses) == list(range(1, EPOCHS + 1))
    assert losses[EPOCHS] < 0.8 * losses[1]
    batch = features.take_batch(4)
    scores = fitted.score([torch.from_numpy(batch[key]) for key in ("level_0", "level_1")])
    assert scores.shape == (4, 8, 8)


def test_rerunning_an_interrupted_run_resumes_and_other_options_start_fresh(features, tmp_path, caplog):
    method = _method(epochs=EPOCHS)
    run = tmp_path / run_name(method, "stripes")
    killer = _kill_a_worker_after(run, epochs=2)
    with pytest.raises(ray.train.TrainingFailedError):
        train_rlr(features, method, tmp_path, _training(max_failures=0), data_key="stripes")
    killer.join(timeout=5)
    registered = _registered_checkpoints(run)
    assert 2 <= registered < EPOCHS
    caplog.set_level("INFO", logger="reconray")
    fitted = train_rlr(features, method, tmp_path, _training(max_failures=0), data_key="stripes")
    assert fitted.info["epoch"] == EPOCHS and fitted.info["resumed_from_epoch"] == registered
    assert f"resuming run {run.name}" in caplog.text
    other = _method(epochs=2, lr=1e-3)
    assert run_name(other, "stripes") != run.name and run_name(method, "other data") != run.name
    fresh = train_rlr(features, other, tmp_path, _training(max_failures=0), data_key="stripes")
    assert fresh.info["resumed_from_epoch"] == 0 and fresh.info["epoch"] == 2
    assert f"earlier runs in {tmp_path} used other options or data ({run.name})" in caplog.text


def test_a_time_budget_stops_every_worker_at_the_same_epoch_and_keeps_that_checkpoint(features, tmp_path, caplog):
    caplog.set_level("INFO", logger="reconray")
    method = _method(epochs=EPOCHS, time_budget_s=1e-3)
    fitted = train_rlr(features, method, tmp_path, _training(num_workers=2, checkpoint_every=5, max_failures=0))
    assert fitted.info["epoch"] == 1 and fitted.info["elapsed_s"] >= 1e-3
    assert sorted(_checkpointed_losses(tmp_path / run_name(method, ""))) == [1]  # the epoch it stopped at is kept
    assert f"the time budget of 0.001 s ran out after epoch 1 of {EPOCHS}" in caplog.text


def test_with_a_validation_split_the_best_scoring_checkpoint_is_kept(features, tmp_path, caplog):
    """Two normal and two 'defective' images (a bright square on both levels, its mask at 32 px); every epoch is
    scored and checkpointed, Ray Train keeps the best and the latest, and the model is the best. With patience 2,
    training ends at the first epoch where two scores in a row have not beaten the best before them."""
    rows = features.take_batch(4)
    fine, coarse = rows["level_0"].copy(), rows["level_1"].copy()
    fine[2:, :, 2:5, 2:5] += 4.0
    coarse[2:, :, 1:3, 1:3] += 4.0
    masks = np.zeros((4, 32, 32), np.uint8)
    masks[2:, 8:20, 8:20] = 1
    batch = {"level_0": fine, "level_1": coarse, "category": np.array(["stripes"] * 4), "label": np.array([0, 0, 1, 1]),
             "gt_mask": masks, "content": np.full((4, 2), 32, np.int32)}
    caplog.set_level("INFO", logger="reconray")
    method = _method(epochs=6, patience=2)
    fitted = train_rlr(features, method, tmp_path, _training(max_failures=0, checkpoint_every=10),
                       validation=ValidationFeatures(ray.put([batch]), 32))
    history = fitted.info["validation_history"]
    assert [entry["epoch"] for entry in history][-1] == fitted.info["epoch"]  # history up to the kept epoch
    run = tmp_path / run_name(method, "")
    last = json.loads(max(run.glob(f"checkpoint_*/{PROGRESS_FILE}"), key=lambda path: path.parent.name).read_text())
    scores = {entry["epoch"]: entry["mean_auroc"] for entry in last["validation_history"]}
    assert sorted(scores) == list(range(1, last["epoch"] + 1))  # every epoch was scored
    assert fitted.info["mean_auroc"] == max(scores.values()) == scores[fitted.info["epoch"]]
    assert sum(path.is_dir() for path in run.glob("checkpoint_*")) <= 2 and (run / "validation.png").is_file()
    assert f"rlr: kept epoch {fitted.info['epoch']} of {last['epoch']}, validation mean_auroc" in caplog.text
    curve = [scores[epoch] for epoch in sorted(scores)]
    ran_out = [patience_ran_out(curve[:epoch], 2) for epoch in range(1, len(curve) + 1)]
    assert last["early_stop"] == ran_out[-1] and not any(ran_out[:-1])  # stopped at the first chance, not later
    assert last["early_stop"] or last["epoch"] == 6
    assert ("rlr: early stop after epoch" in caplog.text) == last["early_stop"]


def test_balanced_sampling_reads_every_category_about_as_often_as_the_largest(features):
    survey = _survey(features)
    assert survey.counts == {"wide": 12, "narrow": 4} and survey.channels == [6, 12]
    assert survey.grids == [[8, 8], [4, 4]] and len(survey.statistics[1][0]) == 12  # a mean per channel
    balanced, rows = _sampled(features, "balanced", survey.counts)
    categories = [row["category"] for row in balanced.select_columns(["category"]).take_all()]
    assert rows == len(categories) == 24 and categories.count("wide") == categories.count("narrow") == 12
    assert _sampled(features, "shuffle", survey.counts)[1] == 16
    uncategorised = _survey(features.drop_columns(["category"]))
    assert uncategorised.counts == {"": 16} and _sampled(features, "balanced", uncategorised.counts)[1] == 16


def test_a_single_worker_takes_every_cpu_of_the_node_unless_told_otherwise(ray_session) -> None:
    assert worker_cpus(TrainConfig()) == 2.0  # the session's Ray: one node with 2 CPUs
    assert worker_cpus(TrainConfig(num_workers=2)) == 1.0
    assert worker_cpus(TrainConfig(cpus_per_worker=0.5)) == 0.5
