"""Scoring: bilinear upsampling, Gaussian sigma 4 against scipy, image score = max, and the `Scorer` chain."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.transform import resize

from reconray.methods.backbone import FeatureExtractor
from reconray.methods.base import AnomalyMethod, MethodState
from reconray.methods.scoring import GAUSSIAN_SIGMA, Scorer, anomaly_map, image_scores

RADIUS = int(4 * GAUSSIAN_SIGMA)


def _patch_scores(batch: int = 2, height: int = 8, width: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((batch, height, width), dtype=np.float32) * 5)


def test_upsampling_is_bilinear_with_half_pixel_centres() -> None:
    patches = _patch_scores()
    maps = anomaly_map(patches, (64, 80), sigma=0)
    assert maps.shape == (2, 64, 80)
    for got, patch in zip(maps.numpy(), patches.numpy(), strict=True):
        expected = resize(patch, (64, 80), order=1, mode="edge", anti_aliasing=False)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_gaussian_sigma_4_matches_scipy_in_the_interior() -> None:
    patches = _patch_scores(height=12, width=14)
    maps = anomaly_map(patches, (96, 112)).numpy()
    upsampled = anomaly_map(patches, (96, 112), sigma=0).numpy()
    assert GAUSSIAN_SIGMA == 4.0
    for got, plain in zip(maps, upsampled, strict=True):
        expected = ndimage.gaussian_filter(plain.astype(np.float64), sigma=4, mode="reflect", truncate=4.0)
        interior = (slice(RADIUS, -RADIUS), slice(RADIUS, -RADIUS))
        np.testing.assert_allclose(got[interior], expected[interior], atol=1e-5)
        assert not np.allclose(got, plain, atol=1e-2)


def test_border_is_mirrored_without_repeating_the_edge_pixel() -> None:
    """torch's "reflect" padding is scipy's "mirror"; this pins the border convention of every heatmap."""
    plain = anomaly_map(_patch_scores(batch=1), (64, 80), sigma=0)[0].numpy()
    blurred = anomaly_map(_patch_scores(batch=1), (64, 80))[0].numpy()
    expected = ndimage.gaussian_filter(plain.astype(np.float64), sigma=4, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(blurred, expected, atol=1e-5)


def test_constant_scores_stay_constant() -> None:
    maps = anomaly_map(torch.full((1, 4, 4), 2.5), (40, 40))
    np.testing.assert_allclose(maps.numpy(), 2.5, atol=1e-5)


def test_image_score_is_the_maximum_of_the_map() -> None:
    maps = torch.zeros(3, 16, 16)
    maps[0, 3, 4], maps[1, 15, 15], maps[2] = 7.0, 2.0, -1.0
    assert image_scores(maps).tolist() == [7.0, 2.0, -1.0]
    blurred = anomaly_map(_patch_scores(seed=3), (64, 80))
    assert torch.equal(image_scores(blurred), blurred.flatten(1).max(dim=1).values)


class _FeatureNorm(AnomalyMethod):
    """Scores a patch by the norm of its finest-level feature: enough to check what Scorer does around a method."""

    name = "feature_norm"
    defaults: dict = {}

    def fit(self, feature_batches: Iterable[list[torch.Tensor]]) -> None:
        """Nothing to learn."""

    def score(self, features: list[torch.Tensor]) -> torch.Tensor:
        return features[0].norm(dim=1)

    def state(self) -> MethodState:
        return MethodState(options={})

    @classmethod
    def from_state(cls, state: MethodState) -> _FeatureNorm:
        return cls()


def test_scorer_chains_backbone_method_and_post_processing(extractor: FeatureExtractor) -> None:
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scored = Scorer(extractor, _FeatureNorm())(images)
    expected_patches = extractor(images)[0].norm(dim=1)
    assert scored.patch_scores.shape == (2, 8, 8)
    torch.testing.assert_close(scored.patch_scores, expected_patches)
    torch.testing.assert_close(scored.anomaly_maps, anomaly_map(expected_patches, (64, 64)))
    torch.testing.assert_close(scored.image_scores, scored.anomaly_maps.flatten(1).amax(1))
    assert scored.extract_s > 0 and scored.score_s > 0


def test_non_positive_sigma_means_no_smoothing() -> None:
    patches = _patch_scores()
    assert torch.equal(anomaly_map(patches, (16, 20), sigma=0), anomaly_map(patches, (16, 20), sigma=-1))


@pytest.mark.parametrize("size", [(64, 64), (33, 47)])
def test_map_has_the_image_size(size: tuple[int, int]) -> None:
    assert anomaly_map(_patch_scores(), size).shape == (2, *size)
