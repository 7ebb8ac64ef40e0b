"""One unified bank-method model vs one model per category, for patchcore and sgfr, on MTD + KSDD + synthetic.

Usage:
    python benchmarks/bank_unified.py --out runs/bench-bank-unified [--methods patchcore sgfr] [--smoke]

The unified model is one `reconray fit` over the union of every category's normal training images (one bank or
basis, a threshold per category); the per-category models are one fit per category on the same union CSV, with
`--categories`. Every model is fitted and evaluated with the method's defaults through the product's pipelines
(`fit_model`, `evaluate_model`: what `reconray fit` + `reconray evaluate` give), so the table shows what unifying
costs or buys: quality per category, bank size, fit time and scoring time per image. The union CSV and the
synthetic categories (seed 0, `reconray run`'s set) are written under `--out`; the datasets are only read.
`--smoke` shrinks the synthetic part to one small category, for an end-to-end check with small `--mtd` / `--ksdd`.

Progress goes to the console; the result table (markdown, for RESULTS.md) to stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from rlr_unified import SMOKE_SYNTHETIC, timed_fit_evaluate, write_union_csv

from reconray.pipelines.console import console_session
from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset

METRICS = ("image_auroc", "pixel_auroc", "aupro")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

logger = logging.getLogger("reconray.benchmarks.bank_unified")


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = args.out.resolve()
    started = time.perf_counter()
    synthetic_root = make_synthetic_dataset(out / "synthetic", SMOKE_SYNTHETIC if args.smoke else SyntheticConfig())
    union = out / "unified.csv"
    categories = write_union_csv([args.mtd.resolve(), args.ksdd.resolve(), Path(synthetic_root)], union)
    logger.info("categories %s, union CSV %s", categories, union)
    summary: dict[str, Any] = {"categories": categories}
    for method in args.methods:
        summary[method] = {"unified": timed_fit_evaluate(union, method, out / method / "unified"), "per_category": {}}
        for category in categories:
            summary[method]["per_category"][category] = timed_fit_evaluate(
                union, method, out / method / category, categories=[category])
            (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["total_wall_s"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def table(summary: dict[str, Any], methods: list[str]) -> str:
    """Per method and category: unified vs per-category quality; then the cost of one unified model against the sum
    of the per-category ones (bank vectors, fit seconds) and their mean scoring time per image."""
    categories = summary["categories"]
    lines = ["| method | category | " + " | ".join(f"{name} unified | {name} per-category" for name in
                                                   ("I-AUROC", "P-AUROC", "AUPRO")) + " |", "|" + "---|" * 8]
    cost = ["| method | model | bank vectors | fit s | score ms/image |", "|---|---|---|---|---|"]
    for method in methods:
        unified, separate = summary[method]["unified"], summary[method]["per_category"]
        rows = [(category, unified["categories"][category], separate[category]["categories"][category])
                for category in categories]
        means = [("**mean**", unified["mean"], _mean([per for _, _, per in rows]))]
        for category, one, per in rows + means:
            cells = [f"{_cell(one[key])} | {_cell(per[key])}" for key in METRICS]
            lines.append(f"| {method} | {category} | " + " | ".join(cells) + " |")
        timing = unified["timing"]
        cost.append(f"| {method} | unified | {timing['bank_vectors']} | {unified['fit_wall_s']:.1f} | "
                    f"{timing['extract_ms_per_image'] + timing['score_ms_per_image']:.1f} |")
        per_timing = [entry["timing"] for entry in separate.values()]
        score_ms = sum(t["extract_ms_per_image"] + t["score_ms_per_image"] for t in per_timing) / len(per_timing)
        cost.append(f"| {method} | {len(separate)} per-category (sum; mean per image) | "
                    f"{sum(t['bank_vectors'] for t in per_timing)} | "
                    f"{sum(entry['fit_wall_s'] for entry in separate.values()):.1f} | {score_ms:.1f} |")
    return "\n".join(lines + [""] + cost)


def _mean(entries: list[dict[str, Any]]) -> dict[str, float | None]:
    means = {}
    for key in METRICS:
        values = [entry[key] for entry in entries if entry[key] is not None]
        means[key] = sum(values) / len(values) if values else None
    return means


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mtd", type=Path, default=SHARED / "mtd/split.csv")
    parser.add_argument("--ksdd", type=Path, default=SHARED / "ksdd/split.csv")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-bank-unified"))
    parser.add_argument("--methods", nargs="+", choices=("patchcore", "sgfr"), default=["patchcore", "sgfr"])
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic part (1 category, 6 train / 4 test)")
    args = parser.parse_args()
    with console_session(None):
        summary = run(args)
    print(table(summary, args.methods))  # noqa: T201  (the result table is this script's output)


if __name__ == "__main__":
    main()
