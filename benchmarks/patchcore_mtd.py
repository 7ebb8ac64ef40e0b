"""Times backbone extraction and patchcore scoring on MTD, full bank and 10% coreset, and records bank size + quality.

Usage:
    python benchmarks/patchcore_mtd.py [--data ../shared/data/mtd/split.csv] [--out runs/bench-patchcore]
        [--variant "patchcore full bank"] [--variant "patchcore coreset 10%"]

Everything goes through the product's own pipelines (`fit_model`, `evaluate_model`), so the numbers are those a user
gets from `reconray fit` + `reconray evaluate` with default options.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from reconray.pipelines.console import console_session
from reconray.pipelines.evaluate import evaluate_model
from reconray.pipelines.fit import fit_model

VARIANTS = {"patchcore full bank": {}, "patchcore coreset 10%": {"coreset_ratio": 0.1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/mtd/split.csv"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-patchcore"))
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="run only these (repeatable)")
    args = parser.parse_args()
    with console_session(None):
        run(args)


def run(args: argparse.Namespace) -> None:
    rows = {}
    for label, options in VARIANTS.items():
        if args.variant and label not in args.variant:
            continue
        folder = args.out / label.replace(" ", "_").replace("%", "pct")
        started = time.perf_counter()
        fitted = fit_model(args.data, "patchcore", folder / "model", options=options)
        metrics = evaluate_model(fitted.model_dir, args.data, folder / "evaluation")
        rows[label] = {**metrics["mean"], **metrics["timing"], "wall_s": time.perf_counter() - started}
    print(json.dumps(rows, indent=2))
    print("| variant | image AUROC | pixel AUROC | AUPRO | bank vectors | bank MB | backbone ms/img | score ms/img |")
    print("|---|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | {row['aupro']:.3f} | "
              f"{row['bank_vectors']} | {row['bank_bytes'] / 2**20:.1f} | {row['extract_ms_per_image']:.1f} | "
              f"{row['score_ms_per_image']:.1f} |")


if __name__ == "__main__":
    main()
