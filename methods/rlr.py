"""RLR: reconstruct backbone features from a learnable reference, and score patches by how badly they reconstruct.

Per feature level a small transformer rebuilds the features, but its attention never reads the input as keys: the
keys come from a learnable *reference* (one token per grid position, randn init, in the backbone's channel space),
so the model cannot learn the identity shortcut that lets plain reconstruction models rebuild anomalies too.
Each layer mixes two attentions (`new = 2 LCA(x) + MLKA(x); x = LN(new); out = LN(x + FFN(x))`):

- LCA, local cross-attention: query x, key = value = embedded reference, each position sees only the reference
  tokens inside its local window (5x5 at 16x16, 7x7 at 32x32, 11x11 at 64x64, see `window_size`).
- MLKA, masked long-range attention: query x, key = embedded reference, value = x, each position is blocked from
  its own window, so it must borrow from normal context elsewhere in the image.

LCA needs 49 of 1,024 reference tokens per position at 32x32, so it never builds the dense L x L problem: the grid
is cut into 16x16 query tiles, each attending (fused `scaled_dot_product_attention`, small boolean mask) to just
the block of reference tokens its windows can reach; and since the reference is the same for every image, its
keys/values are projected once per forward and the queries of the whole batch share each block. MLKA runs through
`scaled_dot_product_attention` with a boolean mask built once per grid size. `methods/rlr_reference.py` keeps the
plain dense implementation as the test oracle; both load the same state_dict.

Paper: "Learning Unified Reference Representation for Unsupervised Multi-class Anomaly Detection", ECCV 2024;
authors' code: https://github.com/hlr7999/RLR.

Example:
    >>> method = RLR(epochs=5, d_model=64, layers=2, heads=4)   # CPU-sized setting
    >>> method.fit(feature_batches)             # iterable of list[Tensor], one (B, C_l, H_l, W_l) per level
    >>> patch_scores = method.score(features)   # (B, H0, W0)

Defaults follow the reference (d_model 256 at the finest level, 512 at the next, 8 heads, 4 layers, Adam 1e-4,
batch 4, 200 epochs, jitter 4). On a CPU, `d_model=64, layers=2, heads=4, epochs=5` trains in minutes.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from reconray.methods.base import AnomalyMethod, MethodOptions, MethodState, register_method
from reconray.methods.device import pick_device
from reconray.methods.errors import DatasetError, OptionError, check_fitted

Grid = tuple[int, int]
logger = logging.getLogger(__name__)


def window_size(grid: int) -> int:
    """Side of the local window for a grid side: the largest odd number <= 11/8 * sqrt(grid), at least 3.

    The formula reproduces the reference's table exactly (16 -> 5, 32 -> 7, 64 -> 11) and grows with the grid
    like the reference does, so other input sizes keep a comparable receptive field (8 -> 3, 14 -> 5, 28 -> 7,
    128 -> 15). Integer arithmetic keeps it free of float rounding: floor(sqrt(121 g / 64)) = isqrt(121 g // 64).
    """
    if grid < 1:
        raise ValueError(f"grid side must be >= 1, got {grid}")
    side = math.isqrt(121 * grid // 64)
    if side % 2 == 0:
        side -= 1
    return max(3, side)


def check_grid(grid: Sequence[int]) -> Grid:
    """Returns `grid` as `(height, width)` after checking that MLKA leaves every position something to attend to.

    A position's window covers every row when `height <= 2 * half + 1` (the middle row's does) and every column
    when `width <= 2 * half + 1`; with both, the middle position has every key blocked.
    """
    height, width = (int(side) for side in grid)
    if height < 1 or width < 1:
        raise ValueError(f"grid {height}x{width} must have positive sides")
    window_h, window_w = window_size(height), window_size(width)
    if height <= window_h and width <= window_w:  # the window of a side is 2 * half + 1
        raise ValueError(
            f"grid {height}x{width} is too small: a {window_h}x{window_w} window covers the whole grid for some "
            f"position, leaving MLKA nothing to attend to (need a height above {window_h} or a width above {window_w})"
        )
    return height, width


@functools.cache
def local_window_mask(height: int, width: int) -> torch.Tensor:
    """Returns `(L, L)` bool, True where key position j lies inside the local window of query position i.

    Windows are clipped at the grid border (not shifted), as in the reference. Cached per grid size; callers must
    not modify the returned tensor.
    """
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= window_size(height) // 2
    near_cols = (cols[:, None] - cols[None, :]).abs() <= window_size(width) // 2
    return near_rows & near_cols


LCA_TILE = 16
"""Side of the query tiles LCA processes together: long enough blocks for the fused attention kernels, small
enough that a 64x64 grid reads only 26x26 = 676 of 4,096 reference tokens per tile (at 16x16 a tile is the grid)."""


class WindowBlocks(NamedTuple):
    """How LCA cuts a grid into query tiles, each with the block of reference tokens its windows can reach.

    Attributes:
        queries: `(T, Q)` flat position of each tile slot; slots past the grid edge repeat a real position.
        keys: `(T, S)` flat positions of the reference block each tile reads (every one inside the grid).
        allowed: `(T, Q, S)` True where a slot's window contains the key; padding slots may see the whole block
            (their output is dropped), so no row is empty.
        slot: `(L,)` index into the flattened `(T * Q)` slots where each grid position's output lands.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    allowed: torch.Tensor
    slot: torch.Tensor


