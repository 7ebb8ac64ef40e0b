"""Choosing RLR's CPU recipe on validation data: recipe variants trained in-process on cached features, each scored
on the painted validation split after every epoch.

The data is the synthetic set generated with another seed than `reconray run`'s (or any dataset given with `--data`);
only training images are opened: the fit images train, the carved validation split (each image as is and painted) scores
(`pipelines.validation`, the split checkpoint selection and `tune` use). Features are extracted once per dataset and
kept in `<out>/features.npz`, so variants and reruns share them. Every variant starts from the CPU recipe
(`methods.rlr.RECIPES["cpu"]`) and changes what its name says; training runs in this process with every CPU
(`methods.rlr.train_epoch`, the loop the Ray Train workers run), so the curves of all variants come from one run
on one machine.

    python benchmarks/rlr_recipe.py --out runs/bench-rlr-recipe                      # synthetic, seed 1
    python benchmarks/rlr_recipe.py --out runs/bench-rlr-recipe --variants cpu,lr3e-3 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reconray.methods.artifact import ModelSpec
from reconray.methods.backbone import DEFAULT_BACKBONE, DEFAULT_LEVELS, backbone_normalization
from reconray.methods.rlr import (
    RECIPES,
    RLR,
    LRSchedule,
    budget_spent,
    channel_statistics,
    jitter_seed,
    make_optimizer,
    train_epoch,
)
from reconray.pipelines.console import table
from reconray.pipelines.datasets import discover, split_samples
from reconray.pipelines.ingest import level_columns, plan_resources
from reconray.pipelines.runtime import ensure_ray
from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset
from reconray.pipelines.validation import carve, paint_validation_set, validation_metrics

logger = logging.getLogger("rlr_recipe")

VARIANTS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "cosine": {"lr_schedule": "cosine", "warmup": 0.05},
    "warmup-0.05": {"warmup": 0.05},
    "lr-1e-2": {"lr": 1e-2, "reference_lr": 1e-1},
    "lr-1e-3": {"lr": 1e-3, "reference_lr": 1e-2},
    "no-reference-lr": {"reference_lr": None},
    "raw-scale": {"standardize": False},
    "d_model-32": {"d_model": 32},
    "d_model-128": {"d_model": 128},
    "batch-8": {"batch_size": 8},
    "layers-2": {"layers": 2},
    "jitter-0.2": {"jitter": 0.2},
    "jitter-0.8": {"jitter": 0.8},
    "paper-jitter-4": {"jitter": 4.0, "jitter_unit": "paper"},
}
"""Each variant is the CPU recipe with these options changed."""


def _features(out: Path, data: Path | None, image_size: int) -> dict[str, dict[str, np.ndarray]]:
    """Fit and validation features (cached in `<out>/features.npz`); extracted on a local Ray when not cached."""
    cache = out / "features.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            arrays = dict(stored)
        return {name: {key.split("/", 1)[1]: value for key, value in arrays.items() if key.startswith(f"{name}/")}
                for name in ("fit", "validation")}
    from reconray.pipelines.ingest import feature_batches

    if data is None:
        data = make_synthetic_dataset(out / "data", SyntheticConfig(seed=1, image_size=image_size))
    carving = carve(split_samples(discover(data), "train"))
    validation = paint_validation_set(carving.validation, out / "validation")
    mean, std = backbone_normalization(DEFAULT_BACKBONE, None)
    spec = ModelSpec(DEFAULT_BACKBONE, list(DEFAULT_LEVELS), image_size, list(mean), list(std), None)
    ensure_ray()
    batches = feature_batches(spec, {"fit": carving.fit, "validation": validation}, plan_resources(), "recipe:")
    joined = {name: {key: _plain(np.concatenate([batch[key] for batch in parts])) for key in parts[0]}
              for name, parts in batches.items()}
    np.savez(cache, **{f"{name}/{key}": value for name, arrays in joined.items() for key, value in arrays.items()})
    return joined


def _plain(values: np.ndarray) -> np.ndarray:
    """Object arrays (Ray Data's strings) as unicode, so the cache loads without pickle."""
    return values.astype(str) if values.dtype == object else values


def _batches(arrays: dict[str, np.ndarray], size: int = 16) -> list[dict[str, np.ndarray]]:
    count = len(arrays["label"])
    return [{key: value[start:start + size] for key, value in arrays.items()} for start in range(0, count, size)]


def train_variant(options: RLR.Options, fit: dict[str, np.ndarray], validation: list[dict[str, np.ndarray]],
                  image_size: int, validate_every: int) -> list[dict[str, Any]]:
    """Trains one variant in this process and returns the validation metrics after every `validate_every` epochs."""
    columns = level_columns(sum(key.startswith("level_") for key in fit))
    features = [torch.from_numpy(fit[column]).float() for column in columns]
    channels, grids = [f.shape[1] for f in features], [list(f.shape[2:]) for f in features]
    model = RLR(**options.model_dump()).build_model(channels, grids)
    if options.standardize:
        model.set_feature_statistics(channel_statistics([features]))
    model.train()
    optimizer = make_optimizer(model, options.lr, options.reference_lr)
    schedule = LRSchedule(options, math.ceil(len(features[0]) / options.batch_size))
    torch.manual_seed(jitter_seed(options.seed, 0, 0))
    shuffle = torch.Generator().manual_seed(options.seed)
    curve, train_s = [], 0.0
    for epoch in range(options.epochs):
        started = time.perf_counter()
        order = torch.randperm(len(features[0]), generator=shuffle).split(options.batch_size)
        loss_sum, images = train_epoch(model, optimizer, ([level[rows] for level in features] for rows in order),
                                       options, schedule)
        train_s += time.perf_counter() - started
        schedule.fit_budget(train_s)
        last = epoch + 1 == options.epochs or budget_spent(options, train_s)
        if (epoch + 1) % validate_every == 0 or last:
            scorer = RLR(**options.model_dump()).load_trained(model.state_dict(), channels, grids, {})
            metrics = validation_metrics(scorer, validation, image_size)
            curve.append({"epoch": epoch + 1, "train_s": train_s, "loss": loss_sum / images, **metrics})
            logger.info("epoch %d: loss %.4f, val image %.3f pixel %.3f (%.0f s training)", epoch + 1,
                        loss_sum / images, metrics["image_auroc"], metrics["pixel_auroc"], train_s)
        if last:
            break
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-rlr-recipe"))
    parser.add_argument("--data", type=Path, help="dataset to carve the validation split from (default: synthetic)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--epochs", type=int, help="override every variant's epochs")
    parser.add_argument("--validate-every", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="extra option for all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(os.cpu_count() or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    arrays = _features(args.out, args.data, args.image_size)
    validation = _batches(arrays["validation"])
    shared = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.variants.split(","):
        changes = VARIANTS[name] | shared | ({"epochs": args.epochs} if args.epochs else {})
        method = RLR(**changes)
        method.use_recipe(gpu=False)
        logger.info("variant %s: %s", name, changes)
        curve = train_variant(method.options, arrays["fit"], validation, args.image_size, args.validate_every)
        results[json.dumps({"name": name, **changes}, sort_keys=True)] = {"options": method.options.model_dump(),
                                                                          "curve": curve}
        results_path.write_text(json.dumps(results, indent=1))
    rows = []
    for key, result in results.items():
        curve = result["curve"]
        best = max(curve, key=lambda point: point["mean_auroc"])
        last = curve[-1]
        rows.append([key, best["epoch"], f"{best['train_s']:.0f}", best["mean_auroc"], best["image_auroc"],
                     best["pixel_auroc"], last["mean_auroc"], f"{last['train_s']:.0f}"])
    header = ["variant", "best epoch", "at s", "best mean", "image", "pixel", "last mean", "total s"]
    logger.info("\n%s", table(header, rows))
    logger.info("base recipe: %s", RECIPES["cpu"])


if __name__ == "__main__":
    main()
