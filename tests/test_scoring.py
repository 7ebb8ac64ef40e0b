"""Scoring against independent references: torch's bilinear upsampling then scipy's Gaussian for the anomaly map, a
hand-built map for the image score, and the `Scorer` chain on a stub backbone."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from reconray.methods.base import AnomalyMethod, MethodOptions, MethodState
from reconray.methods.scoring import (
    GAUSSIAN_SIGMA,
    THRESHOLD_QUANTILE,
    Scorer,
    anomaly_map,
    calibrated_threshold,
    category_thresholds,
    content_mask,
    image_scores,
    is_anomalous,
)


def _patch_scores(batch: int = 2, height: int = 8, width: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((batch, height, width), dtype=np.float32) * 5)


def _reference_map(patch_scores: torch.Tensor, image_size: tuple[int, int], sigma: float) -> np.ndarray:
    """PatchCore's post-processing done the slow way: upsample the whole map, then blur every pixel."""
    upsampled = F.interpolate(patch_scores[:, None].double(), size=image_size, mode="bilinear", align_corners=False)
    smoothed = [ndimage.gaussian_filter(plain, sigma=sigma, mode="mirror", truncate=4.0) for plain in upsampled[:, 0]]
    return np.stack(smoothed)


@pytest.mark.parametrize(
    ("patch_size", "image_size"),
    [((8, 8), (64, 64)), ((8, 10), (64, 80)), ((32, 32), (256, 256)), ((7, 9), (50, 61)), ((12, 14), (96, 112))],
)
def test_anomaly_map_is_bilinear_upsampling_then_mirrored_gaussian(
    patch_size: tuple[int, int], image_size: tuple[int, int]
) -> None:
    patches = _patch_scores(3, *patch_size, seed=sum(patch_size))
    maps = anomaly_map(patches, image_size)
    assert maps.dtype == torch.float32
    np.testing.assert_allclose(maps.numpy(), _reference_map(patches, image_size, GAUSSIAN_SIGMA), atol=2e-5)


def test_default_sigma_is_four_pixels() -> None:
    assert GAUSSIAN_SIGMA == 4.0


@pytest.mark.parametrize("sigma", [0, -1])
def test_non_positive_sigma_means_upsampling_only(sigma: float) -> None:
    patches = _patch_scores()
    upsampled = F.interpolate(patches[:, None], size=(16, 20), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(anomaly_map(patches, (16, 20), sigma=sigma), upsampled)


def test_constant_scores_stay_constant() -> None:
    maps = anomaly_map(torch.full((1, 4, 4), 2.5), (40, 40))
    np.testing.assert_allclose(maps.numpy(), 2.5, atol=1e-5)


def test_image_score_is_the_maximum_of_the_map() -> None:
    maps = torch.zeros(3, 16, 16)
    maps[0, 3, 4], maps[1, 15, 15], maps[2] = 7.0, 2.0, -1.0
    assert image_scores(maps).tolist() == [7.0, 2.0, -1.0]


def test_a_padded_image_is_scored_on_its_own_region_only() -> None:
    maps = torch.zeros(2, 16, 16)
    maps[:, 12:, :] = 9.0  # the padding below a 12-row image
    maps[0, 2, 3], maps[1, 11, 15] = 4.0, 5.0
    content = np.array([[12, 16], [12, 16]])
    assert image_scores(maps, content).tolist() == [4.0, 5.0]
    assert image_scores(maps).tolist() == [9.0, 9.0]
    cells = content_mask(np.array([[64, 30]]), (8, 8), canvas=64)  # a 64 x 30 image on a 64 px canvas, 8 px cells
    assert cells.shape == (1, 8, 8) and cells[0, :, :4].all() and not cells[0, :, 4:].any()  # centres 4, 12, 20, 28


@pytest.mark.parametrize(
    ("score", "threshold", "expected"),
    [(0.6, 0.5, True), (0.5, 0.5, False), (0.4, 0.5, False), (np.float32(2.0), 1.5, True), (0.9, None, None)],
)
def test_is_anomalous_only_strictly_above_the_threshold(
    score: float, threshold: float | None, expected: bool | None
) -> None:
    decision = is_anomalous(score, threshold)
    assert decision is expected  # a plain bool (or None), whatever the type of the score


class _PooledPixels(nn.Module):
    """Stub backbone: one level of 2 channels on a grid 8 times coarser than the image (no weights to load)."""

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [F.avg_pool2d(images[:, :2], kernel_size=8)]


class _FeatureNorm(AnomalyMethod):
    """Scores a patch by the norm of its finest-level feature: enough to check what Scorer does around a method."""

    name = "feature_norm"
    Options = MethodOptions  # no options

    def fit(self, feature_batches: Iterable[list[torch.Tensor]]) -> None:
        """Nothing to learn."""

    def score(self, features: list[torch.Tensor]) -> torch.Tensor:
        return features[0].norm(dim=1)

    def state(self) -> MethodState:
        return MethodState(options={})

    @classmethod
    def from_state(cls, state: MethodState) -> _FeatureNorm:
        return cls()


def test_scorer_chains_backbone_method_and_post_processing() -> None:
    images = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    scored = Scorer(_PooledPixels(), _FeatureNorm())(images)
    expected_patches = F.avg_pool2d(images[:, :2], kernel_size=8).norm(dim=1)
    expected_maps = _reference_map(expected_patches, (64, 48), GAUSSIAN_SIGMA)
    torch.testing.assert_close(scored.patch_scores, expected_patches)
    np.testing.assert_allclose(scored.anomaly_maps.numpy(), expected_maps, atol=2e-5)
    np.testing.assert_allclose(scored.image_scores.numpy(), expected_maps.max(axis=(1, 2)), atol=2e-5)
    assert scored.extract_s > 0 and scored.score_s > 0


def test_category_thresholds_are_each_categorys_own_quantile() -> None:
    scores = np.array([1.0, 2.0, 3.0, 10.0, 20.0])
    thresholds = category_thresholds(scores, ["a", "a", "a", "b", "b"])
    assert thresholds == {"a": pytest.approx(2.98), "b": pytest.approx(19.9)}
    assert calibrated_threshold(scores) == pytest.approx(np.quantile(scores, THRESHOLD_QUANTILE))
    assert calibrated_threshold(np.array([])) is None