def _axis_blocks(size: int, half: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile along one axis: query coordinates `(n, t)` (may run past the edge) and key coordinates `(n, s)`.

    The key span `s = min(t + 2 half, size)` is slid inward at the borders instead of padded, so every key is a
    real position and still covers the windows of all the tile's queries.
    """
    tile = min(tile, size)
    span = min(tile + 2 * half, size)
    starts = torch.arange(0, size, tile)
    queries = starts[:, None] + torch.arange(tile)
    key_starts = (starts - half).clamp(0, size - span)
    return queries, key_starts[:, None] + torch.arange(span)


@functools.cache
def window_blocks(height: int, width: int, tile: int = LCA_TILE) -> WindowBlocks:
    """Returns the LCA tiling of a `height x width` grid (see `WindowBlocks`); cached per grid size."""
    half_h, half_w = window_size(height) // 2, window_size(width) // 2
    query_rows, key_rows = _axis_blocks(height, half_h, tile)
    query_cols, key_cols = _axis_blocks(width, half_w, tile)
    tiles = len(query_rows) * len(query_cols)
    # Tile (a, b) holds queries query_rows[a] x query_cols[b] and keys key_rows[a] x key_cols[b], flattened row-major.
    q_rows = query_rows[:, None, :, None].expand(-1, len(query_cols), -1, query_cols.shape[1]).reshape(tiles, -1)
    q_cols = query_cols[None, :, None, :].expand(len(query_rows), -1, query_rows.shape[1], -1).reshape(tiles, -1)
    k_rows = key_rows[:, None, :, None].expand(-1, len(key_cols), -1, key_cols.shape[1]).reshape(tiles, -1)
    k_cols = key_cols[None, :, None, :].expand(len(key_rows), -1, key_rows.shape[1], -1).reshape(tiles, -1)
    real = (q_rows < height) & (q_cols < width)
    in_window = ((q_rows[:, :, None] - k_rows[:, None, :]).abs() <= half_h) & (
        (q_cols[:, :, None] - k_cols[:, None, :]).abs() <= half_w
    )
    slot = torch.empty(height * width, dtype=torch.long)
    slot[(q_rows * width + q_cols)[real]] = torch.nonzero(real.flatten())[:, 0]
    return WindowBlocks(
        queries=q_rows.clamp(max=height - 1) * width + q_cols.clamp(max=width - 1),
        keys=k_rows * width + k_cols,
        allowed=in_window | ~real[:, :, None],
        slot=slot,
    )


def sincos_position_code(d_model: int, height: int, width: int) -> torch.Tensor:
    """Returns the fixed 2D sin-cos position code `(L, d_model)`: first half encodes the column, second the row."""
    if d_model % 4:
        raise ValueError(f"d_model must be a multiple of 4 for a 2D sin-cos code, got {d_model}")
    half = d_model // 2
    frequencies = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * -(math.log(1e4) / half))
    col_angles = torch.arange(width, dtype=torch.float64)[:, None] * frequencies  # (W, half/2)
    row_angles = torch.arange(height, dtype=torch.float64)[:, None] * frequencies  # (H, half/2)
    code = torch.zeros(height, width, d_model, dtype=torch.float64)
    code[:, :, 0:half:2] = torch.sin(col_angles)[None]
    code[:, :, 1:half:2] = torch.cos(col_angles)[None]
    code[:, :, half::2] = torch.sin(row_angles)[:, None]
    code[:, :, half + 1 :: 2] = torch.cos(row_angles)[:, None]
    return code.reshape(height * width, d_model).float()


def token_embedding(channels: int, d_model: int) -> nn.Conv1d:
    """A 1x1 convolution from backbone channels to d_model, initialised like the reference (Kaiming, fan-in)."""
    conv = nn.Conv1d(channels, d_model, kernel_size=1)
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="leaky_relu")
    return conv


class _ReferenceAttention(nn.Module):
    """Multi-head attention whose keys come from the reference, stored like `nn.MultiheadAttention`.

    The parameter names and shapes (`in_proj_weight`, `in_proj_bias`, `out_proj`) match `nn.MultiheadAttention`,
    so the oracle in `methods/rlr_reference.py` loads the same state_dict. Several reference chunks
    (`ref_len > 1`) are attended separately and their outputs summed, as in the reference; since the reference
    projects each chunk's output (with its bias) before summing, the summed output gets the bias once per chunk.
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _projections(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Returns the (weight, bias) of the query, key and value projections.

        One `chunk` per forward, all three parts used: its backward then writes the gradients in a single
        concatenation, where separate slices would each allocate and zero a full-size gradient.
        """
        return list(zip(self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3), strict=True))

    def _heads(self, tokens: torch.Tensor, projection: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Projects `(..., L, d)` into `(..., heads, L, d / heads)`."""
        return F.linear(tokens, *projection).unflatten(-1, (self.heads, -1)).transpose(-3, -2)

    def _merge(self, heads_out: torch.Tensor, chunks: int) -> torch.Tensor:
        """Merges `(B, heads, L, dh)`, the sum over `chunks` reference chunks, into `(B, L, d)` through out_proj."""
        merged = heads_out.transpose(1, 2).flatten(2)
        return F.linear(merged, self.out_proj.weight) + chunks * self.out_proj.bias


class _LocalCrossAttention(_ReferenceAttention):
    """LCA: each position attends to the reference tokens inside its own window, computed tile by tile.

    Keys and values both come from the reference, which every image shares, so the queries of all images in the
    batch are stacked against one gathered key block per tile and per reference chunk: attention runs over
    `(R*T, heads, B*Q, S)` blocks with a small boolean mask, never over the dense L x L grid.
    """

    def __init__(self, d_model: int, heads: int, grid: Grid) -> None:
        super().__init__(d_model, heads)
        blocks = window_blocks(*grid)
        self.register_buffer("block_queries", blocks.queries, persistent=False)
        self.register_buffer("block_keys", blocks.keys, persistent=False)
        self.register_buffer("block_allowed", blocks.allowed[:, None], persistent=False)  # (T, 1, Q, S)
        self.register_buffer("block_slot", blocks.slot, persistent=False)

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """x `(B, L, d)`, reference `(R, L, d)` (R chunks) -> `(B, L, d)`."""
        batch, chunks = x.shape[0], reference.shape[0]
        tiles, slots = self.block_queries.shape
        to_query, to_key, to_value = self._projections()
        query = self._heads(x, to_query)[:, :, self.block_queries]  # (B, h, T, Q, dh)
        query = query.permute(2, 1, 0, 3, 4).flatten(2, 3)  # (T, h, B*Q, dh)
        keys = self._heads(reference, to_key)[:, :, self.block_keys].transpose(1, 2).flatten(0, 1)  # (R*T, h, S, dh)
        values = self._heads(reference, to_value)[:, :, self.block_keys].transpose(1, 2).flatten(0, 1)
        allowed = self.block_allowed[:, :, None].expand(-1, -1, batch, -1, -1).flatten(2, 3)  # (T, 1, B*Q, S)
        heads_out = F.scaled_dot_product_attention(
            query.expand(chunks, *query.shape).flatten(0, 1),
            keys,
            values,
            attn_mask=allowed.expand(chunks, *allowed.shape).flatten(0, 1),
        )  # (R*T, h, B*Q, dh)
        heads_out = heads_out.unflatten(0, (chunks, tiles)).sum(dim=0).unflatten(2, (batch, slots))
        heads_out = heads_out.permute(2, 1, 0, 3, 4).flatten(2, 3)[:, :, self.block_slot]  # (B, h, L, dh)
        return self._merge(heads_out, chunks)


class _LongRangeAttention(_ReferenceAttention):
    """MLKA: query x, key = reference, value = x; each position is blocked from its own window."""

    def __init__(self, d_model: int, heads: int, grid: Grid) -> None:
        super().__init__(d_model, heads)
        self.register_buffer("allowed", ~local_window_mask(*grid), persistent=False)

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """x `(B, L, d)`, reference `(R, L, d)` -> `(B, L, d)`."""
        batch, chunks = x.shape[0], reference.shape[0]
        to_query, to_key, to_value = self._projections()
        query = self._heads(x, to_query)[:, None]  # (B, 1, h, L, dh)
        keys = self._heads(reference, to_key)[None]  # (1, R, h, L, dh)
        values = self._heads(x, to_value)[:, None]
        shape = (batch, chunks, *query.shape[2:])
        heads_out = F.scaled_dot_product_attention(
            query.expand(shape).flatten(0, 1),
            keys.expand(shape).flatten(0, 1),
            values.expand(shape).flatten(0, 1),
            attn_mask=self.allowed,
        )
        return self._merge(heads_out.unflatten(0, (batch, chunks)).sum(dim=1), chunks)


class _EncoderLayer(nn.Module):
    """One RLR layer: `x = LN(2 LCA(x) + MLKA(x)); out = LN(x + FFN(x))` (no residual from the input: by design)."""

    def __init__(self, d_model: int, heads: int, grid: Grid) -> None:
        super().__init__()
        self.lca = _LocalCrossAttention(d_model, heads, grid)
        self.mlka = _LongRangeAttention(d_model, heads, grid)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        x = self.norm1(2 * self.lca(x, reference) + self.mlka(x, reference))
        return self.norm2(x + self.ffn(x))


class FeatureScale(nn.Module):
    """Per-channel mean and standard deviation of a level's training features (identity until set).

    The model reads standardised features and its output is mapped back to the features' own scale, so loss and
    scores stay the reference's, measured on the raw features. It is a reparametrisation: without it an output
    projection initialised for unit scale starts far below the scale of lite0's features, and Adam, which moves a
    weight by about its learning rate per step, spends thousands of steps growing it (benchmarks/RESULTS.md, "RLR
    training recipe").
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` -> standardised `(B, C, H, W)`."""
        return (features - self.mean[:, None, None]) / self.std[:, None, None]

    def restore(self, features: torch.Tensor) -> torch.Tensor:
        """Standardised `(B, C, H, W)` -> the features' scale."""
        return features * self.std[:, None, None] + self.mean[:, None, None]


def channel_statistics(batches: Iterable[Sequence[torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per level, the mean and standard deviation of every channel over all images and positions of `batches`."""
    sums: list[list[torch.Tensor]] = []
    for batch in batches:
        for level, features in enumerate(batch):
            values = features.double().transpose(0, 1).flatten(1)  # (C, B*H*W)
            moments = [values.sum(dim=1), values.pow(2).sum(dim=1), torch.tensor(float(values.shape[1]))]
            if level == len(sums):
                sums.append(moments)
            else:
                sums[level] = [total + new for total, new in zip(sums[level], moments, strict=True)]
    if not sums:
        raise DatasetError("rlr: no training features to take statistics of (empty training split?)")
    statistics = []
    for total, squares, count in sums:
        mean = total / count
        std = (squares / count - mean.pow(2)).clamp(min=0).sqrt().clamp(min=1e-6)
        statistics.append((mean.float(), std.float()))
    return statistics


class _LevelReconstructor(nn.Module):
    """Reconstructs one backbone level `(B, C, H, W)` from its learnable reference."""

    def __init__(self, channels: int, grid: Grid, d_model: int, heads: int, layers: int, ref_len: int) -> None:
        super().__init__()
        height, width = grid
        self.reference = nn.Parameter(torch.randn(1, ref_len * height * width, channels))
        self.input_embed = token_embedding(channels, d_model)
        self.reference_embed = token_embedding(channels, d_model)
        self.register_buffer("position_code", sincos_position_code(d_model, height, width), persistent=False)
        self.layers = nn.ModuleList(_EncoderLayer(d_model, heads, grid) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.projection = nn.Linear(d_model, channels)
        self.scale = FeatureScale(channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = features.shape
        x = self.input_embed(self.scale.normalize(features).flatten(2)).transpose(1, 2) + self.position_code
        reference = self.reference_embed(self.reference.transpose(1, 2)).transpose(1, 2)
        reference = reference.reshape(-1, height * width, reference.shape[-1]) + self.position_code  # (R, L, d)
        for layer in self.layers:
            x = layer(x, reference)
        out = self.projection(self.norm(x)).transpose(1, 2).reshape(batch, channels, height, width)
        return self.scale.restore(out)


def _check_architecture(channels: Sequence[int], grids: Sequence[Sequence[int]], d_model: int, heads: int) -> None:
    """Fails early, naming the values, instead of deep inside a reshape."""
    if not channels or len(channels) != len(grids):
        raise ValueError(f"need one grid per level: got {len(channels)} channel counts and {len(grids)} grids")
    if heads < 1 or d_model < 1 or d_model % heads:
        raise ValueError(f"d_model {d_model} must be a positive multiple of heads {heads}")


class RLRModel(nn.Module):
    """One reconstructor per backbone level; level l has width `d_model * 2**l` (reference: 256, 512).

    Args:
        channels: backbone channels per level, finest first.
        grids: `(H, W)` per level, finest first; the windows and position codes are built for these sizes.
        d_model: width of the finest level, a multiple of 4 and of `heads`.
        heads: attention heads.
        layers: encoder layers per level.
        ref_len: reference chunks per position (reference default 1).
    """

    def __init__(
        self,
        channels: Sequence[int],
        grids: Sequence[Sequence[int]],
        d_model: int = 256,
        heads: int = 8,
        layers: int = 4,
        ref_len: int = 1,
    ) -> None:
        super().__init__()
        _check_architecture(channels, grids, d_model, heads)
        if layers < 1 or ref_len < 1:
            raise ValueError(f"layers ({layers}) and ref_len ({ref_len}) must be >= 1")
        self.grids = [check_grid(grid) for grid in grids]
        self.levels = nn.ModuleList(
            _LevelReconstructor(c, grid, d_model * 2**level, heads, layers, ref_len)
            for level, (c, grid) in enumerate(zip(channels, self.grids, strict=True))
        )

    def set_feature_statistics(self, statistics: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Sets every level's `FeatureScale` (from `channel_statistics` of the training features)."""
        for level, (mean, std) in zip(self.levels, statistics, strict=True):
            level.scale.mean.copy_(mean)
            level.scale.std.copy_(std)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Returns the reconstruction of every level, each with the shape of its input."""
        check_features(features, [level.reference.shape[-1] for level in self.levels], self.grids)
        return [level(level_features) for level, level_features in zip(self.levels, features, strict=True)]


def check_features(features: Sequence[torch.Tensor], channels: Sequence[int], grids: Sequence[Grid]) -> None:
    """Raises a clear error when per-level features do not match the channels and grids a model was built for."""
    if len(features) != len(channels):
        raise ValueError(f"expected {len(channels)} feature levels, got {len(features)}")
    for level, (tensor, c, grid) in enumerate(zip(features, channels, grids, strict=True)):
        if tensor.ndim != 4 or tensor.shape[1] != c or tuple(tensor.shape[2:]) != tuple(grid):
            raise ValueError(
                f"level {level}: expected features (B, {c}, {grid[0]}, {grid[1]}), got {tuple(tensor.shape)}"
            )


JITTER_UNITS = ("paper", "rms")


def add_jitter(features: torch.Tensor, scale: float, unit: str = "paper") -> torch.Tensor:
    """Adds Gaussian noise to every token, its standard deviation set by the token's L2 norm and `scale`.

    `unit` "paper" is the reference's formula, std = scale * ||f|| / C: relative to the features the noise shrinks as
    1 / sqrt(C), so one scale means less noise on a wider backbone. "rms" is std = scale * ||f|| / sqrt(C), i.e.
    `scale` times the token's root-mean-square: the same relative noise on any backbone. The paper's scale s on C
    channels is rms scale s / sqrt(C) (its 4 on EfficientNet-b6's 72 / 200 channels: 0.47 / 0.28).
    """
    if unit not in JITTER_UNITS:
        raise OptionError(f"rlr jitter_unit {unit!r} is invalid; it must be one of {JITTER_UNITS}")
    channels = features.shape[1]
    token_norm = features.norm(dim=1, keepdim=True) / (channels if unit == "paper" else math.sqrt(channels))
    return features + torch.randn_like(features) * token_norm * scale


def rlr_loss(model: nn.Module, features: Sequence[torch.Tensor], jitter_scale: float, jitter_unit: str = "paper"
             ) -> torch.Tensor:
    """Training loss: reconstruct the clean features from jittered ones; MSE + (1 - cosine), summed over levels."""
    noisy = [add_jitter(level_features, jitter_scale, jitter_unit) for level_features in features]
    loss = features[0].new_zeros(())
    for target, output in zip(features, model(noisy), strict=True):
        output = output.float()
        loss = loss + F.mse_loss(output, target) + (1 - F.cosine_similarity(output, target, dim=1)).mean()
    return loss


def token_scores(features: Sequence[torch.Tensor], reconstructions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per token `mean_c (f - o)^2 + (1 - cos(f, o))`, each level upsampled to the finest grid, levels averaged."""
    finest = features[0].shape[-2:]
    maps = []
    for target, output in zip(features, reconstructions, strict=True):
        output = output.float()
        level_map = (target - output).pow(2).mean(dim=1) + 1 - F.cosine_similarity(target, output, dim=1)
        maps.append(F.interpolate(level_map[:, None], size=finest, mode="bilinear", align_corners=False)[:, 0])
    return torch.stack(maps).mean(dim=0)


PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """The compute precision in effect: "auto" is bfloat16 where the hardware multiplies bfloat16 natively (CUDA
    GPUs that support it; CPUs with AMX or AVX512-BF16 tiles), else float32."""
    if precision not in PRECISIONS:
        raise OptionError(f"rlr precision {precision!r} is invalid; it must be one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and _cpu_has_native_bfloat16() else "float32"


def autocast_for(device: torch.device, precision: str = "auto") -> AbstractContextManager[Any]:
    """bfloat16 autocast when `resolve_precision` says so, else nothing (float32).

    Autocast runs the matmuls, projections and attention in bfloat16 and keeps LayerNorm, softmax statistics, the
    loss and the weights (and so Adam's updates) in float32; bfloat16 has float32's exponent range, so no loss
    scaling is needed (speed-ups per CPU: benchmarks/RESULTS.md).
    """
    if resolve_precision(device, precision) == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@functools.cache
def _cpu_has_native_bfloat16() -> bool:
    """AMX or AVX512-BF16 (torch.cpu's probes are private, hence the guarded lookup; absent means no)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def make_optimizer(model: nn.Module, lr: float, reference_lr: float | None = None) -> torch.optim.Adam:
    """Adam as in the reference, fused (the per-parameter loop costs several times more on CPU for RLR's ~21M
    parameters), with the reference tokens in their own parameter group at `reference_lr` (None: `lr`).

    Adam moves a weight by about its learning rate per step, whatever the gradient's size, so the N(0, 1) reference
    needs on the order of 1 / lr steps to leave its random start: its own, larger rate lets a short run move it.
    Each group keeps its rate as `base_lr`, which `LRSchedule` scales.
    """
    named = list(model.named_parameters())
    reference = [param for name, param in named if name.rsplit(".", 1)[-1] == "reference"]
    rest = [param for name, param in named if name.rsplit(".", 1)[-1] != "reference"]
    groups = [{"params": rest, "lr": lr, "base_lr": lr}]
    if reference:
        rate = lr if reference_lr is None else reference_lr
        groups.append({"params": reference, "lr": rate, "base_lr": rate})
    return torch.optim.Adam(groups, fused=True)


class LRSchedule:
    """The learning rate of every step: linear warm-up over the first `warmup` share of the steps, then constant
    (the reference) or a cosine decay to zero at the last step.

    The horizon is `epochs x steps_per_epoch`. With a time budget it becomes the steps the budget is expected to hold
    (`fit_budget`, after each epoch from the pace so far), never more than the epochs allow, so a budgeted run still
    decays to the end of its training. Every Ray Train worker computes the same rates from the same agreed numbers,
    so the DDP replicas keep equal weights.
    """

    def __init__(self, options: RLR.Options, steps_per_epoch: int, step: int = 0) -> None:
        self.options = options
        self.full_horizon = max(1, options.epochs * steps_per_epoch)
        self.horizon = self.full_horizon
        self.step = step

    def factor(self, step: int | None = None) -> float:
        """The multiple of each group's `base_lr` at `step` (default: the next one)."""
        step = self.step if step is None else step
        warmup_steps = self.options.warmup * self.horizon
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if self.options.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1.0, self.horizon - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Sets every group's rate for the next step and counts it."""
        factor = self.factor()
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self.step += 1

    def fit_budget(self, elapsed_s: float) -> None:
        """Shrinks (or regrows, up to the epochs' horizon) the horizon to the steps `time_budget_s` holds at the pace
        of the `self.step` steps taken in `elapsed_s` seconds."""
        if self.options.time_budget_s is not None and self.step and elapsed_s > 0:
            expected = math.ceil(self.step * self.options.time_budget_s / elapsed_s)
            self.horizon = max(1, min(self.full_horizon, expected))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    features: Sequence[torch.Tensor],
    options: RLR.Options,
    schedule: LRSchedule | None = None,
) -> float:
    """One optimisation step on a batch of clean features (fresh jitter each call, the schedule's rate when one is
    given, else each group's current rate); returns the loss."""
    if schedule is not None:
        schedule.apply(optimizer)
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(features[0].device, options.precision):
        loss = rlr_loss(model, features, options.jitter, options.jitter_unit)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Sequence[torch.Tensor]],
    options: RLR.Options,
    schedule: LRSchedule | None = None,
) -> tuple[float, int]:
    """One epoch over `batches` (per-level feature tensors, already on the model's device).

    The one training loop of RLR: `RLR.fit` feeds it in-memory batches, the Ray Train workers
    (`reconray.pipelines.train_rlr`) their dataset shard. Returns the sum of per-image losses and the image count,
    so that callers can total them over workers before averaging.
    """
    loss_sum, images = 0.0, 0
    for batch in batches:
        loss = train_step(model, optimizer, batch, options, schedule)
        loss_sum += loss * len(batch[0])
        images += len(batch[0])
    return loss_sum, images


RECIPES: dict[str, dict[str, Any]] = {
    "reference": {},
    "cpu": {
        "epochs": 40,
        "d_model": 64,
        "layers": 1,
        "heads": 4,
        "batch_size": 4,
        "lr": 3e-3,
        "reference_lr": 3e-2,
        "lr_schedule": "constant",
        "warmup": 0.0,
        "jitter": 0.4,
        "jitter_unit": "rms",
        "standardize": True,
        "sampling": "balanced",
    },
}
"""Option values per recipe, for the options a user leaves unset. "reference" is the paper's (the option defaults:
d_model 256, 4 layers, 8 heads, Adam 1e-4 constant, batch 4, 200 epochs, jitter 4), for a GPU and days. "cpu" is
sized for a laptop's cores, chosen on validation splits (benchmarks/RESULTS.md, "RLR training recipe")."""


def pick_recipe(recipe: str, gpu: bool) -> tuple[str, str]:
    """The concrete recipe for `recipe` and why: "auto" is the reference recipe when training on a GPU, else "cpu"."""
    if recipe != "auto":
        return recipe, "asked for"
    return ("reference", "auto: training on a GPU") if gpu else ("cpu", "auto: no GPU to train on")


def category_repeats(counts: dict[str, int]) -> dict[str, int]:
    """How often balanced sampling reads each category's images per epoch: the largest category's count over its
    own, rounded (at least once), so every category fills about as many steps as the largest (rounding keeps each
    within a factor of 1.5 of it)."""
    largest = max(counts.values())
    return {category: max(1, round(largest / count)) for category, count in counts.items()}


def patience_ran_out(scores: Sequence[float], patience: int | None) -> bool:
    """Early stopping: whether the last `patience` validation scores all failed to beat the best one before them."""
    if patience is None or len(scores) <= patience:
        return False
    return max(scores[-patience:]) <= max(scores[:-patience])


def budget_spent(options: RLR.Options, elapsed_s: float) -> bool:
    """Whether `options.time_budget_s` seconds of training are used up (never, without a budget)."""
    return options.time_budget_s is not None and elapsed_s >= options.time_budget_s


def jitter_seed(seed: int, start_epoch: int, rank: int) -> int:
    """Seed of the feature-jitter noise of one worker from one start: a resumed or restarted worker and every rank of a
    run draw fresh noise instead of replaying the sequence of another."""
    return seed + 1000 * start_epoch + rank + 1


def epoch_record(
    epoch: int, loss_sum: float, images: int, epoch_s: float, elapsed_s: float, history: Sequence[float],
    resumed_from_epoch: int = 0,
) -> dict[str, Any]:
    """What every training path records after an epoch (`epoch` counts from 1): the info of a fitted RLR."""
    loss = loss_sum / max(images, 1)
    return {
        "epoch": epoch,
        "loss": loss,
        "losses": [*history, loss],
        "images": images,
        "images_per_s": images / max(epoch_s, 1e-9),
        "elapsed_s": elapsed_s,
        "resumed_from_epoch": resumed_from_epoch,
    }


@register_method
class RLR(AnomalyMethod):
    """Learnable-reference reconstruction; one model for every category (the unified, multi-class setting).

    Options (`--set key=value`) define the model and its optimisation, never where it runs (workers, CPUs, GPUs and
    checkpoints are `reconray.pipelines` training settings):
    - model: layers, d_model (finest level; doubled per coarser level), heads, ref_len, standardize (the model reads
      standardised features and maps its output back, `FeatureScale`; loss and scores stay on the raw features).
    - optimisation: epochs, lr, reference_lr (the reference tokens' own rate; None: lr), lr_schedule ("constant",
      "cosine") with warmup (share of the steps), batch_size (per worker), jitter with jitter_unit ("paper": the
      reference's formula; "rms": a share of each token's root-mean-square, the same on any backbone, see
      `add_jitter`), sampling ("balanced": a distributed fit repeats each category's images to match the largest
      one, `category_repeats`; "shuffle": every image once), precision ("auto": bfloat16 autocast on hardware with
      native bfloat16 matmuls, see `resolve_precision`; "float32"; "bfloat16"), seed.
    - budgets and selection: time_budget_s (training ends after the first epoch that finishes past this many
      seconds, earlier attempts of a resumed run included; `epochs` still bounds it, and a cosine decay ends where
      the budget is expected to), select ("validation": a distributed fit holds out a validation split of the
      training images, scores it during training and keeps the best checkpoint; "last": trains on every image and
      keeps the last epoch), patience (early stopping: end after this many scored epochs in a row without a new
      best; None: never).
    - recipe ("auto", "cpu", "reference"): fills every option left unset (`RECIPES`); "auto" is the reference
      recipe when training on a GPU and the CPU recipe otherwise (`use_recipe`, which logs the choice).
    The option defaults are the reference's. The device is chosen at run time (CUDA when present).
    """

    class Options(MethodOptions):
        epochs: int = Field(200, ge=1)
        lr: float = Field(1e-4, gt=0.0)
        batch_size: int = Field(4, ge=1)
        layers: int = Field(4, ge=1)
        d_model: int = Field(256, ge=4)
        heads: int = Field(8, ge=1)
        ref_len: int = Field(1, ge=1)
        jitter: float = Field(4.0, ge=0.0)
        precision: Literal["auto", "float32", "bfloat16"] = "auto"
        seed: int = 0
        time_budget_s: float | None = Field(None, gt=0.0)
        select: Literal["validation", "last"] = "validation"
        lr_schedule: Literal["constant", "cosine"] = "constant"
        warmup: float = Field(0.0, ge=0.0, lt=1.0)
        reference_lr: float | None = Field(None, gt=0.0)
        jitter_unit: Literal["paper", "rms"] = "paper"
        standardize: bool = False
        sampling: Literal["shuffle", "balanced"] = "shuffle"
        patience: int | None = Field(None, ge=1)
        recipe: Literal["auto", "cpu", "reference"] = "auto"

        @model_validator(mode="after")
        def _check_width(self) -> RLR.Options:
            if self.d_model % 4 or self.d_model % self.heads:
                raise ValueError(f"d_model {self.d_model} must be a multiple of 4 and of heads {self.heads}")
            return self

    name: ClassVar[str] = "rlr"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.model: RLRModel | None = None
        self.device = pick_device()
        self.info: dict[str, Any] = {}

    @property
    def selects_on_validation(self) -> bool:
        return self.options.select == "validation"

    def use_recipe(self, gpu: bool) -> None:
        """Fills every option the user did not set from its recipe (`RECIPES`, `pick_recipe`) and logs which and why."""
        recipe, reason = pick_recipe(self.options.recipe, gpu)
        unset = set(RLR.Options.model_fields) - self.options.model_fields_set
        filled = {key: value for key, value in RECIPES[recipe].items() if key in unset}
        if self.options.recipe != recipe or filled:
            logger.info("rlr: %s recipe (%s)%s", recipe, reason,
                        f"; it sets {', '.join(f'{k}={v}' for k, v in filled.items())}" if filled else "")
        self.options = RLR.Options(**(self.options.model_dump() | filled | {"recipe": recipe}))

    def build_model(self, channels: Sequence[int], grids: Sequence[Sequence[int]]) -> RLRModel:
        """Returns a freshly initialised model for these levels (seeded, so every Ray worker starts alike)."""
        torch.manual_seed(self.options.seed)
        return RLRModel(
            channels,
            grids,
            d_model=self.options.d_model,
            heads=self.options.heads,
            layers=self.options.layers,
            ref_len=self.options.ref_len,
        )

    def fit(self, feature_batches: Iterable[list[torch.Tensor]]) -> None:
        """Trains in this process on all batches (held in memory; they are reused every epoch with fresh jitter).

        `reconray.pipelines.train_rlr` runs the same `train_epoch` on Ray Train workers, resumably.
        """
        levels = [list(level) for level in zip(*feature_batches, strict=True)]
        if not levels:
            raise DatasetError("rlr: no training features to fit on (empty training split?)")
        features = [torch.cat(level).float() for level in levels]
        channels, grids = [f.shape[1] for f in features], [list(f.shape[2:]) for f in features]
        self.use_recipe(self.device.type == "cuda")
        options = self.options
        model = self.build_model(channels, grids)
        if options.standardize:
            model.set_feature_statistics(channel_statistics([features]))
        model = model.to(self.device).train()
        optimizer = make_optimizer(model, options.lr, options.reference_lr)
        schedule = LRSchedule(options, math.ceil(len(features[0]) / options.batch_size))
        torch.manual_seed(jitter_seed(options.seed, 0, 0))
        shuffle = torch.Generator().manual_seed(options.seed)
        record: dict[str, Any] = {}
        started = time.perf_counter()
        for epoch in range(options.epochs):
            epoch_started = time.perf_counter()
            order = torch.randperm(len(features[0]), generator=shuffle).split(options.batch_size)
            batches = ([level[rows].to(self.device) for level in features] for rows in order)
            loss_sum, images = train_epoch(model, optimizer, batches, options, schedule)
            now = time.perf_counter()
            record = epoch_record(epoch + 1, loss_sum, images, now - epoch_started, now - started,
                                  record.get("losses", []))
            record["steps"] = schedule.step
            schedule.fit_budget(record["elapsed_s"])
            if budget_spent(options, record["elapsed_s"]):
                break
        self.load_trained(model.state_dict(), channels, grids, record)

    def load_trained(
        self, tensors: dict[str, torch.Tensor], channels: Sequence[int], grids: Sequence[Sequence[int]],
        info: dict[str, Any],
    ) -> RLR:
        """Makes this method the fitted model with these weights, whoever trained them (this process, Ray Train)."""
        model = self.build_model(channels, grids)
        model.load_state_dict(tensors)
        self.model = model.to(self.device).eval()
        self.info = {**info, "channels": list(channels), "grids": [list(grid) for grid in grids]}
        return self

    def score(self, features: list[torch.Tensor]) -> torch.Tensor:
        check_fitted(self.name, self.model is not None, "score()")
        inputs = [level.to(self.device, torch.float32) for level in features]
        with torch.no_grad(), autocast_for(self.device, self.options.precision):
            reconstructions = self.model(inputs)
        return token_scores(inputs, reconstructions).to(features[0].device)

    def state(self) -> MethodState:
        check_fitted(self.name, self.model is not None, "state()")
        tensors = {key: value.detach().cpu().contiguous() for key, value in self.model.state_dict().items()}
        return MethodState(options=self.options.model_dump(), tensors=tensors, info=dict(self.info))

    @classmethod
    def from_state(cls, state: MethodState) -> RLR:
        info = dict(state.info)
        return cls(**state.options).load_trained(state.tensors, info.pop("channels"), info.pop("grids"), info)

    def to(self, device: torch.device | str) -> RLR:
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
        return self
