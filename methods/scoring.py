"""The one scoring path: images → backbone features → method patch scores → anomaly map → image score.

Evaluate, predict, serve and tune all call `Scorer`, so a given image gets the same score wherever it is scored.
Post-processing follows PatchCore/RLR practice: patch scores are upsampled bilinearly to the image size and smoothed
with a Gaussian of sigma 4 pixels; the image score is the maximum of the smoothed map.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from methods.backbone import FeatureExtractor
from methods.base import AnomalyMethod

GAUSSIAN_SIGMA = 4.0


def anomaly_map(patch_scores: torch.Tensor, image_size: tuple[int, int], sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """Upsamples patch scores `(B, h, w)` to `image_size` and smooths them: the per-pixel anomaly map `(B, H, W)`."""
    maps = F.interpolate(patch_scores[:, None].float(), size=image_size, mode="bilinear", align_corners=False)
    return _gaussian_blur(maps, sigma)[:, 0]


def image_scores(anomaly_maps: torch.Tensor) -> torch.Tensor:
    """Image score = the maximum of its anomaly map: one defect anywhere makes the image anomalous."""
    return anomaly_maps.flatten(1).amax(dim=1)


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, truncated at 4 sigma as scipy and anomalib do; border mirrored (scipy's "mirror")."""
    if sigma <= 0:
        return maps
    radius = int(math.ceil(4 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    maps = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    maps = F.conv2d(maps, kernel.view(1, 1, 1, -1))
    return F.conv2d(maps, kernel.view(1, 1, -1, 1))


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
    def __call__(self, images: torch.Tensor) -> ScoredBatch:
        """Scores `images` `(B, 3, H, W)`, normalized as the backbone expects."""
        started = time.perf_counter()
        features = self.extractor(images.to(self.device))
        _synchronize(self.device)
        extracted = time.perf_counter()
        patch_scores = self.method.score(features)
        maps = anomaly_map(patch_scores, tuple(images.shape[-2:]))
        scores = image_scores(maps)
        _synchronize(self.device)
        finished = time.perf_counter()
        return ScoredBatch(scores.cpu(), maps.cpu(), patch_scores.cpu(), extracted - started, finished - extracted)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
