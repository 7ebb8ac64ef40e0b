"""Side-by-side of the bank methods on one set of cached features: quality, bank size and per-image cost.

Variants (issue 3): patchcore full bank, patchcore coreset at the sgfr basis size, sgfr with sparse subspace
sampling (defaults), sgfr with random sampling of the same size. Backbone features are extracted once in-process and
shared by every variant, so the comparison isolates the methods; fitting goes through the same `condense` per batch
+ `fit_bank` split as the Ray pipeline, and scoring through `methods.scoring` like every entry point.

Usage:
    python benchmarks/bank_methods.py --data ../shared/data/mtd/split.csv --out runs/bench-bank/mtd
    python benchmarks/bank_methods.py --synthetic --out runs/bench-bank/synthetic

Progress goes to the log (stderr); the result table to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from reconray.methods import AnomalyMethod, create_method, knn
from reconray.methods.artifact import ModelSpec
from reconray.methods.backbone import FeatureExtractor, backbone_normalization
from reconray.methods.metrics import compute_metrics, mean_metrics
from reconray.methods.scoring import anomaly_map, image_scores
from reconray.pipelines.console import console_session
from reconray.pipelines.datasets import decode_rgb, discover, load_mask, split_samples, validate
from reconray.pipelines.ingest import preprocess, preprocess_mask
from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset
from reconray.pipelines.validation import calibration_split

BATCH = 16

# Under "reconray", so that `console_session` shows these lines next to the library's own.
logger = logging.getLogger("reconray.benchmarks.bank_methods")


def extract(extractor: FeatureExtractor, spec: ModelSpec, samples: list, masks: bool,
            warm_shapes: set[torch.Size]) -> tuple[list, list, float, list]:
    """Features per batch (list of per-level tensors), masks per batch, backbone seconds (shapes in `warm_shapes`
    are timed without a warm-up call), and the preprocessed image batches (kept for interleaved timing)."""
    batches, mask_batches, image_batches, seconds = [], [], [], 0.0
    for start in range(0, len(samples), BATCH):
        chunk = samples[start : start + BATCH]
        images = torch.stack([preprocess(decode_rgb(sample.image), spec) for sample in chunk])
        with torch.inference_mode():
            if images.shape not in warm_shapes:  # oneDNN builds kernels per input shape on the first call
                extractor(images)
                warm_shapes.add(images.shape)
            began = time.perf_counter()
            batches.append(extractor(images))
            seconds += time.perf_counter() - began
        if masks:
            image_batches.append(images)
            mask_batches.append(np.stack([
                preprocess_mask(load_mask(s.mask), spec) if s.mask else
                np.zeros((spec.image_size, spec.image_size), np.uint8) for s in chunk]))
    return batches, mask_batches, seconds, image_batches


def fit_variant(name: str, options: dict, train: list) -> tuple[AnomalyMethod, float]:
    method = create_method(name, **options)
    began = time.perf_counter()
    method.fit(train)
    return method, time.perf_counter() - began


def with_exact_search(method: AnomalyMethod) -> AnomalyMethod:
    """The same fitted sgfr basis behind an exact flat index: isolates what the default IVF search costs in quality."""
    state = method.state()
    index = knn.build_index(state.tensors["basis"].numpy(), kind="flat", use_gpu=False)
    exact = dataclasses.replace(state, options={**state.options, "index": "flat"}, indexes={"basis": index})
    return type(method).from_state(exact)


def evaluate_variant(method: AnomalyMethod, fit_s: float, test: list, test_masks: list, labels: np.ndarray,
                     image_size: int, extractor: FeatureExtractor, images: list) -> dict:
    """Metrics and per-image costs of a fitted variant on the cached test features.

    The backbone is timed again on each test batch right before that batch is scored, so the score/backbone ratio
    compares the two in the same moments of the same run: on a shared machine both swing by 1.5x within minutes.
    """
    scores, maps, seconds, backbone_seconds = [], [], 0.0, 0.0
    for features, batch_images in zip(test, images, strict=True):
        with torch.inference_mode():
            began = time.perf_counter()
            extractor(batch_images)
            backbone_seconds += time.perf_counter() - began
            began = time.perf_counter()
            batch_maps = anomaly_map(method.score(features), (image_size, image_size))
            scores.append(image_scores(batch_maps))
            seconds += time.perf_counter() - began
        maps.append(batch_maps.numpy())
    vectors, size = method.bank_stats()
    metrics = compute_metrics(labels, torch.cat(scores).numpy(), np.concatenate(test_masks).astype(bool),
                              np.concatenate(maps))
    return {**metrics, "fit_s": fit_s, "score_ms_per_image": 1000.0 * seconds / len(labels),
            "backbone_ms_per_image": 1000.0 * backbone_seconds / len(labels),
            "score_over_backbone": seconds / backbone_seconds, "bank_vectors": vectors, "bank_bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="dataset path (any layout reconray reads)")
    parser.add_argument("--synthetic", action="store_true", help="use the default synthetic dataset")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (args.data or args.synthetic):
        parser.error("give --data or --synthetic")
    with console_session(None):
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = make_synthetic_dataset(args.out / "data", SyntheticConfig()) if args.synthetic else args.data
    samples = discover(data)
    mean, std = backbone_normalization("tf_efficientnet_lite0")
    spec = ModelSpec("tf_efficientnet_lite0", [2, 3], 256, list(mean), list(std))
    extractor = FeatureExtractor()
    warm_shapes: set[torch.Size] = set()
    results: dict[str, dict] = {}
    for category in sorted({sample.category for sample in samples}):
        members = [sample for sample in samples if sample.category == category]
        fit_samples, _ = calibration_split(validate(split_samples(members, "train")).samples)
        test_samples = validate(split_samples(members, "test")).samples
        train, _, _, _ = extract(extractor, spec, fit_samples, masks=False, warm_shapes=warm_shapes)
        test, test_masks, _, test_images = extract(extractor, spec, test_samples, masks=True, warm_shapes=warm_shapes)
        labels = np.array([sample.label for sample in test_samples])
        fitted = {"sgfr sparse (default)": fit_variant("sgfr", {}, train)}
        total = sum(len(features[0]) * features[0].shape[2] * features[0].shape[3] for features in train)
        basis_ratio = fitted["sgfr sparse (default)"][0].bank_stats()[0] / total
        variants = {
            "patchcore full bank": ("patchcore", {}),
            f"patchcore coreset {basis_ratio:.3f}": ("patchcore", {"coreset_ratio": basis_ratio}),
            "sgfr random": ("sgfr", {"sampling": "random"}),
        }
        rows = {}
        for label in [*fitted, *variants, "sgfr sparse, exact search"]:
            if label in variants:
                fitted[label] = fit_variant(*variants[label], train)
            elif label not in fitted:  # the default basis, searched exactly
                sparse, sparse_fit_s = fitted["sgfr sparse (default)"]
                fitted[label] = with_exact_search(sparse), sparse_fit_s
            rows[label] = evaluate_variant(*fitted[label], test, test_masks, labels, spec.image_size, extractor,
                                           test_images)
            if label != "sgfr sparse (default)":
                del fitted[label]  # a full MTD bank is 400 MB
            logger.info("%s %s: %s", category, label, json.dumps(rows[label]))
        results[category] = rows
    labels_in_order = list(next(iter(results.values())))
    mean = {label: mean_metrics({c: rows[label] for c, rows in results.items()}) for label in labels_in_order}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bank_methods.json").write_text(json.dumps({"per_category": results, "mean": mean}, indent=2))
    print("| category | variant | image AUROC | pixel AUROC | AUPRO | bank vectors | bank MB | backbone ms/img | "
          "score ms/img | score/backbone |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for category, rows in results.items():
        for label, row in rows.items():
            print(f"| {category} | {label} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | "
                  f"{row['aupro']:.3f} | {row['bank_vectors']} | {row['bank_bytes'] / 2**20:.1f} | "
                  f"{row['backbone_ms_per_image']:.1f} | "
                  f"{row['score_ms_per_image']:.1f} | {row['score_over_backbone']:.2f} |")
    for label, row in mean.items():
        backbone_ms = float(np.mean([rows[label]["backbone_ms_per_image"] for rows in results.values()]))
        score_ms = float(np.mean([rows[label]["score_ms_per_image"] for rows in results.values()]))
        print(f"| mean | {label} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | {row['aupro']:.3f} "
              f"| | | {backbone_ms:.1f} | {score_ms:.1f} | {score_ms / backbone_ms:.2f} |")


if __name__ == "__main__":
    main()
