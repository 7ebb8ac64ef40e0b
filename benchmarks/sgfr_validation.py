"""How sgfr's defaults are chosen without looking at a test split: quality and cost of option sets on validation data.

Two validation sets, neither of which any reported result is measured on:
- synthetic: the project's generator with another seed (`SyntheticConfig(seed=1)`) than the one `reconray run` and
  the benchmarks evaluate (seed 0); each category is fitted on its training images and validated on its test images.
- MTD train only: the fit images of `../shared/data/mtd/split.csv` (training rows, calibration hold-out removed) are
  split by a hash of the file name into a fit part and `--mtd-validation` validation images; half of those get a
  painted defect with an exact mask (a dark hole, a thin crack or a brightness bump, in the spirit of MTD's
  blowholes, cracks and uneven areas). MTD's test rows are never read.

Each option set is fitted through `condense` per batch + `fit_bank` (the Ray pipeline's split) on features extracted
once in-process, and scored through `methods.scoring` like every entry point; the backbone is timed again on each
validation batch right before that batch is scored, so "score/backbone" compares the two in the same moments.

Usage:
    python benchmarks/sgfr_validation.py --out runs/sgfr-validation
    python benchmarks/sgfr_validation.py --out runs/sgfr-validation --grid "k=8" "k=16,search_dims=0"
    python benchmarks/sgfr_validation.py --out runs/sgfr-smoke --grid "" --mtd-validation 4 --limit 8   # smoke run

How the defaults were chosen with it, and the tables: benchmarks/notes/sgfr.md and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bank_methods import evaluate_variant, extract, fit_variant  # noqa: E402

from reconray.methods import create_method  # noqa: E402
from reconray.methods.artifact import ModelSpec  # noqa: E402
from reconray.methods.backbone import FeatureExtractor, backbone_normalization  # noqa: E402
from reconray.methods.metrics import mean_metrics  # noqa: E402
from reconray.methods.sgfr import SGFR  # noqa: E402
from reconray.pipelines.console import console_session  # noqa: E402
from reconray.pipelines.datasets import Sample, decode_rgb, discover, split_samples, validate  # noqa: E402
from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset  # noqa: E402
from reconray.pipelines.validation import calibration_split  # noqa: E402

MTD_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd" / "split.csv"
DEFECT_PAINTERS = ("hole", "crack", "bump")

logger = logging.getLogger("reconray.benchmarks.sgfr_validation")


def _by_name_hash(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda sample: hashlib.sha1(Path(sample.image).name.encode()).hexdigest())


def paint_defect(rgb: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Returns `rgb` with one painted defect of `kind` and its mask `(H, W)` bool."""
    height, width = rgb.shape[:2]
    side = min(height, width)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    centre = rng.uniform(0.2, 0.8, 2) * (height, width)
    if kind == "hole":
        radii = side * rng.uniform(0.03, 0.07, 2)
        radius = np.hypot((rows - centre[0]) / radii[0], (cols - centre[1]) / radii[1])
        weight, mask = np.clip((1.0 - radius) / 0.3, 0.0, 1.0), radius <= 1.0
        factor = 1.0 - weight * rng.uniform(0.45, 0.7)
    elif kind == "crack":
        steps = int(rng.integers(20, 50))
        angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.25, steps))
        points = centre + np.cumsum(side * 0.012 * np.stack([np.sin(angles), np.cos(angles)], 1), axis=0)
        distance = np.full((height, width), np.inf, np.float32)
        for start, end in zip(points[:-1], points[1:], strict=True):
            direction = end - start
            along = np.clip(((rows - start[0]) * direction[0] + (cols - start[1]) * direction[1])
                            / max(float(direction @ direction), 1e-6), 0.0, 1.0)
            gap = np.hypot(rows - start[0] - along * direction[0], cols - start[1] - along * direction[1])
            distance = np.minimum(distance, gap)
        half_width = rng.uniform(1.5, 3.0) * side / 256
        weight, mask = np.clip(1.0 - distance / (2 * half_width), 0.0, 1.0), distance <= half_width
        factor = 1.0 - weight * rng.uniform(0.35, 0.6)
    else:  # bump: a smooth brighter or darker area
        sigma = side * rng.uniform(0.05, 0.1)
        weight = np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2))
        mask = weight >= 0.5
        factor = 1.0 + weight * rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.4)
    painted = np.clip(rgb.astype(np.float32) * factor[:, :, None], 0, 255).astype(np.uint8)
    return painted, mask


