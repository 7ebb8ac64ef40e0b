"""`reconray tune` on a real local Ray Tune: a small sgfr sweep on synthetic data, bad spaces, failing trials."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from ray import tune

from reconray.methods.errors import OptionError
from reconray.pipelines.cli import _fit_setting, _parser, main
from reconray.pipelines.evaluate import evaluate_model
from reconray.pipelines.tune import (
    PRESETS,
    check_space,
    distinct_settings,
    load_space,
    parameter_influence,
    tune_method,
)


@pytest.fixture
def unreadable_test_split(synthetic_root: Path, tmp_path: Path) -> Path:
    """A copy of the session's synthetic data whose test images and masks cannot be opened: tune must not need them."""
    data = Path(shutil.copytree(synthetic_root, tmp_path / "data"))
    for category in ("nut",):
        for path in [*(data / category / "test").rglob("*.png"), *(data / category / "ground_truth").rglob("*.png")]:
            path.write_bytes(b"")  # truncated to nothing: any attempt to decode it fails
            os.chmod(path, stat.S_IWUSR)
    return data


def test_a_four_trial_sgfr_sweep_in_a_bucket_writes_its_table_and_best_setting(ray_session, unreadable_test_split,
                                                                               bucket, tmp_path):
    """Optuna's sampler here (the random and grid search in the other sweeps); the test images cannot be opened;
    `--out` is an s3:// URI on the loopback S3 server, so the sweep's state, the painted validation split, the
    results and best/ all go to the bucket. The feature aggregation is searched too: features are extracted once per
    setting, and best/ is fitted on its own."""
    import s3fs

    space = {"k": {"choice": [4, 8]}, "lam": {"loguniform": [0.001, 0.1]}, "basis_ratio": 0.2,
             "aggregation": {"choice": ["pool-align", "align-pool"]}}
    uri = f"{bucket}/sweep"
    summary = tune_method(unreadable_test_split, "sgfr", uri, space=space, num_samples=4, categories=["nut"],
                          image_size=64, trial_cpus=1.0, search="optuna")
    assert len(summary.trials) == 4 and all(row["status"] == "ok" for row in summary.trials)
    assert str(summary.out_dir) == uri
    assert tune.Tuner.can_restore(f"{uri}/sweep")  # rerunning the command resumes from the bucket
    filesystem, out = s3fs.S3FileSystem(skip_instance_cache=True), tmp_path / "sweep"
    root = uri.removeprefix("s3://")
    for name in ("objective.png", "results.csv", "best.yaml", "best/config.json"):
        filesystem.get_file(f"{root}/{name}", str(_made(out / name)))
    assert filesystem.glob(f"{root}/sweep/searcher-state-*")  # Tune saved the Optuna searcher's state with the sweep
    with Image.open(out / "objective.png") as plot:
        assert plot.size == (880, 720)  # trials in order, then the objective against the two searched parameters
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert {"k", "lam", "aggregation", "mean_auroc", "image_auroc", "pixel_auroc", "fit_s", "status"} <= set(rows[0])
    assert all(0.0 <= float(row["mean_auroc"]) <= 1.0 for row in rows)
    assert summary.best_objective == max(float(row["mean_auroc"]) for row in rows)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["method"] == "sgfr" and best["options"]["basis_ratio"] == 0.2 and best["options"]["k"] in (4, 8)
    # best/ is the best setting fitted on the same fit images: scored on the validation split, it gives the objective.
    metrics = evaluate_model(f"{uri}/best", f"{uri}/validation/split.csv", tmp_path / "check")
    mean = metrics["mean"]
    assert (mean["image_auroc"] + mean["pixel_auroc"]) / 2 == pytest.approx(summary.best_objective, abs=1e-6)
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["options"]["k"] == best["options"]["k"] and config["spec"]["aggregation"] == best["aggregation"]


