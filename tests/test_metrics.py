"""Metrics against independent references: pairwise and per-threshold loops for the image metrics (which call
scikit-learn), scikit-learn for pixel AUROC/AP and a slow per-threshold loop for AUPRO (both hand-written)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from reconray.methods.metrics import (
    METRIC_NAMES,
    aupro,
    compute_metrics,
    image_auroc,
    image_f1_max,
    mean_metrics,
    pixel_ap,
    pixel_auroc,
)

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _random_scores(rng: np.random.Generator, labels: np.ndarray, decimals: int | None) -> np.ndarray:
    """Overlapping score distributions; rounding makes many ties inside and across classes."""
    scores = rng.normal(size=labels.shape) + 0.8 * labels
    return scores if decimals is None else np.round(scores, decimals)


def _reference_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC by its definition: the chance that an anomalous sample outscores a normal one, ties counting half."""
    anomalous, normal = scores[labels][:, None], scores[~labels][None, :]
    return float(np.mean((anomalous > normal) + 0.5 * (anomalous == normal)))


def _reference_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """F1 = 2 TP / (2 TP + FP + FN) recomputed from scratch at every distinct score taken as threshold."""
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp, fp, fn = (predicted & labels).sum(), (predicted & ~labels).sum(), (~predicted & labels).sum()
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def _random_masks(rng: np.random.Generator, n_images: int, size: int) -> np.ndarray:
    """Masks with several regions of different sizes, diagonal touches, and some defect-free images."""
    masks = np.zeros((n_images, size, size), dtype=bool)
    for mask in masks[1:]:
        for _ in range(rng.integers(1, 4)):
            top, left = rng.integers(0, size - 4, size=2)
            height, width = rng.integers(1, 5, size=2)
            mask[top : top + height, left : left + width] = True
        mask[rng.random((size, size)) < 0.01] = True
    return masks


