"""Does a tune sweep's `best/` reproduce its best trial? The same bank fit refitted at several torch thread counts.

Usage:
    python benchmarks/fit_threads.py --sweep runs/bench-tune/mtd-sgfr/sweep --data ../shared/data/mtd/split.csv \
        --out runs/bench-fit-threads [--threads 1 2]

A bank trial fits in-process on the sweep's one feature pass with as many torch threads as it holds CPUs; `best/`
is fitted again by `fit_model` (Ray Data workers condense, the driver selects with its own threads). This script
redoes the sweep's feature pass (`ingest.feature_batches` over the same carving and painted validation split), scores
the `best/` artifact on it, then refits `best.yaml`'s options on the fit features at each `--threads` count and scores
each fit on the same validation features: the metrics per row show whether the scoring path or the fit's thread count
is where `best/` and its trial part. Writes `summary.json` to `--out`; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from reconray.methods import create_method
from reconray.methods.artifact import load_artifact, read_config
from reconray.methods.scoring import content_mask
from reconray.pipelines.console import console_session
from reconray.pipelines.datasets import discover, split_samples, validate
from reconray.pipelines.ingest import feature_batches, level_tensors, plan_resources
from reconray.pipelines.runtime import ensure_ray
from reconray.pipelines.validation import carve, validation_metrics

logger = logging.getLogger("reconray.benchmarks.fit_threads")


def run(args: argparse.Namespace) -> dict[str, Any]:
    best_dir = args.sweep / "best"
    spec = read_config(best_dir).spec
    setting = yaml.safe_load((args.sweep / "best.yaml").read_text())
    carving = carve(validate(split_samples(discover(args.data), "train")).samples)
    painted = discover(args.sweep / "validation" / "split.csv")
    ensure_ray(dashboard=False)
    features = feature_batches(spec, {"validation": painted, "fit": carving.fit}, plan_resources(), "features of the")
    size = spec.image_size
    rows = [{"model": "best/ artifact", "threads": None, "fit_s": None,
             **validation_metrics(load_artifact(best_dir).method, features["validation"], size)}]
    fit = features["fit"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        method = create_method(setting["method"], **setting["options"])
        started = time.perf_counter()
        method.fit([level_tensors(batch) for batch in fit],
                   [content_mask(batch["content"], batch["level_0"].shape[-2:], size) for batch in fit])
        fit_s = time.perf_counter() - started
        rows.append({"model": "refit in process", "threads": threads, "fit_s": fit_s,
                     **validation_metrics(method, features["validation"], size)})
        logger.info("refit at %d thread(s): %.0f s, mean_auroc %.6f", threads, fit_s, rows[-1]["mean_auroc"])
    summary = {"trial_objective": setting.get("mean_auroc"), "options": setting["options"], "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = [f"Trial's reported objective: {summary['trial_objective']:.6f}", "",
             "| model | torch threads | fit s | mean_auroc | image_auroc | pixel_auroc |", "|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        threads = "" if row["threads"] is None else row["threads"]
        fit_s = "" if row["fit_s"] is None else f"{row['fit_s']:.0f}"
        lines.append(f"| {row['model']} | {threads} | {fit_s} | {row['mean_auroc']:.6f} | {row['image_auroc']:.4f} "
                     f"| {row['pixel_auroc']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, required=True, help="what `reconray tune --out` was given")
    parser.add_argument("--data", type=Path, required=True, help="the data the sweep was run on")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with console_session(None):
        summary = run(args)
    print(table(summary))  # noqa: T201  (the result table is this script's output)


if __name__ == "__main__":
    main()
