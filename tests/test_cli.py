"""The `reconray` command line end to end on a real local Ray, every bad-input case, and RAY_ADDRESS handling."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reconray.methods.artifact import load_artifact, read_config
from reconray.methods.metrics import METRIC_NAMES
from reconray.pipelines import run
from reconray.pipelines.cli import main
from reconray.pipelines.report import FIGURE_GAP, FIGURE_MIN_PANEL
from reconray.pipelines.synthetic import SyntheticConfig

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["fabric", "nut"]
TIMING_KEYS = {"extract_ms_per_image", "score_ms_per_image", "fit_s", "fit_stages_s", "bank_vectors", "bank_bytes",
               "search"}


def _figure_width(panels: int) -> int:
    """Width of a heatmap figure of 64 px maps: `panels` enlarged panels with the gaps around them."""
    return panels * (FIGURE_MIN_PANEL + FIGURE_GAP) + FIGURE_GAP


def _cli(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _write_csv(path: Path, rows: list[tuple[str, str, str, Path, Path | None]]) -> Path:
    """A VisA-style split CSV with absolute paths (rows: object, split, label, image, mask)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows([(obj, split, label, str(image), str(mask) if mask else "")
                          for obj, split, label, image, mask in rows])
    return path


def _only_the_log(out: Path) -> bool:
    """A refused command leaves nothing in its output folder but its log, which names the problem."""
    names = sorted(path.name for path in out.iterdir())
    return names == ["reconray.log"] and "error" in (out / "reconray.log").read_text()


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_model(ray_session, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`reconray fit` on two of the three synthetic categories (64 px, half-size coreset), one training image broken.

    The data is a copy of the session's synthetic dataset with a truncated PNG among nut's training images, fitted
    with `--on-bad-image skip`.
    """
    work = tmp_path_factory.mktemp("cli")
    data = Path(shutil.copytree(synthetic_root, work / "data"))
    broken = data / "nut" / "train" / "good" / "999.png"
    broken.write_bytes((data / "nut" / "train" / "good" / "000.png").read_bytes()[:300])
    code = main(["fit", "--data", str(data), "--method", "patchcore", "--out", str(work / "model"),
                 "--categories", ",".join(CATEGORIES), "--image-size", "64", "--set", "coreset_ratio=0.5",
                 "--on-bad-image", "skip"])
    assert code == 0
    return work / "model"


def test_fit_writes_an_artifact_for_the_chosen_categories(cli_model: Path) -> None:
    config = read_config(cli_model)
    assert config.categories == CATEGORIES and config.spec.image_size == 64
    assert config.options["coreset_ratio"] == 0.5
    # 10 training images per category, 1 held out for the threshold: 18 images x 8x8 patches, half of them kept.
    assert config.fit.n_fit == 18 and config.fit.n_calibration == 2
    assert config.bank_vectors == 18 * 64 // 2
    assert isinstance(config.threshold, float) and config.threshold > 0
    # One held-out image per category: each category's threshold is its image's score, the global one their quantile.
    assert sorted(config.category_thresholds) == CATEGORIES
    assert config.threshold == pytest.approx(np.quantile(list(config.category_thresholds.values()), 0.99))
    assert len(set(config.category_thresholds.values())) == 2
    (skipped,) = config.fit.skipped
    assert skipped["image"].endswith("/nut/train/good/999.png") and skipped["problem"].startswith("unreadable image")
    # Training byproducts and the log live beside the artifact, never in it.
    assert sorted(path.name for path in cli_model.iterdir()) == ["bank.faiss", "config.json"]
    assert (cli_model.parent / "model-work" / "reconray.log").is_file()


def test_evaluate_writes_metrics_report_and_heatmaps(
    cli_model: Path, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = _cli(capsys, "evaluate", "--model", cli_model, "--data", synthetic_root, "--out", tmp_path,
                          "--categories", ",".join(CATEGORIES))
    assert code == 0, err
    summary = re.search(r"^mean +(0\.\d{3}) +(0\.\d{3})", err, re.MULTILINE)  # the console's summary table
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert summary and float(summary[1]) == round(metrics["mean"]["image_auroc"], 3)
    assert {"method", "backbone", "categories", "mean", "timing"} <= set(metrics)
    assert (metrics["method"], metrics["backbone"]) == ("patchcore", "tf_efficientnet_lite0")
    assert sorted(metrics["categories"]) == CATEGORIES
    for values in [*metrics["categories"].values(), metrics["mean"]]:
        assert set(METRIC_NAMES) <= set(values)
        assert all(0.0 <= values[name] <= 1.0 for name in METRIC_NAMES)
    for values in metrics["categories"].values():
        assert (values["n_images"], values["n_anomalous"]) == (8, 4)
    # Measured: mean image AUROC 0.84, pixel AUROC 0.67 (64 px, 9 training images per category); above chance.
    assert metrics["mean"]["image_auroc"] > 0.65 and metrics["mean"]["pixel_auroc"] > 0.55
    assert set(metrics["timing"]) == TIMING_KEYS
    timing = metrics["timing"]
    assert timing["extract_ms_per_image"] > 0 and timing["score_ms_per_image"] > 0 and timing["fit_s"] > 0
    assert timing["bank_vectors"] == 18 * 64 // 2 and timing["bank_bytes"] > timing["bank_vectors"] * 152 * 4

    # Each category is decided by its own calibrated threshold.
    thresholds, scores = read_config(cli_model).category_thresholds, json.loads((tmp_path / "scores.json").read_text())
    for name in CATEGORIES:
        decided = metrics["decisions"][name]
        assert decided["threshold"] == thresholds[name]
        normal = [entry["score"] for entry in scores[name] if not entry["label"]]
        anomalous = [entry["score"] for entry in scores[name] if entry["label"]]
        assert decided["false_alarms"] == sum(score > thresholds[name] for score in normal)
        assert decided["caught"] == sum(score > thresholds[name] for score in anomalous)
        assert (decided["normal"], decided["anomalous"]) == (4, 4)

    report = (tmp_path / "report.md").read_text()
    assert "| **mean** |" in report and all(f"| {name} |" in report for name in CATEGORIES)
    assert "## Decisions at the threshold" in report
    first = CATEGORIES[0]
    assert f"| {first} | {thresholds[first]:.4g} | {metrics['decisions'][first]['false_alarms']} / 4 |" in report
    links = re.findall(r"\]\((heatmaps/[^)]+)\)", report)
    assert {Path(link).parts[1] for link in links} == set(CATEGORIES)
    assert len(set(links)) == 4 * len(CATEGORIES)
    # Figures: input | ground-truth contour (defective images, which have a mask) | overlay, under a header band.
    figures = re.findall(r"!\[(anomalous|normal) [^]]+\]\((heatmaps/[^)]+)\)", report)
    assert len(figures) == 4 * len(CATEGORIES)
    for label, link in figures:
        with Image.open(tmp_path / link) as heatmap:
            assert heatmap.format == "PNG" and heatmap.width == _figure_width(3 if label == "anomalous" else 2)
            assert heatmap.height > FIGURE_MIN_PANEL + FIGURE_GAP
    # The training image the fit skipped (see test_fit) is listed, marked as skipped in the fit.
    assert "## Skipped images" in report and "unreadable image (image file is truncated) (skipped in fit)" in report


def test_predict_writes_predictions_and_overlays(
    cli_model: Path, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, pixels
) -> None:
    images = [synthetic_root / "nut" / "test" / "good" / "000.png", synthetic_root / "fabric" / "test" / "hole" /
              "000.png"]
    code, out, err = _cli(capsys, "predict", "--model", cli_model, "--out", tmp_path, *images)
    assert code == 0, err
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    threshold = read_config(cli_model).threshold
    assert [entry["image"] for entry in predictions] == [str(image.resolve()) for image in images]
    for entry in predictions:
        assert set(entry) == {"image", "score", "is_anomalous", "threshold", "heatmap"}
        assert entry["threshold"] == threshold and entry["is_anomalous"] == (entry["score"] > threshold)
        with Image.open(entry["heatmap"]) as heatmap:  # input | overlay: predict has no masks
            assert heatmap.format == "PNG" and heatmap.width == _figure_width(2)
        assert re.search(rf"^{re.escape(entry['image'])} +{entry['score']:.3f} ", err, re.MULTILINE)
    reference = load_artifact(cli_model).scorer()(pixels(images)).image_scores.numpy()
    np.testing.assert_allclose([entry["score"] for entry in predictions], reference, rtol=1e-5)


def test_predict_decides_with_a_categorys_threshold(
    cli_model: Path, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = synthetic_root / "fabric" / "test" / "good" / "000.png"
    config = read_config(cli_model)
    code, _, err = _cli(capsys, "predict", "--model", cli_model, "--out", tmp_path, "--category", "fabric", image)
    assert code == 0, err
    [entry] = json.loads((tmp_path / "predictions.json").read_text())
    assert entry["threshold"] == config.category_thresholds["fabric"] != config.threshold
    assert entry["is_anomalous"] == (entry["score"] > entry["threshold"])
    code, _, err = _cli(capsys, "predict", "--model", cli_model, "--out", tmp_path / "x", "--category", "wood", image)
    assert code == 2 and "unknown category 'wood': the model was fitted on ['fabric', 'nut']" in err



def test_add_to_extends_a_model_leaving_the_old_categories_scores_unchanged(
    cli_model: Path, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, pixels
) -> None:
    """`fit --add-to` adds wood to the fabric + nut model as a new part: a new artifact whose old categories score
    bit for bit as before (evaluate's scores.json) and keep their thresholds, and whose new category gets its own."""
    extended = tmp_path / "extended"
    code, _, err = _cli(capsys, "fit", "--add-to", cli_model, "--data", synthetic_root, "--categories", "wood",
                        "--out", extended)
    assert code == 0, err
    old, new = read_config(cli_model), read_config(extended)
    assert new.categories == ["fabric", "nut", "wood"] and new.method == "patchcore" and new.spec == old.spec
    assert new.fit.extends == load_artifact(cli_model).sha256 and new.fit.n_fit == 9
    assert [part["categories"] for part in new.method_info["parts"]] == [CATEGORIES, ["wood"]]
    assert new.bank_vectors == old.bank_vectors + 9 * 64 // 2  # wood's own half-size coreset
    assert {name: new.category_thresholds[name] for name in CATEGORIES} == old.category_thresholds
    assert "wood" in new.category_thresholds and new.threshold >= old.threshold
    assert read_config(cli_model) == old  # the model extended is left as it was

    scores = {}
    for name, model in (("old", cli_model), ("new", extended)):
        code, _, err = _cli(capsys, "evaluate", "--model", model, "--data", synthetic_root, "--out", tmp_path / name,
                            "--categories", ",".join(CATEGORIES))
        assert code == 0, err
        scores[name] = json.loads((tmp_path / name / "scores.json").read_text())
    assert scores["new"] == scores["old"]

    image = synthetic_root / "wood" / "test" / "good" / "000.png"
    code, _, err = _cli(capsys, "predict", "--model", extended, "--out", tmp_path / "wood", "--category", "wood", image)
    assert code == 0, err
    [entry] = json.loads((tmp_path / "wood" / "predictions.json").read_text())
    assert entry["threshold"] == new.category_thresholds["wood"]
    scorer = load_artifact(extended).scorer()
    by_wood, by_every_part = (float(scorer(pixels([image]), categories).image_scores[0]) for categories in (["wood"],
                                                                                                           None))
    assert entry["score"] == pytest.approx(by_wood, rel=1e-5) and by_every_part <= by_wood

    code, _, err = _cli(capsys, "fit", "--add-to", extended, "--data", synthetic_root, "--categories", "nut,wood",
                        "--out", tmp_path / "again")
    assert code == 2 and "categories ['nut', 'wood'] of" in err and "are already in the model" in err
    code, _, err = _cli(capsys, "fit", "--add-to", extended, "--data", synthetic_root, "--method", "sgfr",
                        "--image-size", "64", "--out", tmp_path / "again")
    assert code == 2 and "drop ['--method', '--image-size']" in err
    assert not (tmp_path / "again" / "config.json").exists()

def test_skipped_image_is_listed_in_the_report(
    cli_model: Path, synthetic_root: Path, files, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    nut = synthetic_root / "nut"
    broken = files.truncated("broken/001.png", size=(64, 64))
    table = _write_csv(tmp_path / "split.csv", [
        ("nut", "test", "normal", nut / "test" / "good" / "000.png", None),
        ("nut", "test", "normal", broken, None),
        ("nut", "test", "anomaly", nut / "test" / "scratch" / "000.png",
         nut / "ground_truth" / "scratch" / "000_mask.png"),
    ])
    code, _, err = _cli(capsys, "evaluate", "--model", cli_model, "--data", table, "--out", tmp_path / "strict")
    assert code == 2 and f"{broken}: unreadable image" in err
    assert _only_the_log(tmp_path / "strict")
    code, _, err = _cli(capsys, "evaluate", "--model", cli_model, "--data", table, "--out", tmp_path / "eval",
                        "--on-bad-image", "skip")
    assert code == 0, err
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Skipped images" in report and f"- `{broken}`: unreadable image" in report
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [entry["image"] for entry in metrics["skipped"]] == [str(broken)]
    assert metrics["categories"]["nut"]["n_images"] == 2


# --- bad input -----------------------------------------------------------------------------------------------------


def _bad_fit_data(files, case: str) -> tuple[Path, str]:
    """Builds a broken training set; returns the `--data` path and the text the error must contain."""
    if case == "truncated":
        files.image("parts/good.png")
        broken = files.truncated("parts/broken.jpg")
        return files.root / "parts", f"{broken}: unreadable image"
    if case == "unknown_layout":
        (files.root / "odd" / "notes").mkdir(parents=True)
        return files.root / "odd", f"{files.root / 'odd'}: unknown layout"
    root = files.mvtec("mvtec", categories=("bottle", "grid"))
    for image in (root / "grid" / "train" / "good").iterdir():
        image.unlink()
    return root, "empty train split for categories ['grid']"


@pytest.mark.parametrize("case", ["truncated", "unknown_layout", "empty_split"])
def test_fit_refuses_bad_input(files, tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    data, message = _bad_fit_data(files, case)
    code, _, err = _cli(capsys, "fit", "--data", data, "--method", "patchcore", "--out", tmp_path / "model")
    assert code == 2
    assert err.splitlines()[-1].startswith("reconray fit: error: ") and message in err  # one line, last
    assert not (tmp_path / "model").exists()


def _bad_test_data(files, case: str) -> tuple[Path, str]:
    """Builds a broken test set; returns the `--data` path and the text the error must contain."""
    root = files.mvtec("mvtec", categories=("bottle",))
    mask = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    if case == "missing_mask":
        mask.unlink()
        return root, f"{mask}: defective test image has no mask file"
    if case == "mask_size":
        files.mask(mask, size=(16, 16))
        return root, f"{mask}: mask size (16, 16) differs from image size (32, 24)"
    if case == "truncated":
        broken = files.truncated(root / "bottle" / "test" / "good" / "000.png")
        return root, f"{broken}: unreadable image"
    files.image("parts/a.png")
    return files.root / "parts", "empty test split for categories ['parts']"


@pytest.mark.parametrize("case", ["missing_mask", "mask_size", "truncated", "empty_split"])
def test_evaluate_refuses_bad_input(
    fitted_model: Path, files, tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    data, message = _bad_test_data(files, case)
    code, _, err = _cli(capsys, "evaluate", "--model", fitted_model, "--data", data, "--out", tmp_path / "eval")
    assert code == 2
    assert err.splitlines()[-1].startswith("reconray evaluate: error: ") and message in err
    assert _only_the_log(tmp_path / "eval")


def test_predict_and_model_errors(fitted_model: Path, files, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = files.truncated("broken.png")
    code, _, err = _cli(capsys, "predict", "--model", fitted_model, "--out", tmp_path / "pred", broken)
    assert code == 2 and f"{broken}: unreadable image" in err
    code, _, err = _cli(capsys, "predict", "--model", tmp_path, "--out", tmp_path / "pred", broken)
    assert code == 2 and f"{tmp_path}: not a reconray model" in err
    code, _, err = _cli(capsys, "predict", "--model", fitted_model, "--out", tmp_path / "pred", tmp_path / "nope.png")
    assert code == 2 and f"{tmp_path / 'nope.png'}: no such file or folder" in err
    code, _, err = _cli(capsys, "predict", "--model", fitted_model, "--out", tmp_path / "pred", f"{tmp_path}/*.jpg")
    assert code == 2 and f"{tmp_path}/*.jpg: pattern matches no image files" in err
    # Bad settings are refused before any image is read: the data folder here holds none at all.
    for method, setting, message in [
        ("patchcore", ["--set", "coreset_ratio"], "--set expects key=value, got 'coreset_ratio'"),
        ("patchcore", ["--set", "neighbours=3"], "unknown option(s) ['neighbours'] for method 'patchcore'"),
        ("patchcore", ["--set", "index=foo"], "invalid option patchcore.index='foo': Input should be 'auto', 'flat' or "
                                              "'ivf'"),
        ("rlr", ["--num-workers", "0"], "num_workers: Input should be greater than or equal to 1"),
    ]:
        code, _, err = _cli(capsys, "fit", "--data", tmp_path, "--method", method, "--out", tmp_path / "m", *setting)
        assert code == 2 and message in err, err


@pytest.mark.integration  # starts reconray in a subprocess
def test_console_process_exits_non_zero_with_the_error_on_stderr(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "reconray.pipelines.cli", "fit", "--data", str(empty), "--method", "patchcore", "--out",
         str(tmp_path / "model")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert f"reconray fit: error: {empty}: unknown layout" in result.stderr


@pytest.mark.integration  # starts reconray in a subprocess, as a user's terminal would
def test_the_console_shows_reconray_lines_and_ray_output_goes_to_the_log(synthetic_root: Path, tmp_path: Path) -> None:
    command = [str(Path(sys.executable).with_name("reconray")), "fit", "--data", str(synthetic_root), "--method",
               "patchcore", "--out", str(tmp_path / "model"), "--categories", "nut", "--image-size", "64"]
    quiet = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    lines = [line for line in quiet.stderr.splitlines() if line.strip()]
    assert "started a local Ray with 2 CPUs" in lines and lines[0].startswith("validate images: 10 images in")
    assert lines[-1].startswith("fit patchcore: done in")
    assert len(lines) <= 8 and not quiet.stdout.strip()
    for noise in ("INFO", "WARNING", "streaming_executor", "core_worker", "(raylet)", "pid="):
        assert noise not in quiet.stderr, f"{noise!r} reached the console:\n{quiet.stderr}"
    log = (tmp_path / "model-work" / "reconray.log").read_text()
    assert "streaming_executor" in log and "fit patchcore: done in" in log
    # --verbose puts Ray's output on the console too (a one-image predict: any command's Ray Data pass shows it).
    image = synthetic_root / "nut" / "test" / "good" / "000.png"
    verbose = subprocess.run([command[0], "predict", "--model", str(tmp_path / "model"), "--out",
                              str(tmp_path / "predictions"), str(image), "--verbose"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 0 and "streaming_executor" in verbose.stderr


def test_a_bug_keeps_its_traceback_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(run, "run_default", broken)
    code, _, err = _cli(capsys, "run", "--out", tmp_path / "run")
    assert code == 1
    assert "internal error" in err and "Traceback" in err and "ZeroDivisionError: a bug, not a user error" in err
    assert "ZeroDivisionError" in (tmp_path / "run" / "reconray.log").read_text()


def test_run_default_compares_every_method_on_a_tiny_synthetic_set(ray_session, tmp_path: Path, caplog) -> None:
    """The main job for real at 64 px: data, three fits, three evaluations, one report with ROC plots, a summary."""
    caplog.set_level("INFO", logger="reconray")
    synthetic = SyntheticConfig(image_size=64, n_train=10, n_test_good=4, n_test_defect=4, categories=("nut", "fabric"))
    options = {"patchcore": {"coreset_ratio": 0.5}, "sgfr": {},
               "rlr": {"epochs": 1, "d_model": 8, "heads": 2, "layers": 1, "lr": 1e-3}}
    out = run.run_default(tmp_path / "run", synthetic, method_options=options)
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["methods"]) == ["patchcore", "rlr", "sgfr"]
    # The baseline finds the painted defects even at this size (8 test images per category: no finer claim).
    assert metrics["methods"]["patchcore"]["mean"]["image_auroc"] > 0.6, metrics["methods"]["patchcore"]["mean"]
    for method in ("patchcore", "sgfr"):
        expected = {"patchcore": ["bank.faiss", "config.json"],
                    "sgfr": ["basis.faiss", "config.json", "tensors.safetensors"]}[method]
        assert sorted(path.name for path in (out / "models" / method).iterdir()) == expected
    report = (out / "report.md").read_text()
    for method in ("patchcore", "sgfr", "rlr"):
        assert f"| {method} |" in report
    # sgfr's basis search, with the recall measured at fit time (its basis is small: flat in 32 PCA dimensions).
    assert re.search(r"^- search: flat, 32 PCA dims: recall@8 [01]\.\d{3} \(target 0\.0\) on \d+ held-out vectors",
                     report, re.MULTILINE)
    plots = re.findall(r"!\[[^]]*\]\((plots/roc_[^)]+\.png)\)", report)
    assert sorted(plots) == ["plots/roc_fabric.png", "plots/roc_nut.png"]
    assert all((out / plot).is_file() for plot in plots)
    assert re.search(r"^method +image_auroc +pixel_auroc +aupro +fit_s$", caplog.text, re.MULTILINE)
    assert (out / "work" / "cache").is_dir() and not (out / "models" / "rlr" / "cache").exists()
    # rlr holds a validation split out, so it fits fewer images: it reads their rows of the bank methods' cache.
    assert len(list((out / "work" / "cache").iterdir())) == 1 and "from a cache of more images" in caplog.text
    # rlr kept the checkpoint that scored best on a painted validation split of its training images.
    info = json.loads((out / "models" / "rlr" / "config.json").read_text())["method_info"]
    assert [entry["epoch"] for entry in info["validation_history"]] == [1] and 0.0 <= info["mean_auroc"] <= 1.0
    assert (out / "work" / "rlr" / "validation" / "validation.json").is_file()
    assert len(list((out / "work" / "rlr" / "train").glob("rlr-*/validation.png"))) == 1


# --- RAY_ADDRESS ---------------------------------------------------------------------------------------------------

_CONNECT_CHECK = """
import json, os, ray
from reconray.pipelines.runtime import ensure_ray

ensure_ray()
ensure_ray()  # a second call is a no-op
joined = {"cpus": ray.cluster_resources().get("CPU"), "gcs": ray.get_runtime_context().gcs_address}
ray.shutdown()
del os.environ["RAY_ADDRESS"]
ensure_ray(num_cpus=3)
local = {"cpus": ray.cluster_resources().get("CPU"), "gcs": ray.get_runtime_context().gcs_address}
ray.shutdown()
print(json.dumps({"joined": joined, "local": local}))
"""


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """A real 1-CPU head started by `ray start --block` in its own process group, its own temp dir and ports.

    Yields its address and the environment that finds it. Teardown signals that head and its process group only:
    `ray stop` would also stop every other Ray instance of this user on the machine.
    """
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))  # short: Ray's unix socket paths must stay < 108
    # Token auth off: Ray enables it on `ray start` when ~/.ray/auth_token exists, and a driver given RAY_ADDRESS
    # only sends a token when RAY_AUTH_MODE=token; no drain wait, so SIGTERM tears the head down at once.
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {
        "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    gcs_port, client_port, agent_port = _free_ports(3)
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus=1",
               f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
               f"--dashboard-agent-listen-port={agent_port}", "--include-dashboard=false", "--disable-usage-stats"]
    log = (ray_tmp / "head.log").open("w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address_file = ray_tmp / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 180
        while not address_file.exists() or not address_file.read_text().strip():
            assert head.poll() is None, (ray_tmp / "head.log").read_text()
            assert time.monotonic() < deadline, "ray start did not come up in 180 s"
            time.sleep(0.5)
        yield address_file.read_text().strip(), env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` then stops every process it started
        try:
            head.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)  # whatever of its group outlived it
            head.wait()
            log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.integration  # `ray start` and a driver in subprocesses
def test_ray_address_joins_the_existing_cluster(ray_head: tuple[str, dict[str, str]]) -> None:
    """RAY_ADDRESS set: join that cluster (1 CPU). Unset: start a local Ray even though a `ray start` one is up."""
    address, env = ray_head
    result = subprocess.run(
        [sys.executable, "-c", _CONNECT_CHECK], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=env | {"RAY_ADDRESS": address, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["joined"] == {"cpus": 1.0, "gcs": address}
    assert report["local"]["cpus"] == 3.0 and report["local"]["gcs"] != address
