"""The one scoring path: images → backbone features → method patch scores → anomaly map → image score.

Evaluate, predict, serve and tune all call `Scorer`, so a given image gets the same score wherever it is scored.
Post-processing follows PatchCore/RLR practice: patch scores are upsampled bilinearly to the image size and smoothed
with a Gaussian of sigma 4 pixels; the image score is the maximum of the smoothed map. An image placed on a padded
canvas (`ModelSpec.resize = "keep-aspect"`) has a `content` size, `(height, width)` from the top-left corner: its
score and metrics only read the map there.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from reconray.methods.backbone import FeatureExtractor
from reconray.methods.base import AnomalyMethod
from reconray.methods.device import synchronize

GAUSSIAN_SIGMA = 4.0
THRESHOLD_QUANTILE = 0.99
"""Threshold = this quantile of the held-out normal images' scores: about 1% false alarms on normal parts."""


def anomaly_map(patch_scores: torch.Tensor, image_size: tuple[int, int], sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """Upsamples patch scores `(B, h, w)` to `image_size` and smooths them: the per-pixel anomaly map `(B, H, W)`.

    Bilinear upsampling and the mirrored Gaussian are both separable linear maps, so their product per axis is one
    `(H, h)` matrix A and the map is A_rows · P · A_colsᵀ: two small matmuls per image instead of a Gaussian
    convolution over every pixel, with the same result up to float rounding.
    """
    height, width = patch_scores.shape[-2:]
    device = patch_scores.device
    rows = _axis_operator(height, image_size[0], float(sigma), device)
    cols = _axis_operator(width, image_size[1], float(sigma), device)
    return rows @ patch_scores.float() @ cols.T


def image_scores(anomaly_maps: torch.Tensor, content: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """Image score = the maximum of its anomaly map (over its `content` region, `(B, 2)`, when given): one defect
    anywhere makes the image anomalous."""
    if content is not None:
        anomaly_maps = anomaly_maps.masked_fill(
            ~content_mask(content, anomaly_maps.shape[-2:]).to(anomaly_maps.device), -torch.inf)
    return anomaly_maps.flatten(1).amax(dim=1)


def content_mask(content: torch.Tensor | np.ndarray, grid: Sequence[int], canvas: int | None = None) -> torch.Tensor:
    """`(B, h, w)` bool: the cells of an `h` x `w` grid over the square canvas whose centre lies inside each image's
    `content` `(B, 2)` (height, width in canvas pixels, from the top-left; `canvas` the canvas side, by default the
    grid's own: a pixel map)."""
    content = torch.tensor(np.asarray(content), dtype=torch.float64)  # a copy: Ray Data columns are read-only
    height, width = int(grid[0]), int(grid[1])
    rows = (torch.arange(height, dtype=torch.float64) + 0.5) * ((canvas or height) / height)
    cols = (torch.arange(width, dtype=torch.float64) + 0.5) * ((canvas or width) / width)
    return (rows[None, :, None] < content[:, 0, None, None]) & (cols[None, None, :] < content[:, 1, None, None])


@functools.lru_cache(maxsize=32)
def _axis_operator(size: int, out_size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """The `(out_size, size)` matrix of one axis: bilinear upsampling (half-pixel centres), then the Gaussian blur.

    Built by applying both steps to the unit vectors, in float64, so the operator is exactly the composition of
    `F.interpolate` and scipy's Gaussian (truncated at 4 sigma, border mode "mirror": the edge pixel is not repeated).
    """
    units = torch.eye(size, dtype=torch.float64)[:, None, :]
    upsampled = F.interpolate(units, size=out_size, mode="linear", align_corners=False)[:, 0, :].numpy()
    if sigma > 0:
        upsampled = ndimage.gaussian_filter1d(upsampled, sigma, axis=1, mode="mirror", truncate=4.0)
    return torch.from_numpy(upsampled.T).float().contiguous().to(device)


@dataclasses.dataclass
class ScoredBatch:
    """Scores of one batch of images, and where the time went."""

    image_scores: torch.Tensor  # (B,)
    anomaly_maps: torch.Tensor  # (B, H, W)
    patch_scores: torch.Tensor  # (B, h, w)
    extract_s: float
    score_s: float


class Scorer:
    """Backbone + fitted method + post-processing: scores normalized image batches.

    Args:
        extractor: the frozen backbone the method was fitted on.
        method: the fitted method.
        device: where the backbone and method run.
    """

    def __init__(self, extractor: FeatureExtractor, method: AnomalyMethod, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.extractor = extractor.to(self.device).eval()
        self.method = method.to(self.device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, categories: Sequence[str | None] | None = None,
                 content: torch.Tensor | np.ndarray | None = None) -> ScoredBatch:
        """Scores `images` `(B, 3, H, W)`, normalized as the backbone expects, of `categories` where known, each
        image's score read over its `content` region `(B, 2)` where it was padded."""
        started = time.perf_counter()
        features = self.extractor(images.to(self.device))
        synchronize(self.device)
        extracted = time.perf_counter()
        scores, maps, patch_scores = score_features(self.method, features, tuple(images.shape[-2:]), categories,
                                                    content)
        synchronize(self.device)
        finished = time.perf_counter()
        return ScoredBatch(scores.cpu(), maps.cpu(), patch_scores.cpu(), extracted - started, finished - extracted)


@torch.inference_mode()
def score_features(
    method: AnomalyMethod, features: list[torch.Tensor], image_size: tuple[int, int],
    categories: Sequence[str | None] | None = None, content: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image scores `(B,)`, anomaly maps `(B, H, W)` and patch scores of already extracted features: the part of the
    scoring path after the backbone, shared by `Scorer` and by sweeps that score cached features. `categories`
    (one per image, None where unknown) route an extended model's images to the part fitted on their category;
    `content` (one `(height, width)` per image, None: the whole canvas) bounds where the image score is read."""
    patch_scores = method.score(features) if categories is None else method.score_categories(features, categories)
    maps = anomaly_map(patch_scores, image_size)
    return image_scores(maps, content), maps, patch_scores


def is_anomalous(score: float, threshold: float | None) -> bool | None:
    """The decision rule everywhere (predict, serve, reports): anomalous when the score exceeds the threshold; None
    when the model has no threshold."""
    return None if threshold is None else bool(score > threshold)


def calibrated_threshold(normal_scores: np.ndarray) -> float | None:
    """The decision threshold from the scores of held-out normal images (None without any)."""
    return float(np.quantile(normal_scores, THRESHOLD_QUANTILE)) if len(normal_scores) else None


def category_thresholds(normal_scores: np.ndarray, categories: Sequence[str]) -> dict[str, float]:
    """One `calibrated_threshold` per category, from the held-out normal scores of that category alone.

    Categories of one unified model score on different scales (a textured tile's normal patches sit farther from the
    bank than a plain part's), so one global quantile would be dominated by the noisiest category.
    """
    names = np.asarray(categories)
    return {str(name): calibrated_threshold(normal_scores[names == name]) for name in sorted(set(names.tolist()))}