def mtd_validation_split(folder: Path, n_validation: int) -> tuple[list[Sample], list[Sample]]:
    """Fit samples and validation samples (half with painted defects, written under `folder`) from MTD's train rows."""
    train = validate(split_samples(discover(MTD_CSV), "train")).samples
    fit, _ = calibration_split(train)
    ordered = _by_name_hash(fit)
    held_out, fit = ordered[:n_validation], ordered[n_validation:]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    validation = []
    for position, sample in enumerate(held_out):
        if position % 2 == 0:
            validation.append(Sample(sample.image, sample.category, "test", 0))
            continue
        kind = DEFECT_PAINTERS[(position // 2) % len(DEFECT_PAINTERS)]
        painted, mask = paint_defect(decode_rgb(sample.image), kind, rng)
        stem = folder / f"{Path(sample.image).stem}_{kind}"
        Image.fromarray(painted).save(f"{stem}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(f"{stem}_mask.png")
        validation.append(Sample(f"{stem}.png", sample.category, "test", 1, kind, f"{stem}_mask.png"))
    return fit, validation


def validation_sets(out: Path, n_mtd_validation: int) -> dict[str, tuple[list[Sample], list[Sample]]]:
    """`{name: (fit samples, validation samples)}` for every synthetic category and MTD-train."""
    sets = {}
    synthetic = discover(make_synthetic_dataset(out / "synthetic-seed1", SyntheticConfig(seed=1)))
    for category in sorted({sample.category for sample in synthetic}):
        members = [sample for sample in synthetic if sample.category == category]
        fit, _ = calibration_split(validate(split_samples(members, "train")).samples)
        sets[f"synthetic/{category}"] = fit, validate(split_samples(members, "test")).samples
    if MTD_CSV.exists():
        sets["mtd-train"] = mtd_validation_split(out / "mtd-validation", n_mtd_validation)
    return sets


def parse_grid(texts: list[str]) -> list[dict]:
    """`"k=8,search_dims=0"` → `{"k": "8", "search_dims": "0"}` (cast by the method like `--set`)."""
    return [dict(item.split("=", 1) for item in text.split(",") if item) for text in texts]


def limited(samples: list[Sample], limit: int | None) -> list[Sample]:
    """At most `limit` samples (all when None), half of them anomalous where there are any (for smoke runs)."""
    if limit is None:
        return samples
    anomalous = [sample for sample in samples if sample.label][: limit // 2]
    return [sample for sample in samples if not sample.label][: limit - len(anomalous)] + anomalous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grid", nargs="*", default=["", "k=16", "search_dims=0", "k=16,search_dims=0"],
                        help="option sets, each 'key=value,key=value' ('' = the defaults)")
    parser.add_argument("--mtd-validation", type=int, default=120, help="MTD train images held out for validation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, help="at most this many fit and validation images per set (smoke runs)")
    args = parser.parse_args()
    with console_session(None):
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    mean, std = backbone_normalization("tf_efficientnet_lite0")
    spec = ModelSpec("tf_efficientnet_lite0", [2, 3], 256, list(mean), list(std))
    extractor = FeatureExtractor()
    warm_shapes: set[torch.Size] = set()
    grid = parse_grid(args.grid)
    for options in grid:  # an unknown option or a bad value fails now, not after minutes of feature extraction
        create_method("sgfr", **options)
    results: dict[str, dict[str, dict]] = {}
    for name, (fit_samples, validation) in validation_sets(args.out, args.mtd_validation).items():
        fit_samples, validation = limited(fit_samples, args.limit), limited(validation, args.limit)
        began = time.perf_counter()
        train, _, _, _ = extract(extractor, spec, fit_samples, masks=False, warm_shapes=warm_shapes)
        test, test_masks, _, images = extract(extractor, spec, validation, masks=True, warm_shapes=warm_shapes)
        labels = np.array([sample.label for sample in validation])
        logger.info("%s: %d fit, %d validation (%d with defects), features in %.0f s", name, len(fit_samples),
                    len(validation), labels.sum(), time.perf_counter() - began)
        for options in grid:
            label = ",".join(f"{key}={value}" for key, value in options.items()) or "defaults"
            row = evaluate_variant(*fit_variant("sgfr", options, train), test, test_masks, labels, spec.image_size,
                                   extractor, images)
            results.setdefault(label, {})[name] = row
            logger.info("%s %s: image %.3f pixel %.3f aupro %.3f score %.1f ms/img (%.2fx backbone) fit %.0f s", name,
                        label, row["image_auroc"], row["pixel_auroc"], row["aupro"], row["score_ms_per_image"],
                        row["score_over_backbone"], row["fit_s"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sgfr_validation.json").write_text(json.dumps(results, indent=2))
    defaults = SGFR.defaults()
    print(f"\ndefaults: {json.dumps(defaults)}\n")
    print("| options | set | image AUROC | pixel AUROC | AUPRO | basis vectors | score ms/img | score/backbone |")
    print("|---|---|---|---|---|---|---|---|")
    for label, per_set in results.items():
        synthetic = {name: row for name, row in per_set.items() if name.startswith("synthetic/")}
        rows = dict(per_set)
        if synthetic:
            score_ms = float(np.mean([row["score_ms_per_image"] for row in synthetic.values()]))
            backbone_ms = float(np.mean([row["backbone_ms_per_image"] for row in synthetic.values()]))
            rows["synthetic mean"] = {**mean_metrics(synthetic), "bank_vectors": None, "score_ms_per_image": score_ms,
                                      "score_over_backbone": score_ms / backbone_ms}
        for name, row in rows.items():
            print(f"| {label} | {name} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | {row['aupro']:.3f} | "
                  f"{row['bank_vectors'] or ''} | {row['score_ms_per_image']:.1f} | {row['score_over_backbone']:.2f} |")


if __name__ == "__main__":
    main()
