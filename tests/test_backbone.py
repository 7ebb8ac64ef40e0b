"""Backbone: offline Lite0 weights classify real photos, feature shapes, level alignment, weight resolution errors."""

from __future__ import annotations

import re

import huggingface_hub.constants
import pytest
import safetensors.torch
import skimage.data
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reconray.methods.artifact import ModelSpec
from reconray.methods.backbone import (
    AGGREGATIONS,
    DEFAULT_BACKBONE,
    DEFAULT_IMAGE_SIZE,
    FeatureExtractor,
    _tile_spans,
    backbone_normalization,
    check_geometry,
    concat_levels,
    create_classifier,
)
from reconray.methods.errors import OptionError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor().to(DEVICE)


@pytest.fixture(scope="module")
def lite0_classifier() -> nn.Module:
    return create_classifier()


def _normalized(image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Resizes an HxWx3 uint8 photo to size x size and normalizes it the way the weights expect."""
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@pytest.mark.parametrize(("photo", "imagenet_class"), [(skimage.data.chelsea, 285), (skimage.data.coffee, 967)])
def test_offline_lite0_classifies_photos(lite0_classifier: nn.Module, photo, imagenet_class: int) -> None:
    mean, std = backbone_normalization(DEFAULT_BACKBONE)
    assert mean == std == (0.5, 0.5, 0.5)
    size = lite0_classifier.pretrained_cfg["input_size"][-1]
    with torch.no_grad():
        logits = lite0_classifier(_normalized(photo(), size, mean, std))
    assert logits.argmax(dim=1).item() == imagenet_class


@pytest.mark.parametrize("size", [DEFAULT_IMAGE_SIZE, 128])
def test_feature_shapes_channels_strides(extractor: FeatureExtractor, size: int) -> None:
    features = extractor(torch.randn(2, 3, size, size, device=DEVICE))
    assert (extractor.levels, extractor.channels, extractor.strides) == ([2, 3], [40, 112], [8, 16])
    fine, coarse = size // 8, size // 16
    assert [tuple(level.shape) for level in features] == [(2, 40, fine, fine), (2, 112, coarse, coarse)]
    assert all(level.device.type == DEVICE.type and not level.requires_grad for level in features)


def test_cpu_passes_split_large_batches_without_changing_the_features(extractor: FeatureExtractor) -> None:
    """Batches over CPU_PASS_PIXELS run in several passes; every image gets the features it gets alone."""
    from reconray.methods.backbone import CPU_PASS_PIXELS

    size = 128
    per_pass = CPU_PASS_PIXELS // (size * size)
    images = torch.randn(per_pass + 3, 3, size, size, generator=torch.Generator().manual_seed(0))
    calls = []
    handle = extractor.model.register_forward_hook(lambda _module, inputs, _output: calls.append(len(inputs[0])))
    try:
        batched = extractor(images)
    finally:
        handle.remove()
    assert calls == [per_pass, 3]
    for row in (0, per_pass - 1, per_pass, per_pass + 2):
        for level, alone in zip(batched, extractor(images[row : row + 1]), strict=True):
            torch.testing.assert_close(level[row : row + 1], alone, rtol=1e-4, atol=1e-4)


def test_extractor_stays_frozen_in_eval_mode(extractor: FeatureExtractor) -> None:
    extractor.train()
    assert not any(module.training for module in extractor.modules())
    assert not any(parameter.requires_grad for parameter in extractor.parameters())


def test_normalization_of_other_backbones_comes_from_timm() -> None:
    assert backbone_normalization("resnet18") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_concat_levels_aligns_on_finest_grid() -> None:
    fine, coarse = torch.randn(2, 40, 32, 32), torch.randn(2, 112, 16, 16)
    patches = concat_levels([fine, coarse])
    assert patches.shape == (2, 152, 32, 32)
    assert torch.equal(patches[:, :40], fine)
    assert torch.equal(patches[:, 40:], F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False))
    assert concat_levels([coarse, fine]).shape == (2, 152, 32, 32)


def test_concat_levels_refuses_empty_list() -> None:
    with pytest.raises(ValueError, match="at least one feature level"):
        concat_levels([])


class _ConstantFeatures(nn.Module):
    """Stand-in backbone: a constant map of 5.0 with one 4x4 block of 9.0, to isolate the local average."""

    def forward(self, images: Tensor) -> list[Tensor]:
        level = torch.full((images.shape[0], 1, 16, 16), 5.0)
        level[:, :, 8:12, 8:12] = 9.0
        return [level]


def test_local_average_keeps_constant_regions_constant() -> None:
    extractor = FeatureExtractor(pretrained=False)
    extractor.model = _ConstantFeatures()
    (averaged,) = extractor(torch.zeros(1, 3, 64, 64))
    far_from_block = torch.ones(16, 16, dtype=torch.bool)
    far_from_block[7:13, 7:13] = False
    assert torch.equal(averaged[0, 0][far_from_block], torch.full((int(far_from_block.sum()),), 5.0))
    assert averaged[0, 0, 9, 9] == 9.0 and averaged[0, 0, 7, 7] == pytest.approx((8 * 5.0 + 9.0) / 9)


class _TwoLevels(nn.Module):
    """Stand-in backbone with fixed random fine (8x8) and coarse (4x4) maps, to compare the aggregation orders."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.fine = torch.randn(1, 2, 8, 8, generator=generator)
        self.coarse = torch.randn(1, 3, 4, 4, generator=generator)

    def forward(self, images: Tensor) -> list[Tensor]:
        return [self.fine.expand(len(images), -1, -1, -1), self.coarse.expand(len(images), -1, -1, -1)]


def _average(level: Tensor, pool: int) -> Tensor:
    return F.avg_pool2d(level, pool, stride=1, padding=pool // 2, count_include_pad=False)


@pytest.mark.parametrize("pool", [1, 3, 5])
def test_aggregation_orders_pool_and_align_as_named(pool: int) -> None:
    """pool-align averages each level on its own grid; align-pool upsamples the coarse level to the fine grid first,
    so its window covers `pool` fine cells, not `pool` coarse ones."""
    backbone = _TwoLevels()
    upsampled = F.interpolate(backbone.coarse, size=(8, 8), mode="bilinear", align_corners=False)
    outputs = {}
    for aggregation in AGGREGATIONS:
        extractor = FeatureExtractor(pretrained=False, aggregation=aggregation, pool=pool)
        extractor.model = backbone
        outputs[aggregation] = extractor(torch.zeros(2, 3, 64, 64))
    fine, coarse = outputs["pool-align"]
    torch.testing.assert_close(fine[:1], _average(backbone.fine, pool))
    torch.testing.assert_close(coarse[:1], _average(backbone.coarse, pool))
    fine, coarse = outputs["align-pool"]
    torch.testing.assert_close(fine[:1], _average(backbone.fine, pool))
    torch.testing.assert_close(coarse[:1], _average(upsampled, pool))
    pooled_then_aligned = concat_levels(outputs["pool-align"])
    aligned_then_pooled = concat_levels(outputs["align-pool"])
    assert pooled_then_aligned.shape == aligned_then_pooled.shape == (2, 5, 8, 8)
    torch.testing.assert_close(pooled_then_aligned[:, :2], aligned_then_pooled[:, :2])
    assert torch.equal(pooled_then_aligned[:, 2:], aligned_then_pooled[:, 2:]) == (pool == 1)


def test_bad_aggregation_and_pool_are_refused() -> None:
    with pytest.raises(OptionError, match="unknown feature aggregation 'mean'"):
        FeatureExtractor(pretrained=False, aggregation="mean")
    with pytest.raises(OptionError, match="odd window side >= 1.*got 2"):
        FeatureExtractor(pretrained=False, pool=2)


@pytest.mark.parametrize(("side", "tile"), [(640, 256), (512, 256), (256, 256), (96, 32), (128, 64)])
def test_tile_spans_cover_the_side_once_with_a_quarter_tile_of_overlap(side: int, tile: int) -> None:
    spans = _tile_spans(side, tile, 16)
    assert spans[0][1] == 0 and spans[-1][2] == side
    assert all(high == low for (_, _, high), (_, low, _) in zip(spans, spans[1:], strict=False))
    for start, low, high in spans:
        assert start % 16 == low % 16 == high % 16 == 0 and start <= low < high <= start + tile
    assert all(later[0] - earlier[0] <= 0.75 * tile for earlier, later in zip(spans, spans[1:], strict=False))


def test_tiles_are_stitched_from_the_tile_each_cell_is_most_central_in() -> None:
    images = torch.randn(2, 3, 128, 128, device=DEVICE)
    whole, tiled = FeatureExtractor(pool=1).to(DEVICE), FeatureExtractor(pool=1, tile=64).to(DEVICE)
    single = FeatureExtractor(pool=1, tile=128).to(DEVICE)(images)  # one tile the size of the image: no tiling
    for level, reference in zip(single, whole(images), strict=True):
        torch.testing.assert_close(level, reference)
    stitched = tiled(images)
    assert [level.shape for level in stitched] == [level.shape for level in whole(images)]
    spans = _tile_spans(128, 64, 16)
    for top, row_low, row_high in spans:
        for left, col_low, col_high in spans:
            alone = whole(images[..., top:top + 64, left:left + 64])
            for level, tile_level, stride in zip(stitched, alone, whole.strides, strict=True):
                torch.testing.assert_close(
                    level[..., row_low // stride:row_high // stride, col_low // stride:col_high // stride],
                    tile_level[..., (row_low - top) // stride:(row_high - top) // stride,
                               (col_low - left) // stride:(col_high - left) // stride])


def test_bad_tile_and_resize_are_refused() -> None:
    with pytest.raises(OptionError, match="tile 40 must be a multiple of .*coarsest stride 16"):
        FeatureExtractor(pretrained=False, tile=40)
    with pytest.raises(OptionError, match="tile must be between 32 px and the image size 64, got 128"):
        check_geometry(64, "square", 128)
    with pytest.raises(OptionError, match="unknown resize 'crop'"):
        check_geometry(64, "crop", None)
    spec = {"backbone": DEFAULT_BACKBONE, "levels": [2, 3], "image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ValueError, match="tile must be between 32 px and the image size 64, got 16"):
        ModelSpec(**spec, tile=16)


def test_bad_level_names_value_and_range() -> None:
    message = "feature level 7 is out of range (0 to 4) for tf_efficientnet_lite0"
    with pytest.raises(ValueError, match=re.escape(message)):
        FeatureExtractor(levels=(2, 7), pretrained=False)
    with pytest.raises(ValueError, match=re.escape("strictly increasing (finest first), got [3, 2]")):
        FeatureExtractor(levels=(3, 2), pretrained=False)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_explicit_weights_file_is_loaded(tmp_path, suffix: str) -> None:
    saved = create_classifier(pretrained=False).state_dict()
    path = tmp_path / f"lite0{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(saved, path)
    else:
        torch.save(saved, path)
    loaded = create_classifier(weights=path).state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[key], loaded[key]) for key in saved)
    extractor = FeatureExtractor(weights=path)
    assert torch.equal(extractor.model.state_dict()["blocks.3.0.conv_pw.weight"], saved["blocks.3.0.conv_pw.weight"])


@pytest.mark.parametrize(
    ("backbone", "features_key", "classifier_key"),
    [
        ("test_convnext", "stem_0.weight", "stem.0.weight"),
        ("test_vit_relpos", "model.patch_embed.proj.weight", "patch_embed.proj.weight"),
    ],
)
def test_explicit_weights_reach_renaming_features_wrappers(
    tmp_path, backbone: str, features_key: str, classifier_key: str
) -> None:
    saved = create_classifier(backbone, pretrained=False).state_dict()
    path = tmp_path / f"{backbone}.pth"
    torch.save(saved, path)
    extractor = FeatureExtractor(backbone, levels=(1, 2), weights=path)
    assert torch.equal(extractor.model.state_dict()[features_key], saved[classifier_key])
    assert not any("state_dict" in getattr(module, "pretrained_cfg", {}) for module in extractor.modules())


def test_missing_weights_file_names_the_path(tmp_path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(OptionError, match=re.escape(str(path))):
        FeatureExtractor(weights=path)


def test_weights_of_another_backbone_are_refused(tmp_path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(create_classifier("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match=re.escape(f"weights file {path} is not a tf_efficientnet_lite0 state dict")):
        FeatureExtractor(weights=path)


def test_unreachable_hub_says_how_to_pass_a_local_file(monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    advice = "`--backbone resnet18` with `--weights /path/to/model.safetensors`"
    with pytest.raises(OptionError, match=re.escape(advice)):
        FeatureExtractor("resnet18", levels=(1, 2))
