"""Plain RLR, written the way the paper's code is structured: the test oracle for the efficient `methods.rlr`.

Dense `nn.MultiheadAttention` over every reference token, steered by additive -inf masks that are rebuilt on every
forward; the reference is repeated over the batch and embedded once per image. Slow on purpose: nothing here is
clever, so it is easy to check by reading, and `tests/test_rlr_model.py` requires the efficient model to match it.
Submodule and parameter names mirror `methods.rlr.RLRModel`, so one state_dict loads into both.

Example:
    >>> oracle = RLRReferenceModel([40, 112], [(32, 32), (16, 16)], d_model=64, heads=4, layers=2)
    >>> oracle.load_state_dict(efficient_model.state_dict())
    >>> reconstructions = oracle(features)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from reconray.methods.rlr import FeatureScale, check_grid, sincos_position_code, token_embedding, window_size


def dense_window_masks(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns additive `(L, L)` masks `(lca, mlka)`: 0 where attention is allowed, -inf where it is blocked.

    Built position by position like the reference: LCA may only look inside the window around the query, MLKA
    anywhere but there.
    """
    half_h, half_w = window_size(height) // 2, window_size(width) // 2
    outside = torch.ones(height, width, height, width)
    for row in range(height):
        for col in range(width):
            outside[row, col, max(row - half_h, 0) : row + half_h + 1, max(col - half_w, 0) : col + half_w + 1] = 0
    outside = outside.reshape(height * width, height * width)
    lca = torch.zeros_like(outside).masked_fill(outside == 1, float("-inf"))
    mlka = torch.zeros_like(outside).masked_fill(outside == 0, float("-inf"))
    return lca, mlka


class _ReferenceEncoderLayer(nn.Module):
    """`x = LN(2 LCA(x) + MLKA(x)); out = LN(x + FFN(x))` with dense masked attention."""

    def __init__(self, d_model: int, heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.lca = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.mlka = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """x `(B, L, d)`; reference `(B, R*L, d)`, attended chunk by chunk (L tokens each), outputs summed."""
        lca_mask, mlka_mask = (mask.to(x) for mask in dense_window_masks(*self.grid))
        lca_out = torch.zeros_like(x)
        mlka_out = torch.zeros_like(x)
        for chunk in reference.split(x.shape[1], dim=1):
            lca_out = lca_out + self.lca(x, chunk, chunk, attn_mask=lca_mask)[0]
            mlka_out = mlka_out + self.mlka(x, chunk, x, attn_mask=mlka_mask)[0]
        x = self.norm1(2 * lca_out + mlka_out)
        return self.norm2(x + self.ffn(x))


class _ReferenceLevel(nn.Module):
    """Reconstructs one level `(B, C, H, W)`; same parameters as `methods.rlr._LevelReconstructor`."""

    def __init__(
        self, channels: int, grid: tuple[int, int], d_model: int, heads: int, layers: int, ref_len: int
    ) -> None:
        super().__init__()
        height, width = grid
        self.ref_len = ref_len
        self.reference = nn.Parameter(torch.randn(1, ref_len * height * width, channels))
        self.input_embed = token_embedding(channels, d_model)
        self.reference_embed = token_embedding(channels, d_model)
        self.register_buffer("position_code", sincos_position_code(d_model, height, width), persistent=False)
        self.layers = nn.ModuleList(_ReferenceEncoderLayer(d_model, heads, grid) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.projection = nn.Linear(d_model, channels)
        self.scale = FeatureScale(channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = features.shape
        tokens = self.scale.normalize(features).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        x = self.input_embed(tokens.permute(0, 2, 1)).transpose(1, 2) + self.position_code
        reference = self.reference.repeat(batch, 1, 1)
        reference = self.reference_embed(reference.permute(0, 2, 1)).transpose(1, 2)
        reference = reference + self.position_code.repeat(self.ref_len, 1)
        for layer in self.layers:
            x = layer(x, reference)
        out = self.projection(self.norm(x))
        return self.scale.restore(out.reshape(batch, height, width, channels).permute(0, 3, 1, 2))


class RLRReferenceModel(nn.Module):
    """Dense-attention twin of `methods.rlr.RLRModel` (same arguments, same state_dict keys)."""

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
        self.grids = [check_grid(grid) for grid in grids]
        self.levels = nn.ModuleList(
            _ReferenceLevel(c, grid, d_model * 2**level, heads, layers, ref_len)
            for level, (c, grid) in enumerate(zip(channels, self.grids, strict=True))
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [level(level_features) for level, level_features in zip(self.levels, features, strict=True)]