def _made(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_bad_search_spaces_are_refused_naming_the_key(tmp_path: Path) -> None:
    cases = {
        "neighbours": ({"neighbours": {"choice": [1, 2]}}, "'neighbours' is not an option of sgfr"),
        "empty range": ({"lam": {"uniform": [0.1, 0.1]}}, "'lam': uniform needs [low, high] numbers with low < high"),
        "wrong type": ({"k": {"choice": [4, "many"]}}, "sgfr.k='many'"),
        "bad kind": ({"k": {"among": [4]}}, "'k': expected one of"),
        "out of range": ({"basis_ratio": 2.0}, "sgfr.basis_ratio=2.0"),
        "aggregation": ({"aggregation": {"choice": ["pool-align", "max"]}}, "'aggregation': 'max' is not one of"),
        "pool": ({"pool": {"grid": [3, 4]}}, "'pool': 4 is not an odd window side"),
    }
    for name, (space, message) in cases.items():
        with pytest.raises(OptionError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_space("sgfr", space)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(space))
        assert load_space(path) == space
    with pytest.raises(OptionError, match=r"--search optuna samples its own points: search space key\(s\) \['k'\]"):
        tune_method(tmp_path, "sgfr", tmp_path / "out", space={"k": {"grid": [4, 8]}}, search="optuna")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(OptionError, match="non-empty mapping"):
        load_space(tmp_path / "empty.yaml")
    for method, preset in PRESETS.items():
        check_space(method, preset)  # the documented presets are valid spaces


def test_a_space_of_choices_is_drawn_without_repeats_and_reproducibly() -> None:
    """patchcore's preset holds 20 settings: 16 trials try 16 different ones, 30 trials each of the 20 once, the same
    ones for the same seed. A continuous range or a grid keeps Tune's own sampling (None)."""
    preset = PRESETS["patchcore"]
    drawn = distinct_settings(preset, 16, seed=0)
    keys = [tuple(sorted(setting.items())) for setting in drawn]
    assert len(keys) == len(set(keys)) == 16
    assert all(setting["coreset_ratio"] in preset["coreset_ratio"]["choice"] and setting["nprobe"] in
               preset["nprobe"]["choice"] for setting in drawn)
    assert distinct_settings(preset, 16, seed=0) == drawn != distinct_settings(preset, 16, seed=1)
    everything = distinct_settings(preset | {"recall_target": 0.95}, 30, seed=0)
    assert len({tuple(sorted(setting.items())) for setting in everything}) == len(everything) == 20
    assert distinct_settings(PRESETS["sgfr"], 16, seed=0) is None  # lam is loguniform
    assert distinct_settings({"k": {"grid": [4, 8]}, "tau": {"choice": [0.0, 0.5]}}, 4, seed=0) is None


def test_the_cli_refuses_a_bad_space_before_any_trial(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"k": {"uniform": [8, 4]}}))
    code = main(["tune", "--data", str(tmp_path), "--method", "sgfr", "--out", str(tmp_path / "out"), "--space",
                 str(space)])
    assert code == 2
    assert "'k': uniform needs [low, high] numbers with low < high, got [8, 4]" in capsys.readouterr().err