def _reference_aupro(masks: np.ndarray, anomaly_maps: np.ndarray, fpr_limit: float) -> float:
    """PRO and FPR recomputed from scratch at every distinct score, integrated point by point up to fpr_limit."""
    regions = []
    for index, mask in enumerate(masks):
        labeled, n_regions = ndimage.label(mask, structure=EIGHT_CONNECTED)
        regions += [(index, labeled == region) for region in range(1, n_regions + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for threshold in np.unique(anomaly_maps)[::-1]:
        above = anomaly_maps >= threshold
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([above[index][region].mean() for index, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (fpr0, pro0), (fpr1, pro1) in pairwise(points):
        if fpr0 >= fpr_limit:
            break
        if fpr1 > fpr_limit:
            pro1 = pro0 + (pro1 - pro0) * (fpr_limit - fpr0) / (fpr1 - fpr0)
            fpr1 = fpr_limit
        area += (fpr1 - fpr0) * (pro0 + pro1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1])
def test_image_metrics_match_their_definitions(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = _random_scores(rng, labels, decimals)
    assert image_auroc(labels, scores) == pytest.approx(_reference_auroc(labels, scores), abs=1e-9)
    assert image_f1_max(labels, scores) == pytest.approx(_reference_f1_max(labels, scores), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("decimals", [None, 1])
def test_pixel_auroc_and_ap_match_sklearn(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((4, 24, 24)) < 0.1
    anomaly_maps = _random_scores(rng, masks, decimals).astype(np.float32)
    flat_masks, flat_maps = masks.ravel(), anomaly_maps.ravel()
    assert pixel_auroc(masks, anomaly_maps) == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-9)
    assert pixel_ap(masks, anomaly_maps) == pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("decimals", [None, 2])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_per_threshold_reference(seed: int, decimals: int | None, fpr_limit: float) -> None:
    # The reference uses every distinct score as a threshold, like the fast version, so they agree to rounding.
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, n_images=5, size=20)
    anomaly_maps = _random_scores(rng, masks, decimals)
    assert aupro(masks, anomaly_maps, fpr_limit) == pytest.approx(
        _reference_aupro(masks, anomaly_maps, fpr_limit), abs=1e-9
    )


def test_aupro_regions_are_eight_connected() -> None:
    # Pixels (0,0),(0,1) and (1,2) touch diagonally: one region of 3 pixels under 8-connectivity, two under 4.
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 0, :2] = masks[0, 1, 2] = True
    anomaly_maps = np.zeros((1, 6, 6))
    anomaly_maps[0, 1, 2] = 1.0
    # Curve (0,0) -> (0, 1/3) -> (1, 1); up to FPR 0.3 the mean PRO is 1/3 + (2/3) * 0.15 (it would be 0.575 with 4).
    assert aupro(masks, anomaly_maps) == pytest.approx(1 / 3 + 2 / 3 * 0.15, abs=1e-12)


def test_perfect_detector_scores_one_everywhere() -> None:
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, n_images=6, size=32)
    labels = masks.any(axis=(1, 2))
    anomaly_maps = masks + 0.5 * rng.random(masks.shape)
    image_scores = anomaly_maps.max(axis=(1, 2))
    metrics = compute_metrics(labels, image_scores, masks, anomaly_maps)
    assert {name: metrics[name] for name in METRIC_NAMES} == {name: pytest.approx(1.0) for name in METRIC_NAMES}
    assert (metrics["n_images"], metrics["n_anomalous"]) == (6, 5)


def test_pixels_outside_the_images_are_not_counted() -> None:
    """Images padded onto a canvas (keep-aspect) are measured on their own pixels: the same metrics as the crops."""
    rng = np.random.default_rng(3)
    masks = _random_masks(rng, n_images=6, size=24)[:, :, :15]
    labels = masks.any(axis=(1, 2))
    anomaly_maps = _random_scores(rng, masks, 1)
    image_scores = anomaly_maps.max(axis=(1, 2))
    padded_masks, padded_maps = np.zeros((6, 24, 24), dtype=bool), rng.random((6, 24, 24)) * 10
    padded_masks[:, :, :15], padded_maps[:, :, :15] = masks, anomaly_maps
    inside = np.zeros((6, 24, 24), dtype=bool)
    inside[:, :, :15] = True
    cropped = compute_metrics(labels, image_scores, masks, anomaly_maps)
    assert compute_metrics(labels, image_scores, padded_masks, padded_maps, inside) == cropped
    assert compute_metrics(labels, image_scores, padded_masks, padded_maps)["pixel_auroc"] != cropped["pixel_auroc"]
    with pytest.raises(ValueError, match="inside must have the masks' shape"):
        compute_metrics(labels, image_scores, padded_masks, padded_maps, inside[:, :10])


def test_compute_metrics_matches_the_references() -> None:
    rng = np.random.default_rng(1)
    masks = _random_masks(rng, n_images=8, size=24)
    labels = masks.any(axis=(1, 2))
    anomaly_maps = _random_scores(rng, masks, 1).astype(np.float32)
    image_scores = np.round(anomaly_maps.max(axis=(1, 2)) + rng.normal(size=8), 1)
    metrics = compute_metrics(labels, image_scores, masks, anomaly_maps)
    flat_masks, flat_maps = masks.ravel(), anomaly_maps.ravel()
    assert metrics == {
        "image_auroc": pytest.approx(_reference_auroc(labels, image_scores), abs=1e-9),
        "pixel_auroc": pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-9),
        "aupro": pytest.approx(_reference_aupro(masks, anomaly_maps, 0.3), abs=1e-9),
        "pixel_ap": pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-9),
        "image_f1_max": pytest.approx(_reference_f1_max(labels, image_scores), abs=1e-9),
        "n_images": 8,
        "n_anomalous": int(labels.sum()),
    }


