"""Greedy k-center coreset selection, shared by patchcore's bank thinning and sgfr's "coreset" basis sampling.

Greedy farthest-point selection keeps a set's coverage of feature space while dropping near-duplicates (Sener &
Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set Approach", ICLR 2018; used for memory banks
by PatchCore, Roth et al., CVPR 2022).
"""

from __future__ import annotations

import torch


def greedy_coreset(
    vectors: torch.Tensor, n: int, seed: int = 0, projection_dim: int | None = 128
) -> torch.Tensor:
    """Returns the indices of `n` vectors chosen by greedy k-center selection (farthest point first).

    Distances are computed in a random Gaussian projection to `projection_dim` dimensions (Johnson-Lindenstrauss),
    as PatchCore does, because selection only needs their ranking and full-width distances cost more.
    """
    if not 0 < n <= len(vectors):
        raise ValueError(f"coreset size must be in 1..{len(vectors)}, got {n}")
    generator = torch.Generator().manual_seed(seed)
    points = vectors.float()
    if projection_dim is not None and points.shape[1] > projection_dim:
        projection = torch.randn(points.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        points = points @ projection.to(points.device)
    start = int(torch.randint(len(points), (1,), generator=generator))
    squared_norms = (points * points).sum(dim=1)
    selected = torch.empty(n, dtype=torch.long)
    min_distance = torch.full((len(points),), float("inf"), device=points.device)
    for position in range(n):
        center = start if position == 0 else int(torch.argmax(min_distance))
        selected[position] = center
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matrix-vector product per step.
        distance = squared_norms - 2.0 * (points @ points[center]) + squared_norms[center]
        min_distance = torch.minimum(min_distance, distance)
    return selected
