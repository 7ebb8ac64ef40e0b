"""RLR on a real local Ray Train: two workers, a worker that fails mid-run, and a run resumed by re-running it."""

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.train
import torch

from reconray.methods.rlr import RLR
from reconray.pipelines.train_rlr import PROGRESS_FILE, train_rlr


@pytest.fixture(scope="module")
def features(ray_session) -> ray.data.Dataset:
    """16 'normal images' as two feature levels (6x8x8 and 12x4x4): stripes at random phases, like textures."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        phase = rng.uniform(0, 2 * math.pi)
        fine = np.sin(np.arange(8)[None, :, None] / 2 + phase + np.arange(6)[:, None, None]) + 1.5
        fine = np.broadcast_to(fine, (6, 8, 8)).astype(np.float32)
        coarse = fine.reshape(6, 4, 2, 4, 2).mean(axis=(2, 4))
        rows.append({"level_0": fine, "level_1": np.concatenate([coarse, coarse]).astype(np.float32)})
    return ray.data.from_items(rows).materialize()


def _method(**options) -> RLR:
    settings = {
        "d_model": 16,
        "heads": 2,
        "layers": 1,
        "lr": 3e-3,
        "jitter": 1.0,
        "batch_size": 4,
        "checkpoint_every": 1,
        "use_gpu": False,
        "cpus_per_worker": 0.5,
    }
    return RLR(**(settings | options))


def _fail_once_at(epoch: int, marker: Path) -> Callable[[int], None]:
    """A `before_epoch` hook that raises the first time any worker reaches `epoch` (a marker file remembers it).

    A nested function, so Ray pickles it by value and the workers need not import this test module.
    """

    def before_epoch(current: int) -> None:
        if current == epoch and not marker.exists():
            marker.touch()
            raise RuntimeError(f"injected worker failure at epoch {epoch}")

    return before_epoch


def _checkpointed_losses(run_dir: Path, name: str) -> dict[int, float]:
    progress = [json.loads(path.read_text()) for path in (run_dir / name).glob(f"checkpoint_*/{PROGRESS_FILE}")]
    return {entry["epoch"]: entry["loss"] for entry in progress}


def test_two_workers_recover_from_a_worker_failure_and_the_loss_goes_down(features, tmp_path):
    marker = tmp_path / "failed-once"
    method = _method(epochs=4, num_workers=2, max_failures=1)
    fitted = train_rlr(features, method, tmp_path / "runs", name="unified", before_epoch=_fail_once_at(2, marker))
    assert marker.exists()  # the failure really happened
    assert fitted.info["epoch"] == 4
    assert fitted.info["resumed_from_epoch"] == 2  # restarted workers continued from the epoch-2 checkpoint
    losses = _checkpointed_losses(tmp_path / "runs", "unified")
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < 0.8 * losses[1]
    batch = features.take_batch(4)
    scores = fitted.score([torch.from_numpy(batch[key]) for key in ("level_0", "level_1")])
    assert scores.shape == (4, 8, 8)


def test_rerunning_an_interrupted_run_resumes_from_its_last_checkpoint(features, tmp_path):
    method = _method(epochs=3, num_workers=1, max_failures=0)
    with pytest.raises(ray.train.TrainingFailedError):
        train_rlr(features, method, tmp_path, name="interrupted", before_epoch=_fail_once_at(2, tmp_path / "marker"))
    assert sorted(_checkpointed_losses(tmp_path, "interrupted")) == [1, 2]
    fitted = train_rlr(features, method, tmp_path, name="interrupted")
    assert fitted.info["epoch"] == 3
    assert fitted.info["resumed_from_epoch"] == 2


def test_a_worker_holding_every_cpu_still_gets_its_features(features, tmp_path):
    """One worker reserving both CPUs of the session leaves Ray Data none for read tasks: the features must still
    reach it (materialized first) instead of the run waiting forever on a stream that cannot start."""
    features.write_parquet(str(tmp_path / "cache"))
    streamed = ray.data.read_parquet(str(tmp_path / "cache"))
    method = _method(epochs=2, num_workers=1, cpus_per_worker=2.0, max_failures=0)
    fitted = train_rlr(streamed, method, tmp_path / "runs", name="all-cpus")
    assert fitted.info["epoch"] == 2
    assert sorted(_checkpointed_losses(tmp_path / "runs", "all-cpus")) == [1, 2]