def test_undefined_metrics_are_none() -> None:
    scores = np.array([0.1, 0.4, 0.3])
    assert image_auroc(np.zeros(3), scores) is None
    assert image_auroc(np.ones(3), scores) is None
    assert image_f1_max(np.zeros(3), scores) is None
    assert image_f1_max(np.ones(3), scores) == 1.0
    assert image_auroc(np.zeros(0), np.zeros(0)) is None

    anomaly_maps = np.random.default_rng(0).random((2, 8, 8))
    no_defect = np.zeros((2, 8, 8), dtype=bool)
    all_defect = np.ones((2, 8, 8), dtype=bool)
    assert pixel_auroc(no_defect, anomaly_maps) is None
    assert pixel_ap(no_defect, anomaly_maps) is None
    assert aupro(no_defect, anomaly_maps) is None
    assert pixel_auroc(all_defect, anomaly_maps) is None
    assert aupro(all_defect, anomaly_maps) is None
    assert pixel_ap(all_defect, anomaly_maps) == 1.0


def test_compute_metrics_normal_only_category_and_image_labels_only() -> None:
    rng = np.random.default_rng(2)
    anomaly_maps = rng.random((3, 8, 8))
    normal_only = compute_metrics(np.zeros(3), rng.random(3), np.zeros((3, 8, 8), dtype=np.uint8), anomaly_maps)
    assert {name: normal_only[name] for name in METRIC_NAMES} == dict.fromkeys(METRIC_NAMES)
    assert (normal_only["n_images"], normal_only["n_anomalous"]) == (3, 0)

    labels = np.array([0, 1, 0, 1])
    image_only = compute_metrics(labels, np.array([0.1, 0.9, 0.2, 0.8]), None, None)
    assert image_only["image_auroc"] == 1.0
    assert image_only["image_f1_max"] == 1.0
    assert (image_only["pixel_auroc"], image_only["aupro"], image_only["pixel_ap"]) == (None, None, None)


def test_mean_metrics_skips_none_and_sums_counts() -> None:
    per_category = {
        "a": {
            "image_auroc": 0.8,
            "pixel_auroc": 0.9,
            "aupro": None,
            "pixel_ap": None,
            "image_f1_max": 0.5,
            "n_images": 10,
            "n_anomalous": 4,
        },
        "b": {
            "image_auroc": 0.6,
            "pixel_auroc": None,
            "aupro": None,
            "pixel_ap": None,
            "image_f1_max": None,
            "n_images": 5,
            "n_anomalous": 0,
        },
    }
    assert mean_metrics(per_category) == {
        "image_auroc": pytest.approx(0.7),
        "pixel_auroc": 0.9,
        "aupro": None,
        "pixel_ap": None,
        "image_f1_max": 0.5,
        "n_images": 15,
        "n_anomalous": 4,
    }


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: image_auroc(np.array([0, 1]), np.array([0.1, 0.2, 0.3])), "equal length"),
        (lambda: image_auroc(np.array([0, 2]), np.array([0.1, 0.2])), "0 \\(normal\\) or 1"),
        (lambda: image_f1_max(np.array([0, 1]), np.array([0.1, np.nan])), "1 NaN"),
        (lambda: image_auroc(np.array([0, 1]), np.array(["low", "high"])), "must be numeric"),
        (lambda: aupro(np.ones((1, 2, 2)), np.full((1, 2, 2), np.nan)), "4 NaN"),
        (lambda: pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5))), "\\(2, 4, 5\\)"),
        (lambda: pixel_ap(np.zeros((4, 4)), np.zeros((4, 4))), "\\(N, H, W\\)"),
        (lambda: aupro(np.ones((1, 2, 2)), np.zeros((1, 2, 2)), fpr_limit=0.0), "fpr_limit must be in \\(0, 1\\]"),
        (lambda: compute_metrics(np.zeros(2), np.zeros(2), np.zeros((2, 4, 4)), None), "anomaly_maps is None"),
        (lambda: compute_metrics(np.zeros(2), np.zeros(2), np.zeros((3, 4, 4)), np.zeros((3, 4, 4))), "3 images"),
    ],
)
def test_bad_inputs_raise_with_the_offending_value(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
