"""Greedy k-center coreset on real patch features: the pruned pass (`methods.coreset`) against the every-point pass.

The two selections a fit runs globally, on MTD's training images at the default spec (256 px): sgfr's
`sampling=coreset` basis pass over the per-image candidates (`candidate_factor` 3 x `basis_ratio` 0.2 of each image's
vectors, 0.2 of all vectors picked: a third of the candidates), and a 10% k-center pass over the raw patch vectors
(what a global patchcore coreset would be; the product condenses patchcore per image instead). Each selection is
timed with one torch thread, both passes on the same vectors in one run, and the share of picks they share is
reported (ties that their rounding breaks differently aside, they pick alike).

Usage:
    python benchmarks/coreset_speed.py --data ../shared/data/mtd/split.csv --images 128 --out runs/bench-coreset
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from reconray.methods import create_method
from reconray.methods.artifact import ModelSpec
from reconray.methods.backbone import DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE, DEFAULT_LEVELS, backbone_normalization
from reconray.methods.coreset import greedy_coreset
from reconray.pipelines.datasets import decode_rgb, discover, split_samples
from reconray.pipelines.ingest import preprocess

logger = logging.getLogger("reconray.benchmarks.coreset_speed")

BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=128, help="training images whose features are selected from")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    raw, candidates = _features(args.data, args.images)
    rows = []
    for label, vectors, n in (("sgfr basis (coreset sampling)", candidates, round(0.2 * len(raw))),
                              ("10% coreset of every patch vector", raw, round(0.1 * len(raw)))):
        timings, picks = {}, {}
        for name, pruned in (("pruned", True), ("every point", False)):
            started = time.perf_counter()
            picks[name] = greedy_coreset(vectors, n, pruned=pruned)
            timings[name] = time.perf_counter() - started
            logger.info("%s, %s pass: %.1f s", label, name, timings[name])
        same = len(set(picks["pruned"].tolist()) & set(picks["every point"].tolist())) / n
        rows.append({"selection": label, "vectors": len(vectors), "picks": n, "every_point_s": timings["every point"],
                     "pruned_s": timings["pruned"], "shared": same})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coreset_speed.json").write_text(json.dumps(rows, indent=2))
    print("| selection | vectors | picks | every-point pass s | pruned pass s | speed-up | picks shared |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['selection']} | {row['vectors']:,} | {row['picks']:,} | {row['every_point_s']:.1f} | "
              f"{row['pruned_s']:.1f} | {row['every_point_s'] / row['pruned_s']:.1f}x | {row['shared']:.4f} |")


def _features(data: str, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every patch vector of the first `images` normal training images, and sgfr's per-image coreset candidates."""
    samples = [sample for sample in split_samples(discover(data), "train") if sample.label == 0][:images]
    mean, std = backbone_normalization(DEFAULT_BACKBONE)
    spec = ModelSpec(DEFAULT_BACKBONE, list(DEFAULT_LEVELS), DEFAULT_IMAGE_SIZE, list(mean), list(std))
    extractor = spec.extractor().eval()
    sgfr = create_method("sgfr", sampling="coreset")
    raw, candidates = [], []
    with torch.inference_mode():
        for first in range(0, len(samples), BATCH):
            batch = samples[first:first + BATCH]
            pixels = torch.stack([preprocess(decode_rgb(sample.image), spec) for sample in batch])
            features = extractor(pixels)
            raw.append(sgfr.embed(features))
            candidates += sgfr.condense_images(features)[0]
    logger.info("%d images: %d patch vectors, %d sgfr candidates", len(samples), sum(map(len, raw)),
                sum(map(len, candidates)))
    return torch.cat(raw), torch.cat(candidates)


if __name__ == "__main__":
    main()