def test_fit_config_takes_the_best_setting_and_the_command_line_wins(tmp_path: Path) -> None:
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"method": "sgfr", "options": {"k": 16, "lam": 0.05}, "image_size": 128}))
    args = _parser().parse_args(["fit", "--data", "d", "--out", "m", "--config", str(best), "--set", "k=4"])
    assert _fit_setting(args) == {"method": "sgfr", "options": {"k": "4", "lam": 0.05}, "levels": [2, 3],
                                  "image_size": 128, "aggregation": "pool-align", "pool": 3,
                                  "resize": "square", "tile": None}
    best.write_text(yaml.safe_dump({"method": "sgfr", "aggregation": "align-pool", "pool": 5}))
    args = _parser().parse_args(["fit", "--data", "d", "--out", "m", "--config", str(best), "--pool", "1"])
    assert (_fit_setting(args)["aggregation"], _fit_setting(args)["pool"]) == ("align-pool", 1)
    args = _parser().parse_args(["fit", "--data", "d", "--out", "m", "--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(OptionError, match="missing.yaml: cannot read the fit setting"):
        _fit_setting(args)


def test_a_sweep_whose_every_trial_fails_is_an_error_with_a_summary(ray_session, synthetic_root, tmp_path) -> None:
    with pytest.raises(OptionError, match=r"every one of the 1 trials failed; errors: \[.*needs at least k=100000"):
        tune_method(synthetic_root, "sgfr", tmp_path / "sweep", space={"k": 100_000}, num_samples=1,
                    categories=["nut"], image_size=64)
    assert (tmp_path / "sweep" / "results.csv").is_file()  # what was computed is kept


def test_an_rlr_asha_sweep_stops_the_weak_trial_early(ray_session, synthetic_root: Path, tmp_path: Path) -> None:
    """Each rlr trial drives a TorchTrainer whose worker scores the validation split every epoch; at a learning rate
    that barely moves the weights, the second trial falls far below the first by ASHA's rung at epoch 4 of 6 (rungs
    1, 2, 4) and is stopped there (the reference recipe: one learning rate for every weight, the reference's too)."""
    out = tmp_path / "sweep"
    space = {"lr": {"grid": [3e-3, 1e-6]}, "d_model": 32, "heads": 4, "layers": 1, "epochs": 6, "recipe": "reference"}
    summary = tune_method(synthetic_root, "rlr", out, space=space, num_samples=1, max_concurrent=1,
                          categories=["nut"], image_size=64)
    by_lr = {row["lr"]: row for row in summary.trials}
    assert by_lr[3e-3]["status"] == "ok" and by_lr[3e-3]["epoch"] == 6 and by_lr[3e-3]["threshold"] is not None
    assert by_lr[1e-6]["status"] == "stopped" and by_lr[1e-6]["epoch"] < 6 and by_lr[1e-6]["fit_s"] is None
    assert summary.best_options["lr"] == 3e-3 and "stopped" in (out / "results.md").read_text()
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["method"] == "rlr" and config["options"]["lr"] == 3e-3 and config["threshold"] is not None
    assert (out / "objective.png").is_file()


@pytest.mark.integration  # the first sweep runs in a subprocess, killed with its Ray
def test_a_killed_sweep_resumes_records_a_failing_trial_and_a_finished_sweep_is_restored(
    ray_session, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The driver is SIGKILLed (with the Ray it started) once a trial has finished; the same command resumes the
    sweep without rerunning that trial. k beyond the basis size cannot be fitted: that trial is recorded as failed
    with its error and the sweep goes on. Rerunning the finished sweep restores it instead of running trials again."""
    out = tmp_path / "sweep"
    command = ["tune", "--data", str(synthetic_root), "--method", "sgfr", "--out", str(out), "--space",
               str(tmp_path / "space.yaml"), "--num-samples", "1", "--max-concurrent", "1", "--categories", "nut",
               "--image-size", "64"]
    # Six trials: Tune saves its state every few seconds, so a sweep of three could end before a kill sees the first.
    grid = [4, 100_000, 8, 12, 16, 24]
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"k": {"grid": grid}, "basis_ratio": 0.2}))
    # Tune then saves the sweep's state every second (by default it spaces its saves out to a share of the run
    # time, which on a fast machine let a whole sweep finish before the first save showed a finished trial).
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {"TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "reconray.pipelines.cli", *command], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not _terminated_trials(out / "sweep"):
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "no trial finished within 240 s"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-sweep
        driver.wait()
    finished = _terminated_trials(out / "sweep")
    assert not (out / "results.csv").exists()
    assert main(command) == 0
    rows = _results(out)
    assert sorted(rows) == sorted(grid)
    assert rows[100_000]["status"] == "error" and "needs at least k=100000" in rows[100_000]["error"]
    assert all(rows[k]["status"] == "ok" for k in grid if k != 100_000)
    assert "needs at least k=100000" in (out / "results.md").read_text()
    by_id = {row["trial_id"]: row for row in rows.values()}
    for trial_id, fit_s in finished.items():  # kept from before the kill, not run again
        assert float(by_id[trial_id]["fit_s"]) == fit_s
    assert main(command) == 0
    assert "resuming the sweep" in capsys.readouterr().err
    assert _results(out) == rows  # restored, not rerun


def _results(out: Path) -> dict[int, dict[str, str]]:
    with (out / "results.csv").open() as handle:
        return {int(row["k"]): row for row in csv.DictReader(handle)}


def _terminated_trials(sweep: Path) -> dict[str, float]:
    """Trial id -> fit_s of the trials the sweep's saved state records as finished."""
    finished = {}
    for path in sweep.glob("experiment_state-*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # being rewritten
            continue
        for trial, runtime in state["trial_data"]:
            trial, runtime = json.loads(trial), json.loads(runtime)
            if trial.get("status") == "TERMINATED":
                finished[trial["trial_id"]] = runtime["last_result"]["fit_s"]
    return finished


def test_parameter_influence_ranks_what_the_objective_follows() -> None:
    rows = [{"lr": lr, "kind": kind, "fixed": 1, "status": "ok", "objective": objective}
            for lr, kind, objective in ((1e-4, "a", 0.5), (1e-3, "b", 0.7), (1e-2, "a", 0.6), (1e-1, "b", 0.9))]
    rows.append({"lr": 1.0, "kind": "a", "fixed": 1, "status": "error", "objective": None})  # failed: ignored
    influence = parameter_influence(rows, ["kind", "lr", "fixed"])
    assert list(influence) == ["kind", "lr", "fixed"]  # strongest first
    assert influence["lr"] == pytest.approx(0.8)  # Spearman of ranks (1, 3, 2, 4) against (1, 2, 3, 4)
    # kind: group means 0.55 (a) and 0.8 (b) around 0.675; between 4 * 0.125^2 = 0.0625, total 0.0875
    assert influence["kind"] == pytest.approx((0.0625 / 0.0875) ** 0.5)
    assert influence["fixed"] == 0.0
