"""`reconray tune` on a real local Ray Tune: a small sgfr sweep on synthetic data, bad spaces, failing trials."""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from reconray.methods.errors import OptionError
from reconray.pipelines.cli import _fit_setting, _parser, main
from reconray.pipelines.evaluate import evaluate_model
from reconray.pipelines.tune import PRESETS, check_space, load_space, tune_method


@pytest.fixture
def unreadable_test_split(synthetic_root: Path, tmp_path: Path) -> Path:
    """A copy of the session's synthetic data whose test images and masks cannot be opened: tune must not need them."""
    data = Path(shutil.copytree(synthetic_root, tmp_path / "data"))
    for category in ("nut",):
        for path in [*(data / category / "test").rglob("*.png"), *(data / category / "ground_truth").rglob("*.png")]:
            path.write_bytes(b"")  # truncated to nothing: any attempt to decode it fails
            os.chmod(path, stat.S_IWUSR)
    return data


def test_a_four_trial_sgfr_sweep_writes_its_table_and_best_setting(ray_session, unreadable_test_split, tmp_path):
    space = {"k": {"choice": [4, 8]}, "lam": {"loguniform": [0.001, 0.1]}, "basis_ratio": 0.2}
    out = tmp_path / "sweep"
    summary = tune_method(unreadable_test_split, "sgfr", out, space=space, num_samples=4, categories=["nut"],
                          image_size=64, trial_cpus=1.0)
    assert len(summary.trials) == 4 and all(row["status"] == "ok" for row in summary.trials)
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert {"k", "lam", "mean_auroc", "image_auroc", "pixel_auroc", "fit_s", "status"} <= set(rows[0])
    assert all(0.0 <= float(row["mean_auroc"]) <= 1.0 for row in rows)
    assert summary.best_objective == max(float(row["mean_auroc"]) for row in rows)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["method"] == "sgfr" and best["options"]["basis_ratio"] == 0.2 and best["options"]["k"] in (4, 8)
    # best/ is the best setting fitted on the same fit images: scored on the validation split, it gives the objective.
    metrics = evaluate_model(out / "best", out / "validation" / "split.csv", tmp_path / "check")
    mean = metrics["mean"]
    assert (mean["image_auroc"] + mean["pixel_auroc"]) / 2 == pytest.approx(summary.best_objective, abs=1e-6)
    assert json.loads((out / "best" / "config.json").read_text())["options"]["k"] == best["options"]["k"]


def test_bad_search_spaces_are_refused_naming_the_key(tmp_path: Path) -> None:
    cases = {
        "neighbours": ({"neighbours": {"choice": [1, 2]}}, "'neighbours' is not an option of sgfr"),
        "empty range": ({"lam": {"uniform": [0.1, 0.1]}}, "'lam': uniform needs [low, high] numbers with low < high"),
        "wrong type": ({"k": {"choice": [4, "many"]}}, "sgfr.k='many'"),
        "bad kind": ({"k": {"among": [4]}}, "'k': expected one of"),
        "out of range": ({"basis_ratio": 2.0}, "sgfr.basis_ratio=2.0"),
    }
    for name, (space, message) in cases.items():
        with pytest.raises(OptionError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_space("sgfr", space)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(space))
        assert load_space(path) == space
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(OptionError, match="non-empty mapping"):
        load_space(tmp_path / "empty.yaml")
    for method, preset in PRESETS.items():
        check_space(method, preset)  # the documented presets are valid spaces


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
                                  "image_size": 128}
    args = _parser().parse_args(["fit", "--data", "d", "--out", "m", "--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(OptionError, match="missing.yaml: cannot read the fit setting"):
        _fit_setting(args)


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on_and_a_finished_sweep_resumes(
    ray_session, synthetic_root: Path, tmp_path: Path
) -> None:
    """k beyond the basis size cannot be fitted: that trial fails with its error, the other one is the best; rerunning
    the same sweep restores it instead of running its trials again."""
    out = tmp_path / "sweep"
    space = {"k": {"grid": [4, 100_000]}, "basis_ratio": 0.2}
    run = {"space": space, "num_samples": 1, "categories": ["nut"], "image_size": 64}
    first = tune_method(synthetic_root, "sgfr", out, **run)
    by_k = {row["k"]: row for row in first.trials}
    assert by_k[100_000]["status"] == "error" and "needs at least k=100000" in by_k[100_000]["error"]
    assert by_k[4]["status"] == "ok" and first.best_options["k"] == 4
    assert "needs at least k=100000" in (out / "results.md").read_text()
    again = tune_method(synthetic_root, "sgfr", out, **run)
    assert [row["fit_s"] for row in again.trials] == [row["fit_s"] for row in first.trials]  # restored, not rerun


def test_a_sweep_whose_every_trial_fails_is_an_error_with_a_summary(ray_session, synthetic_root, tmp_path) -> None:
    with pytest.raises(OptionError, match=r"every one of the 1 trials failed; errors: \[.*needs at least k=100000"):
        tune_method(synthetic_root, "sgfr", tmp_path / "sweep", space={"k": 100_000}, num_samples=1,
                    categories=["nut"], image_size=64)
    assert (tmp_path / "sweep" / "results.csv").is_file()  # what was computed is kept
