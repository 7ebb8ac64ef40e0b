"""Is one model's image AUROC really above another's on the same images? A paired bootstrap of the difference.

Usage:
    python benchmarks/paired_bootstrap.py runs/bench-tune/mtd-sgfr/defaults-test runs/bench-tune/mtd-sgfr/best-test \
        [--resamples 2000] [--seed 0]

Reads the `scores.json` that `reconray evaluate` wrote for each of the two evaluations (the same test images), draws
the images with replacement per category, and prints, per category, the image AUROC of both and the mean and 95%
interval of the second minus the first. Differences inside the interval are what the test split's size allows.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from reconray.methods.metrics import image_auroc
from reconray.pipelines.console import console_session

logger = logging.getLogger("reconray.benchmarks.paired_bootstrap")


def _scores(folder: Path) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    entries = json.loads((folder / "scores.json").read_text())
    return {category: ([row["image"] for row in rows], np.array([row["label"] for row in rows]),
                       np.array([row["score"] for row in rows])) for category, rows in entries.items()}


def paired_difference(labels: np.ndarray, first: np.ndarray, second: np.ndarray, resamples: int,
                      seed: int) -> tuple[float, float, float]:
    """Mean and 95% interval of `AUROC(second) - AUROC(first)` over bootstrap draws of the images."""
    rng = np.random.default_rng(seed)
    differences = []
    while len(differences) < resamples:
        drawn = rng.integers(0, len(labels), len(labels))
        if labels[drawn].min() == labels[drawn].max():  # a draw without both classes has no AUROC
            continue
        differences.append(image_auroc(labels[drawn], second[drawn]) - image_auroc(labels[drawn], first[drawn]))
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(np.mean(differences)), float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="an evaluate output folder (holds scores.json)")
    parser.add_argument("second", type=Path, help="another one, on the same images")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lines = ["| category | images (anomalous) | first AUROC | second AUROC | second - first | 95% interval |",
             "|---|---|---|---|---|---|"]
    with console_session(None):
        first, second = _scores(args.first), _scores(args.second)
        for category in sorted(first):
            images, labels, first_scores = first[category]
            second_images, _, second_scores = second[category]
            if images != second_images:
                raise SystemExit(f"{args.second / 'scores.json'}: category {category!r} lists other images than "
                                 f"{args.first / 'scores.json'}")
            mean, low, high = paired_difference(labels, first_scores, second_scores, args.resamples, args.seed)
            aurocs = image_auroc(labels, first_scores), image_auroc(labels, second_scores)
            lines.append(f"| {category} | {len(labels)} ({int(labels.sum())}) | {aurocs[0]:.4f} | {aurocs[1]:.4f} "
                         f"| {mean:+.4f} | {low:+.4f} to {high:+.4f} |")
    print("\n".join(lines))  # noqa: T201  (the result table is this script's output)


if __name__ == "__main__":
    main()
