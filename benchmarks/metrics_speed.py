"""Pixel metrics of one category: scikit-learn vs reconray's shared ranking, in seconds and peak memory.

Usage:
    python benchmarks/metrics_speed.py [--images 104] [--size 256] [--reps 3] [--seed 0]

The data imitate one MVTec-like test category: smooth anomaly maps (low-pass noise plus a bump on every defect,
float32 as `methods.scoring` produces them) and masks with one to three elliptic defects on about 60% of the images.

Contenders, each computing pixel AUROC, pixel AP and AUPRO (FPR 0.3, normalized):
- sklearn: `roc_auc_score`, `average_precision_score`, and AUPRO as the area under `roc_curve` with every defect
  pixel weighted by 1 / (its region's size * number of regions), which turns the weighted TPR into the PRO.
- ranking: `methods.metrics` (one descending argsort shared by the three metrics in `compute_metrics`, and one per
  call of the single-metric functions).

Each metric alone and the three together are timed; repetitions of all contenders are interleaved because the
machine may be shared, and the table gives the median wall seconds, the sklearn / ranking ratio of those medians,
and the peak of memory allocated on top of the inputs (tracemalloc, in a separate untimed pass). The script first
checks that both contenders agree to 1e-9.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from reconray.methods import metrics
from reconray.methods.metrics import _area_to_limit  # the same cut at the FPR limit on both sides

FPR_LIMIT = 0.3
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True  # 8-connected within an image, never across images


def make_category(n_images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (N,), masks (N, H, W) bool and anomaly maps (N, H, W) float32 of one synthetic category."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n_images) < 0.6
    rows, cols = np.mgrid[:size, :size]
    masks = np.zeros((n_images, size, size), dtype=bool)
    bumps = np.zeros((n_images, size, size), dtype=np.float32)
    for index in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            centre = rng.uniform(0.1 * size, 0.9 * size, size=2)
            radii = rng.uniform(0.01 * size, 0.12 * size, size=2)
            inside = ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1
            masks[index] |= inside
            bumps[index] += rng.uniform(1.5, 4.0) * np.exp(
                -((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * radii.mean() ** 2)
            )
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape).astype(np.float32), sigma=(0, 8, 8))
    maps = (noise / noise.std() + bumps).astype(np.float32)
    return labels, masks, maps


def sklearn_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float:
    """AUPRO as a weighted ROC curve: with weight 1 / (region size * regions) on defect pixels, TPR is the mean PRO."""
    regions, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    pixel_weight = 1.0 / (np.bincount(regions.ravel()) * n_regions)
    pixel_weight[0] = 1.0  # normal pixels: the weighted FPR stays the plain fraction of normal pixels
    fpr, pro, _ = roc_curve(masks.ravel(), maps.ravel(), sample_weight=pixel_weight[regions.ravel()])
    return _area_to_limit(fpr, pro, fpr_limit)


def sklearn_all(masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """The three pixel metrics with scikit-learn, each ranking the pixels itself."""
    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    return {
        "pixel_auroc": float(roc_auc_score(flat_masks, flat_maps)),
        "pixel_ap": float(average_precision_score(flat_masks, flat_maps)),
        "aupro": sklearn_aupro(masks, maps),
    }


def ranking_all(labels: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """The three pixel metrics from `compute_metrics`, which ranks the pixels once for all of them."""
    result = metrics.compute_metrics(labels, maps.max(axis=(1, 2)), masks, maps)
    return {name: result[name] for name in ("pixel_auroc", "pixel_ap", "aupro")}


def _peak_mib(run: Callable[[], object]) -> float:
    tracemalloc.start()
    run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=104)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    labels, masks, maps = make_category(args.images, args.size, args.seed)
    print(
        f"{args.images} images of {args.size}x{args.size} = {masks.size:,} pixels, {masks.mean():.2%} defect, "
        f"{len(np.unique(maps)):,} distinct scores"
    )
    expected, got = sklearn_all(masks, maps), ranking_all(labels, masks, maps)
    for name, value in expected.items():
        print(f"{name}: sklearn {value:.12f} ranking {got[name]:.12f} difference {abs(value - got[name]):.1e}")
        assert abs(value - got[name]) < 1e-9, name

    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "pixel_auroc": (lambda: roc_auc_score(flat_masks, flat_maps), lambda: metrics.pixel_auroc(masks, maps)),
        "pixel_ap": (lambda: average_precision_score(flat_masks, flat_maps), lambda: metrics.pixel_ap(masks, maps)),
        "aupro": (lambda: sklearn_aupro(masks, maps), lambda: metrics.aupro(masks, maps)),
        "all three": (lambda: sklearn_all(masks, maps), lambda: ranking_all(labels, masks, maps)),
    }
    seconds: dict[tuple[str, int], list[float]] = {(case, side): [] for case in cases for side in (0, 1)}
    for _ in range(args.reps):
        for case, runs in cases.items():
            for side, run in enumerate(runs):
                started = time.perf_counter()
                run()
                seconds[case, side].append(time.perf_counter() - started)
    print(f"\nmedian of {args.reps} interleaved repetitions; peak = memory allocated on top of the inputs")
    print("| metric | sklearn s | ranking s | sklearn / ranking | sklearn peak MiB | ranking peak MiB |")
    print("|---|---|---|---|---|---|")
    for case, runs in cases.items():
        sk, rk = (statistics.median(seconds[case, side]) for side in (0, 1))
        sk_mib, rk_mib = (_peak_mib(run) for run in runs)
        print(f"| {case} | {sk:.2f} | {rk:.2f} | {sk / rk:.2f}x | {sk_mib:.0f} | {rk_mib:.0f} |")


if __name__ == "__main__":
    main()
