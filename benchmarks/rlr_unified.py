"""Unified RLR (one model for every category) vs per-category patchcore on MTD + KSDD + the synthetic categories.

Usage:
    python benchmarks/rlr_unified.py [--mtd ../shared/data/mtd/split.csv] [--ksdd ../shared/data/ksdd/split.csv]
        [--out runs/bench-rlr-unified] [--time-budget-s 3600] [--set key=value ...] [--cpus-per-worker C]
        [--mtd-coreset 0.1] [--smoke]

RLR's selling point is the unified setting: a single model trained on the union of all categories' normal images,
evaluated per category. Patchcore, the baseline, gets one model per category. Both go through the product's own
pipelines (`fit_model`, `evaluate_model`), so the numbers are what `reconray fit` + `reconray evaluate` give. To train
one model on the union, the script writes a VisA-style CSV (absolute paths) listing the MTD and KSDD rows and the
synthetic samples; the datasets themselves are only read. RLR trains with the recipe a user gets (`recipe=auto`: the
CPU recipe on a machine without a GPU) within `--time-budget-s` of training; `--set` changes any RLR option (values
as on the command line of `reconray fit`). Patchcore keeps its defaults except a 10% coreset on MTD, whose full bank
(680k patches) takes ~20 minutes to evaluate on 2 CPU cores. Ray Train scheduling (`--cpus-per-worker`, default: the
worker takes every CPU; a checkpoint every 10 epochs) is a `TrainConfig`, not part of the model's options. `--smoke`
shrinks the synthetic part to one category of 6 training and 4 test images, for an end-to-end check with small
`--mtd` and `--ksdd` datasets.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from reconray.methods.artifact import read_config
from reconray.pipelines.cli import parse_key_values
from reconray.pipelines.console import console_session
from reconray.pipelines.datasets import Sample, discover
from reconray.pipelines.evaluate import evaluate_model
from reconray.pipelines.fit import fit_model
from reconray.pipelines.fitting import TrainConfig
from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset

METRICS = ("image_auroc", "pixel_auroc", "aupro")
SMOKE_SYNTHETIC = SyntheticConfig(n_train=6, n_test_good=2, n_test_defect=2, categories=("nut",))

# Under "reconray", so that `console_session` shows these lines next to the library's own.
logger = logging.getLogger("reconray.benchmarks.rlr_unified")


def write_union_csv(sources: list[Path], path: Path) -> list[str]:
    """Writes every sample of `sources` as one VisA-style CSV with absolute paths; returns the categories."""
    samples: list[Sample] = [sample for source in sources for sample in discover(source)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        for sample in samples:
            label = "anomaly" if sample.label else "normal"
            writer.writerow([sample.category, sample.split, label, sample.image, sample.mask or ""])
    return sorted({sample.category for sample in samples})


def timed_fit_evaluate(data: Path, method: str, folder: Path, **fit_kwargs: Any) -> dict[str, Any]:
    """Fits and evaluates one model; returns its metrics plus the fit and total wall seconds."""
    started = time.perf_counter()
    fitted = fit_model(data, method, folder / "model", **fit_kwargs)
    evaluation = evaluate_model(fitted.model_dir, data, folder / "evaluation", categories=fit_kwargs.get("categories"))
    # metrics.json's content; the per-image scores and heatmap entries stay in the evaluation folder
    metrics = {key: value for key, value in evaluation.items() if key not in ("heatmaps", "scores")}
    metrics["fit_wall_s"] = fitted.fit_s
    metrics["wall_s"] = time.perf_counter() - started
    metrics["method_info"] = read_config(fitted.model_dir).method_info
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(__file__).resolve().parents[2] / "shared/data"
    parser.add_argument("--mtd", type=Path, default=shared / "mtd/split.csv")
    parser.add_argument("--ksdd", type=Path, default=shared / "ksdd/split.csv")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-rlr-unified"))
    parser.add_argument("--time-budget-s", type=float, default=3600.0, help="RLR training budget (time_budget_s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an RLR option")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs (= torch threads) of the RLR worker")
    parser.add_argument("--mtd-coreset", type=float, default=0.1, help="patchcore coreset ratio on MTD (1 = full)")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic part (1 category, 6 train / 4 test)")
    args = parser.parse_args()
    with console_session(None):
        run(args)


def run(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    started = time.perf_counter()

    synthetic_root = make_synthetic_dataset(out / "synthetic", SMOKE_SYNTHETIC if args.smoke else SyntheticConfig())
    union = out / "unified.csv"
    categories = write_union_csv([args.mtd.resolve(), args.ksdd.resolve(), Path(synthetic_root)], union)
    mtd_categories = {sample.category for sample in discover(args.mtd)}
    logger.info("categories %s, union CSV %s", categories, union)

    rlr_options = {"time_budget_s": args.time_budget_s, **parse_key_values(args.set)}
    training = TrainConfig(cpus_per_worker=args.cpus_per_worker)
    summary: dict[str, Any] = {"rlr_options": rlr_options, "rlr_training": training.model_dump(),
                               "mtd_coreset": args.mtd_coreset}
    summary["rlr"] = timed_fit_evaluate(union, "rlr", out / "rlr", options=rlr_options, training=training)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["patchcore"] = {}
    # MTD last: its patchcore is by far the slowest part, so the synthetic results land first.
    for category in sorted(categories, key=lambda name: name in mtd_categories):
        options = {"coreset_ratio": args.mtd_coreset} if category in mtd_categories else {}
        summary["patchcore"][category] = timed_fit_evaluate(
            union, "patchcore", out / "patchcore" / category, categories=[category], options=options
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["total_wall_s"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_table(summary, categories)


def print_table(summary: dict[str, Any], categories: list[str]) -> None:
    """Markdown table: RLR (unified) vs patchcore (per category), per category and mean."""
    rlr = summary["rlr"]
    patchcore = summary["patchcore"]
    info = rlr["method_info"]
    print(f"RLR unified {summary['rlr_options']}, training {summary['rlr_training']}: kept epoch {info.get('epoch')} "
          f"(step {info.get('steps')}, {info.get('elapsed_s', 0):.0f} s of training, {info.get('images')} images per "
          f"epoch), fit {rlr['fit_wall_s']:.0f} s, fit+evaluate {rlr['wall_s']:.0f} s; "
          f"patchcore total {sum(entry['wall_s'] for entry in patchcore.values()):.0f} s (MTD coreset "
          f"{summary['mtd_coreset']}); benchmark {summary['total_wall_s']:.0f} s")
    print("| category | RLR I-AUROC | PC I-AUROC | RLR P-AUROC | PC P-AUROC | RLR AUPRO | PC AUPRO |")
    print("|---|---|---|---|---|---|---|")
    means = {("rlr", key): [] for key in METRICS} | {("pc", key): [] for key in METRICS}
    for category in categories:
        cells = []
        for key in METRICS:
            for name, value in (("rlr", rlr["categories"][category][key]),
                                ("pc", patchcore[category]["categories"][category][key])):
                if value is not None:
                    means[(name, key)].append(value)
                cells.append("n/a" if value is None else f"{value:.3f}")
        print(f"| {category} | " + " | ".join(cells) + " |")
    mean_cells = [
        f"{sum(means[(name, key)]) / max(len(means[(name, key)]), 1):.3f}" for key in METRICS for name in ("rlr", "pc")
    ]
    print("| **mean** | " + " | ".join(mean_cells) + " |")


if __name__ == "__main__":
    main()
