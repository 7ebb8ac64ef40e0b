"""`reconray tune` measured: sweep speed (backbone once per sweep, per-trial overhead) and validation-chosen settings
against the defaults on the test split.

Speed (`--speed`): sgfr's preset on one synthetic category (256 px), swept with 8 and then 32 trials on a local Ray
(one CPU per trial). Per sweep: wall time, backbone time (the one feature pass), trial time, per-trial overhead and
trials per hour. Per-trial overhead is everything a trial slot spends besides the method's own fit and scoring:
`(trials_s * concurrent slots - sum(fit_s + score_s)) / trials`, so Tune's scheduling, actor start-up and result
handling are all in it.

ASHA (`--rlr`): rlr's CPU-sized preset (8 trials) on the same synthetic category; per trial its epochs reached and
status, and the time ASHA saved: for each stopped trial, its training seconds per epoch (the worker's, without the
trial's start-up) times the epochs it did not run.

Quality (`--data PATH --method NAME`): a `--num-samples` sweep of the method's preset on the dataset's training
images, then the best setting (`best/`) and the method's defaults, fitted on the same images (training images minus
the validation split), both evaluated on the validation split and on the test split, side by side. The sweep never
opens a test image; only this comparison does, after the choice is made.

Usage:
    python benchmarks/tune_sweeps.py --speed --out runs/bench-tune/speed
    python benchmarks/tune_sweeps.py --rlr --out runs/bench-tune/rlr
    python benchmarks/tune_sweeps.py --data ../shared/data/ksdd/split.csv --method sgfr --out runs/bench-tune/ksdd-sgfr

Progress goes to the log (stderr); the result table to stdout (markdown, for RESULTS.md).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import ray

from reconray.pipelines.console import console_session
from reconray.pipelines.datasets import discover, split_samples, validate
from reconray.pipelines.evaluate import evaluate_model
from reconray.pipelines.fit import fit_model
from reconray.pipelines.runtime import ensure_ray
from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset
from reconray.pipelines.tune import PRESETS, SweepSummary, tune_method
from reconray.pipelines.validation import carve

logger = logging.getLogger("reconray.benchmarks.tune_sweeps")

SPEED_CATEGORY = "nut"
QUALITY = ("image_auroc", "pixel_auroc", "aupro")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true", help="8- and 32-trial sgfr sweeps on one synthetic category")
    parser.add_argument("--rlr", action="store_true", help="an 8-trial rlr ASHA sweep on one synthetic category")
    parser.add_argument("--data", help="dataset to sweep on (its test split is read only for the comparison)")
    parser.add_argument("--method", choices=sorted(PRESETS), default="sgfr")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not (args.speed or args.rlr or args.data):
        parser.error("give --speed, --rlr or --data")
    with console_session(None):
        ensure_ray(dashboard=args.rlr)
        if args.speed:
            lines = speed(args.out)
        elif args.rlr:
            lines = asha(args.out)
        else:
            lines = quality(args.data, args.method, args.num_samples, args.out)
        print("\n".join(lines))


def speed(out: Path) -> list[str]:
    data = make_synthetic_dataset(out / "data", SyntheticConfig(categories=(SPEED_CATEGORY,)))
    slots = math.floor(ray.cluster_resources()["CPU"])
    header = ["trials", "wall s", "backbone s", "trials s", "best/ s", "per-trial overhead s", "trials/hour",
              "best objective"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trials in (8, 32):
        began = time.perf_counter()
        summary = tune_method(data, "sgfr", out / f"sweep-{trials}", space=PRESETS["sgfr"], num_samples=trials)
        wall = time.perf_counter() - began
        timing = summary.timing
        work = sum((row["fit_s"] or 0.0) + (row["score_s"] or 0.0) for row in summary.trials)
        overhead = (timing["trials_s"] * slots - work) / trials
        lines.append(f"| {trials} | {wall:.0f} | {timing['features_s']:.1f} | {timing['trials_s']:.0f} | "
                     f"{timing['best_s']:.0f} | {overhead:.2f} | {3600 * trials / timing['trials_s']:.0f} | "
                     f"{summary.best_objective:.4f} |")
    return lines


def asha(out: Path) -> list[str]:
    data = make_synthetic_dataset(out / "data", SyntheticConfig(categories=(SPEED_CATEGORY,)))
    summary = tune_method(data, "rlr", out / "sweep", space=PRESETS["rlr"], num_samples=8)
    names = [key for key, spec in PRESETS["rlr"].items() if isinstance(spec, dict)]
    lines = ["| " + " | ".join([*names, "epoch", "status", "trial s", "mean_auroc", "saved s"]) + " |",
             "|" + "---|" * (len(names) + 5)]
    saved_total = 0.0
    for row in summary.trials:
        stopped = row["status"] == "stopped"
        saved = row["train_s"] / row["epoch"] * (row["epochs"] - row["epoch"]) if stopped else 0.0
        saved_total += saved
        cells = [f"{row[name]:.3g}" if isinstance(row[name], float) else str(row[name]) for name in names]
        lines.append("| " + " | ".join([*cells, str(row["epoch"]), row["status"], f"{row['trial_s']:.0f}",
                                        f"{row['mean_auroc']:.4f}", f"{saved:.0f}"]) + " |")
    trial_total = sum(row["trial_s"] for row in summary.trials)
    return [*lines, "", f"{_sweep_line(summary)}; trial time {trial_total:.0f} s, ASHA saved about "
            f"{saved_total:.0f} s of training ({saved_total / (trial_total + saved_total):.0%} of running every trial "
            "to the end)"]


def quality(data: str, method: str, num_samples: int, out: Path) -> list[str]:
    summary = tune_method(data, method, out / "sweep", space=PRESETS[method], num_samples=num_samples)
    validation = carve(validate(split_samples(discover(data), "train")).samples).validation
    defaults = fit_model(data, method, out / "defaults", exclude=[sample.image for sample in validation],
                         feature_cache=out / "sweep" / "work" / "cache").model_dir
    lines = [_sweep_line(summary), "",
             "| setting | options | validation objective | " + " | ".join(f"test {name}" for name in QUALITY) + " |",
             "|---|---|---|" + "---|" * len(QUALITY)]
    for name, model, options in (("defaults", defaults, {}), ("best (validation)", out / "sweep" / "best",
                                                                summary.best_options)):
        on_validation = evaluate_model(model, out / "sweep" / "validation" / "split.csv", out / f"{name}-val")["mean"]
        on_test = evaluate_model(model, data, out / f"{name.split()[0]}-test")["mean"]
        objective = (on_validation["image_auroc"] + on_validation["pixel_auroc"]) / 2
        lines.append(f"| {name} | {options or 'defaults'} | {objective:.4f} | "
                     + " | ".join(f"{on_test[metric]:.3f}" for metric in QUALITY) + " |")
    return lines


def _sweep_line(summary: SweepSummary) -> str:
    timing = summary.timing
    failed = sum(row["status"] == "error" for row in summary.trials)
    return (f"{len(summary.trials)} trials ({failed} failed): backbone {timing['features_s']:.0f} s, trials "
            f"{timing['trials_s']:.0f} s, best/ {timing['best_s']:.0f} s; best validation objective "
            f"{summary.best_objective:.4f}")


if __name__ == "__main__":
    main()
