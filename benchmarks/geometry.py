"""Image geometry (issue 14): squashed square vs keep-aspect vs tiled canvases, for patchcore and sgfr, chosen on
validation splits; then the chosen geometry next to `square` on the test split, in the same run.

Per dataset (KSDD's 250 x ~630 px commutators, MTD's tiles of aspect 1 to 2.5), the normal training images are carved by
`reconray.pipelines.validation` (the fit / calibration / validation split `reconray tune` uses) and every validation
image is scored as is and with a painted defect (exact mask) on a copy. Every geometry is fitted with `fit_model` on the
fit images (the validation images excluded) and scored with `evaluate_model` on the painted split: the product's own
path, so the scores, maps and metrics are what `reconray fit` + `reconray evaluate` give. The validation table decides;
the test split is only opened for `--final`, the side-by-side of the geometry chosen on validation against `square 256`.

Usage:
    python benchmarks/geometry.py --out runs/bench-geometry [--datasets ksdd mtd] [--final "keep-aspect 512"]

Progress goes to the console; the result tables (markdown, for RESULTS.md) to stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from rlr_unified import timed_fit_evaluate

from reconray.pipelines.console import console_session
from reconray.pipelines.datasets import discover, split_samples, validate
from reconray.pipelines.validation import carve, paint_validation_set, write_split_csv

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {"ksdd": SHARED / "ksdd" / "split.csv", "mtd": SHARED / "mtd" / "split.csv"}
GEOMETRIES: dict[str, dict[str, Any]] = {
    "square 256": {"image_size": 256},
    "keep-aspect 256": {"image_size": 256, "resize": "keep-aspect"},
    "square 512": {"image_size": 512},
    "keep-aspect 512": {"image_size": 512, "resize": "keep-aspect"},
    "keep-aspect 640 tile 256": {"image_size": 640, "resize": "keep-aspect", "tile": 256},
}
BASELINE = "square 256"
METHODS = ("patchcore", "sgfr")
QUALITY = ("image_auroc", "pixel_auroc", "aupro")

logger = logging.getLogger("reconray.benchmarks.geometry")


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = args.out.resolve()
    summary_path = out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for dataset in args.datasets:
        source = DATASETS[dataset]
        train = validate(split_samples(discover(source), "train")).samples
        carving = carve(train)
        painted = paint_validation_set(carving.validation, out / dataset / "validation")
        # train rows to fit on (the validation images excluded below) and the painted split as the rows evaluated
        validation_csv = write_split_csv([*train, *painted], out / dataset / "validation" / "split.csv")
        excluded = [sample.image for sample in carving.validation]
        logger.info("%s: %d fit images, %d validation images (%d painted)", dataset,
                    len(train) - len(excluded), len(painted), sum(sample.label for sample in painted))
        for geometry in args.geometries:
            for method in METHODS:
                key = f"{dataset} | validation | {geometry} | {method}"
                if key not in summary:  # a rerun resumes: finished settings are kept
                    summary[key] = timed_fit_evaluate(validation_csv, method, out / dataset / geometry / method,
                                                      exclude=excluded, **GEOMETRIES[geometry])
                    summary_path.write_text(json.dumps(summary, indent=1, default=str))
    if args.final:
        for geometry in dict.fromkeys([BASELINE, args.final]):
            for method in METHODS:
                key = f"ksdd | test | {geometry} | {method}"
                if key not in summary:
                    summary[key] = timed_fit_evaluate(DATASETS["ksdd"], method, out / "ksdd-test" / geometry / method,
                                                      **GEOMETRIES[geometry])
                    summary_path.write_text(json.dumps(summary, indent=1, default=str))
    return summary


def table(summary: dict[str, Any]) -> str:
    """One row per dataset, split, geometry and method: quality, fit seconds and per-image backbone + score time."""
    lines = ["| dataset | split | geometry | method | " + " | ".join(QUALITY) + " | fit s | extract ms/img | "
             "score ms/img |", "|" + "---|" * (7 + len(QUALITY))]
    for key, result in summary.items():
        mean, timing = result["mean"], result["timing"]
        values = " | ".join("-" if mean[name] is None else f"{mean[name]:.4f}" for name in QUALITY)
        lines.append(f"| {key} | {values} | {result['fit_wall_s']:.1f} | {timing['extract_ms_per_image']:.1f} | "
                     f"{timing['score_ms_per_image']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["ksdd", "mtd"])
    parser.add_argument("--geometries", nargs="+", choices=list(GEOMETRIES), default=list(GEOMETRIES))
    parser.add_argument("--final", choices=list(GEOMETRIES), help="the geometry chosen on validation, for KSDD test")
    args = parser.parse_args()
    with console_session(None):
        summary = run(args)
    print(table(summary))  # noqa: T201  (the result table is this script's output)


if __name__ == "__main__":
    main()
