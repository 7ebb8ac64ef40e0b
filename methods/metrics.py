"""Detection and localization metrics for anomaly detection: image AUROC, image F1-max, pixel AUROC, pixel AP, AUPRO.

The image metrics are scikit-learn's. The pixel metrics rank the pixels once (one argsort), group equal scores into
one threshold the way scikit-learn does, and read true/false positive counts off cumulative sums, so the three pixel
metrics of `compute_metrics` share one ranking of the millions of pixels of a category; three scikit-learn calls
would sort them three times and hold more copies (measured in benchmarks/notes/metrics.md, which is why this path
is kept). The single-metric pixel functions use the same code, so they equal `compute_metrics` exactly; the tests
check all of them against scikit-learn and a per-threshold reference.

AUPRO follows the MVTec AD evaluation code (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021):
defect regions are the 8-connected components of each mask, PRO at a threshold is the mean over all regions of the
fraction of the region's pixels scored at or above it, the false-positive rate is the fraction of all normal pixels
(over every image) at or above it, and the PRO curve is integrated up to FPR 0.3 (interpolated exactly at 0.3) and
divided by 0.3 so a perfect localizer scores 1.

A metric that is undefined for the given data (no anomalous image, no normal image, no defect pixel, ...) is None,
never an exception, so one degenerate category does not abort an evaluation; `mean_metrics` skips the Nones.

Example:
    >>> metrics = compute_metrics(labels, image_scores, masks, anomaly_maps)
    >>> metrics["image_auroc"], metrics["aupro"]
    >>> mean = mean_metrics({"bottle": metrics, "screw": other_metrics})
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max")
_COUNT_NAMES = ("n_images", "n_anomalous")
_AUPRO_FPR_LIMIT = 0.3
# 8-connectivity inside each image, no connection between images: one `ndimage.label` call labels a whole stack.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


class _Ranking:
    """Scores sorted once in descending order, with the last position of every run of equal scores.

    Each run end is one threshold of the curves (scores >= threshold count as positive), so ties are grouped exactly
    as scikit-learn's `roc_curve` / `precision_recall_curve` group them.
    """

    def __init__(self, scores: np.ndarray) -> None:
        flat = scores.ravel()
        self.order = np.argsort(flat)[::-1]
        ranked = flat[self.order]
        run_ends = np.append(ranked[1:] != ranked[:-1], True) if flat.size else np.zeros(0, dtype=bool)
        del ranked
        self.ends = np.flatnonzero(run_ends)

    def counts(self, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """True and false positive counts at every threshold, highest threshold first."""
        tps = np.cumsum(positive.ravel()[self.order], dtype=np.int64)[self.ends]
        fps = self.ends + 1 - tps
        return tps, fps

    def cumulative(self, weight_of_key: np.ndarray, keys: np.ndarray, n_thresholds: int) -> np.ndarray:
        """Running sum of `weight_of_key[key]` over the ranked items at the `n_thresholds` highest thresholds.

        Items carry small integer keys (region ids) rather than their own float64 weight, and the sum stops at the
        last threshold asked for, so at most one float64 copy of the ranking is allocated.
        """
        ranked_keys = keys.ravel()[self.order[: self.ends[n_thresholds - 1] + 1]]
        weights = weight_of_key[ranked_keys].astype(np.float64, copy=False)
        return np.cumsum(weights, out=weights)[self.ends[:n_thresholds]]


def _auroc(tps: np.ndarray, fps: np.ndarray) -> float | None:
    """Trapezoidal ROC area from threshold counts, in exact integer arithmetic until the final division."""
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return None
    # In place on two copies: pixel rankings have millions of thresholds.
    fps_steps = fps.copy()
    fps_steps[1:] -= fps[:-1]
    tps_pairs = tps.copy()
    tps_pairs[1:] += tps[:-1]
    twice_area = int(np.dot(fps_steps, tps_pairs))
    return twice_area / (2 * int(tps[-1]) * int(fps[-1]))


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float | None:
    """Step-wise average precision (sum of precision times recall increment), as scikit-learn defines it."""
    if tps.size == 0 or tps[-1] == 0:
        return None
    recall_steps = tps.astype(np.float64)
    np.subtract(recall_steps[1:], tps[:-1], out=recall_steps[1:])
    precision = np.add(tps, fps, dtype=np.float64)
    np.divide(tps, precision, out=precision)
    return float(np.dot(recall_steps, precision) / tps[-1])


def _regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """The defect regions of `(N, H, W)` masks: a label per pixel (0: normal) and their count."""
    return ndimage.label(masks, structure=_REGION_STRUCTURE)


def _aupro(ranking: _Ranking, regions: np.ndarray, n_regions: int, fps: np.ndarray, fpr_limit: float) -> float | None:
    """Area under the PRO-vs-FPR curve up to `fpr_limit`, divided by `fpr_limit`.

    Each defect pixel carries weight 1 / (region size * number of regions), so the running sum of weights along the
    ranking is the PRO at every threshold without a per-region loop. `regions` labels the ranked pixels (`_regions`,
    in the ranking's layout); `fps` are the ranking's false-positive counts, passed in because the caller has them.
    """
    n_normal = regions.size - int(np.count_nonzero(regions))
    if n_regions == 0 or n_normal == 0:
        return None
    region_weight = 1.0 / (np.bincount(regions.ravel()).astype(np.float64) * n_regions)
    region_weight[0] = 0.0
    threshold_fpr = fps / n_normal
    n_inside = int(np.searchsorted(threshold_fpr, fpr_limit, side="right"))
    # Keep the thresholds with FPR <= fpr_limit and the first one beyond it, which the interpolation needs.
    n_kept = min(n_inside + 1, threshold_fpr.size)
    fpr = np.concatenate(([0.0], threshold_fpr[:n_kept]))
    pro = np.concatenate(([0.0], ranking.cumulative(region_weight, regions, n_kept)))
    return _area_to_limit(fpr, pro, fpr_limit)


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoidal area under the curve (fpr, pro) from FPR 0 to `fpr_limit`, divided by `fpr_limit`.

    `fpr` rises from 0; the segment that crosses `fpr_limit` is cut exactly there by linear interpolation, and points
    beyond it are ignored, so callers may pass only the first point past the limit.
    """
    n_inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    fpr_inside, pro_inside = fpr[:n_inside], pro[:n_inside]
    twice_area = float(np.dot(np.diff(fpr_inside), pro_inside[1:] + pro_inside[:-1]))
    if n_inside < fpr.size:
        share = (fpr_limit - fpr_inside[-1]) / (fpr[n_inside] - fpr_inside[-1])
        pro_at_limit = pro_inside[-1] + share * (pro[n_inside] - pro_inside[-1])
        twice_area += (fpr_limit - fpr_inside[-1]) * (pro_inside[-1] + pro_at_limit)
    return twice_area / 2 / fpr_limit


def _check_image_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, got shapes {labels.shape} and {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), got values {np.unique(labels).tolist()}")
    _check_no_nan(scores, "scores")
    return labels.astype(bool), scores


def _check_pixel_inputs(masks: np.ndarray, anomaly_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks, anomaly_maps = np.asarray(masks), np.asarray(anomaly_maps)
    if masks.ndim != 3 or anomaly_maps.shape != masks.shape:
        raise ValueError(
            f"masks and anomaly_maps must both be (N, H, W) with equal shapes, got {masks.shape} and "
            f"{anomaly_maps.shape}"
        )
    _check_no_nan(anomaly_maps, "anomaly_maps")
    return masks.astype(bool, copy=False), anomaly_maps


def _check_no_nan(scores: np.ndarray, name: str) -> None:
    if not np.issubdtype(scores.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {scores.dtype}")
    n_nan = int(np.count_nonzero(np.isnan(scores))) if np.issubdtype(scores.dtype, np.floating) else 0
    if n_nan:
        raise ValueError(f"{name} contain {n_nan} NaN value(s); every score must be a number")


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Image-level ROC AUC; None without at least one normal and one anomalous image.

    Args:
        labels: (N,) 1 for anomalous, 0 for normal.
        scores: (N,) image anomaly scores, higher = more anomalous.
    """
    from sklearn.metrics import roc_auc_score  # a second of import: not paid by the commands that never score

    labels, scores = _check_image_inputs(labels, scores)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, scores))


def image_f1_max(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Best image-level F1 over every threshold (the optimistic F1 reported by anomaly-detection papers).

    None without an anomalous image (F1 is then undefined); defined without normal images.
    """
    from sklearn.metrics import precision_recall_curve  # see image_auroc

    labels, scores = _check_image_inputs(labels, scores)
    if not labels.any():
        return None
    precision, recall, _ = precision_recall_curve(labels, scores)
    # Where precision and recall are both 0, F1 is 0; `where` keeps that point from dividing by zero.
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(both), where=both > 0)
    return float(f1.max())


def pixel_auroc(masks: np.ndarray, anomaly_maps: np.ndarray) -> float | None:
    """Pixel-level ROC AUC over all pixels of all images; None without both defect and normal pixels.

    Args:
        masks: (N, H, W) ground truth, nonzero = defect.
        anomaly_maps: (N, H, W) pixel anomaly scores, higher = more anomalous.
    """
    masks, anomaly_maps = _check_pixel_inputs(masks, anomaly_maps)
    return _auroc(*_Ranking(anomaly_maps).counts(masks))


def pixel_ap(masks: np.ndarray, anomaly_maps: np.ndarray) -> float | None:
    """Pixel-level average precision over all pixels of all images; None without a defect pixel.

    AP rather than AUROC shows how well small defects are separated, since normal pixels vastly outnumber them.
    """
    masks, anomaly_maps = _check_pixel_inputs(masks, anomaly_maps)
    return _average_precision(*_Ranking(anomaly_maps).counts(masks))


def aupro(masks: np.ndarray, anomaly_maps: np.ndarray, fpr_limit: float = _AUPRO_FPR_LIMIT) -> float | None:
    """Per-region-overlap AUC up to `fpr_limit`, normalized to [0, 1]; None without defect or normal pixels.

    Unlike pixel AUROC it weighs every defect region equally, so a missed small defect costs as much as a missed
    large one. Regions are 8-connected components of each mask.
    """
    masks, anomaly_maps = _check_pixel_inputs(masks, anomaly_maps)
    _check_fpr_limit(fpr_limit)
    ranking = _Ranking(anomaly_maps)
    _, fps = ranking.counts(masks)
    return _aupro(ranking, *_regions(masks), fps, fpr_limit)


def compute_metrics(
    labels: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray | None,
    anomaly_maps: np.ndarray | None,
    inside: np.ndarray | None = None,
) -> dict:
    """Every metric of one category, ranking the pixels only once for the three pixel metrics.

    Args:
        labels: (N,) 1 for anomalous, 0 for normal.
        image_scores: (N,) image anomaly scores.
        masks: (N, H, W) ground truth (nonzero = defect), or None for datasets with image labels only, which makes
            every pixel metric None.
        anomaly_maps: (N, H, W) pixel scores; needed whenever masks are given.
        inside: (N, H, W) bool, the pixels that belong to the images (False on a padded canvas's padding, which no
            pixel metric counts); None: every pixel.

    Returns:
        A dict with every name in `METRIC_NAMES` (float or None) plus `n_images` and `n_anomalous`.
    """
    labels, image_scores = _check_image_inputs(labels, image_scores)
    metrics = {
        "image_auroc": image_auroc(labels, image_scores),
        "pixel_auroc": None,
        "aupro": None,
        "pixel_ap": None,
        "image_f1_max": image_f1_max(labels, image_scores),
        "n_images": int(labels.size),
        "n_anomalous": int(np.count_nonzero(labels)),
    }
    if masks is None:
        return metrics
    if anomaly_maps is None:
        raise ValueError("anomaly_maps is None but masks were given; pixel metrics need both")
    masks, anomaly_maps = _check_pixel_inputs(masks, anomaly_maps)
    if masks.shape[0] != labels.size:
        raise ValueError(f"masks hold {masks.shape[0]} images but labels hold {labels.size}")
    regions, n_regions = _regions(masks)
    if inside is not None:
        inside = np.asarray(inside, dtype=bool)
        if inside.shape != masks.shape:
            raise ValueError(f"inside must have the masks' shape {masks.shape}, got {inside.shape}")
        masks, anomaly_maps, regions = masks[inside], anomaly_maps[inside], regions[inside]
    ranking = _Ranking(anomaly_maps)
    pixel_tps, pixel_fps = ranking.counts(masks)
    metrics["pixel_auroc"] = _auroc(pixel_tps, pixel_fps)
    metrics["pixel_ap"] = _average_precision(pixel_tps, pixel_fps)
    metrics["aupro"] = _aupro(ranking, regions, n_regions, pixel_fps, _AUPRO_FPR_LIMIT)
    return metrics


def mean_metrics(per_category: dict[str, dict]) -> dict:
    """Mean of each metric over categories, skipping None; None when no category defines it. Counts are summed."""
    mean: dict = {}
    for name in METRIC_NAMES:
        values = [metrics[name] for metrics in per_category.values() if metrics.get(name) is not None]
        mean[name] = float(np.mean(values)) if values else None
    for name in _COUNT_NAMES:
        mean[name] = int(sum(metrics[name] for metrics in per_category.values()))
    return mean
