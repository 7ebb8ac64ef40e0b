"""Where a bank-method fit's time goes, against its floor: one backbone pass over the same images (issue 14 asks for
a whole `reconray fit` at most 2x that).

Usage:
    python benchmarks/fit_profile.py --data ../shared/data/mtd/split.csv --out runs/bench-fit-profile \
        [--methods patchcore sgfr] [--categories magnetic_tile]

Per method, `fit_model` (what `reconray fit` runs) on a fresh local Ray, so Ray's start and its workers' imports are
counted as a user pays them; the artifact's `fit.stages` say where the time went (discovery and validation pass, Ray
start, the streamed features + condense pass, the bank build, scoring the calibration vectors, saving + thresholds),
and Ray's task timeline splits the streamed pass into its operators' busy seconds (decode tasks, and the backbone
actor, which condenses each batch it embeds) and the time before the first backbone batch (worker start-up and
imports). The floor is measured in this process on the same images and spec: decode + preprocess, then the backbone
alone at 2 torch threads.

Progress goes to the console; the result table (markdown, for RESULTS.md) to stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import ray
import torch

from reconray.methods.artifact import read_config
from reconray.pipelines.console import console_session
from reconray.pipelines.datasets import decode_rgb, discover, split_samples
from reconray.pipelines.fit import fit_model
from reconray.pipelines.ingest import preprocess

BATCH = 16
OPERATORS = {"decode": "_decode_batch", "backbone + condense": "_FeatureActor"}

logger = logging.getLogger("reconray.benchmarks.fit_profile")


def backbone_floor(data: Path, categories: list[str] | None, model_dir: Path) -> dict[str, float]:
    """Seconds to decode + preprocess, and to run the backbone alone, over the fit's training images, in process."""
    spec = read_config(model_dir).spec
    samples = split_samples(discover(data, categories), "train")
    extractor = spec.extractor()
    torch.set_num_threads(2)
    decode_s = backbone_s = 0.0
    with torch.inference_mode():
        extractor(torch.zeros(BATCH, 3, spec.image_size, spec.image_size))  # oneDNN builds its kernels once
        for start in range(0, len(samples), BATCH):
            began = time.perf_counter()
            chunk = samples[start:start + BATCH]
            images = torch.stack([preprocess(decode_rgb(sample.image), spec) for sample in chunk])
            decoded = time.perf_counter()
            extractor(images)
            decode_s += decoded - began
            backbone_s += time.perf_counter() - decoded
    return {"images": len(samples), "decode_s": decode_s, "backbone_s": backbone_s}


def operator_seconds(events: list[dict[str, Any]]) -> dict[str, float]:
    """Busy seconds of each streamed operator in Ray's task timeline, and when the first backbone batch started
    relative to the first decode task (worker start-up, imports and the backbone's construction)."""
    busy: dict[str, float] = defaultdict(float)
    first: dict[str, float] = {}
    for event in events:
        if event.get("ph") != "X":
            continue
        category = str(event.get("cat", ""))  # "task::MapBatches(_decode_batch)", "task::MapWorker(...).__init__"
        for operator, marker in OPERATORS.items():
            if marker in category:
                name = f"{operator} actor start" if category.endswith(".__init__") else operator
                busy[name] += event["dur"] / 1e6
                first[name] = min(first.get(name, float("inf")), event["ts"] / 1e6)
    busy = dict(busy)
    if "decode" in first and "backbone + condense" in first:
        busy["until_first_backbone_batch"] = first["backbone + condense"] - first["decode"]
    return busy


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = args.out.resolve()
    summary: dict[str, Any] = {}
    for method in args.methods:
        ray.shutdown()  # every fit starts its own Ray, as one `reconray fit` does
        began = time.perf_counter()
        fitted = fit_model(args.data, method, out / method, categories=args.categories)
        wall_s = time.perf_counter() - began
        stages = read_config(fitted.model_dir).fit.stages
        summary[method] = {"wall_s": wall_s, "stages": stages, "operators": operator_seconds(ray.timeline()),
                           "n_fit": fitted.n_fit, "n_calibration": fitted.n_calibration}
        logger.info("%s: %.1f s, stages %s, operators %s", method, wall_s, stages, summary[method]["operators"])
    ray.shutdown()
    summary["floor"] = backbone_floor(args.data, args.categories, fitted.model_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def table(summary: dict[str, Any], methods: list[str]) -> str:
    floor = summary["floor"]
    lines = [f"Floor ({floor['images']} images, in process): decode + preprocess {floor['decode_s']:.1f} s, "
             f"backbone {floor['backbone_s']:.1f} s.", "",
             "| method | stage | seconds | x backbone |", "|---|---|---|---|"]
    for method in methods:
        result = summary[method]
        rows = [("whole fit_model call", result["wall_s"]), *result["stages"].items(),
                *((f"streamed: {name} busy" if name in OPERATORS else f"streamed: {name}", seconds)
                  for name, seconds in result["operators"].items())]
        lines += [f"| {method} | {name} | {seconds:.1f} | {seconds / floor['backbone_s']:.2f} |"
                  for name, seconds in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", choices=("patchcore", "sgfr"), default=["patchcore", "sgfr"])
    parser.add_argument("--categories", nargs="+")
    args = parser.parse_args()
    with console_session(None):
        summary = run(args)
    print(table(summary, args.methods))  # noqa: T201  (the result table is this script's output)


if __name__ == "__main__":
    main()
