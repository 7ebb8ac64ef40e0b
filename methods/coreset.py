"""Greedy k-center coreset selection, shared by patchcore's bank thinning and sgfr's "coreset" basis sampling.

Greedy farthest-point selection keeps a set's coverage of feature space while dropping near-duplicates (Sener &
Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set Approach", ICLR 2018; used for memory banks
by PatchCore, Roth et al., CVPR 2022).
"""

from __future__ import annotations

import torch

_PRUNE_FROM = 32_768
"""Sets from this size on are selected by the pruned pass: below it a pass over every point stays in cache and costs
less than the pruned pass's bookkeeping (`benchmarks/RESULTS.md`, "Greedy coreset")."""
_MARGIN = 1e-2
"""Slack, as a share of the largest vector norm, before the pruned pass rules a point out: distances expanded as
||x||^2 - 2 x.c + ||c||^2 carry rounding errors of about 1e-6 of the squared norms (1e-3 of the norm once a square
root is taken), which must never rule out a point the pass over every point would move."""


def greedy_coreset(
    vectors: torch.Tensor, n: int, seed: int = 0, projection_dim: int | None = 128, pruned: bool | None = None
) -> torch.Tensor:
    """Returns the indices of `n` vectors chosen by greedy k-center selection (farthest point first).

    Distances are computed in a random Gaussian projection to `projection_dim` dimensions (Johnson-Lindenstrauss),
    as PatchCore does, because selection only needs their ranking and full-width distances cost more. `pruned`
    chooses the pass (None: the pruned one from `_PRUNE_FROM` vectors on); both pick farthest points, and the same
    ones but for ties their rounding breaks differently.
    """
    if not 0 < n <= len(vectors):
        raise ValueError(f"coreset size must be in 1..{len(vectors)}, got {n}")
    generator = torch.Generator().manual_seed(seed)
    points = vectors.float()
    if projection_dim is not None and points.shape[1] > projection_dim:
        projection = torch.randn(points.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        points = points @ projection.to(points.device)
    start = int(torch.randint(len(points), (1,), generator=generator))
    picks = _pruned_picks if (len(points) >= _PRUNE_FROM if pruned is None else pruned) else _every_point_picks
    return picks(points, n, start)


def _every_point_picks(points: torch.Tensor, n: int, start: int) -> torch.Tensor:
    """Greedy k-center from `start`: each step measures the new center against every point."""
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


def _pruned_picks(points: torch.Tensor, n: int, start: int) -> torch.Tensor:
    """The picks of `_every_point_picks`, each step measuring only the points the new center can move.

    Every point remembers its nearest center, and each center's reach is the distance of its farthest point. A point
    whose center lies farther from the new one than twice that reach cannot come nearer to the new one (triangle
    inequality); once the reach has shrunk below the spacing of the centers, a step reads the centers and a few
    points instead of the whole set.
    """
    squared_norms = (points * points).sum(dim=1)
    margin = _MARGIN * float(squared_norms.max().sqrt())
    selected = torch.empty(n, dtype=torch.long)
    centers = torch.empty(n, points.shape[1], device=points.device)
    center_norms = torch.empty(n, device=points.device)
    min_distance = torch.full((len(points),), float("inf"), device=points.device)
    owner = torch.zeros(len(points), dtype=torch.long, device=points.device)  # each point's center, by position
    for position in range(n):
        center = start if position == 0 else int(torch.argmax(min_distance))
        selected[position] = center
        point, norm = points[center], squared_norms[center]
        if position == 0:
            movable = torch.arange(len(points), device=points.device)
        else:
            reach = torch.zeros(position, device=points.device).scatter_reduce_(0, owner, min_distance, "amax")
            gaps = center_norms[:position] - 2.0 * (centers[:position] @ point) + norm
            near = gaps.clamp_min(0.0).sqrt() <= 2.0 * reach.sqrt() + margin
            movable = torch.nonzero(near[owner]).squeeze(1)
        distance = squared_norms[movable] - 2.0 * (points[movable] @ point) + norm
        nearer = distance < min_distance[movable]
        moved = movable[nearer]
        min_distance[moved] = distance[nearer]
        owner[moved] = position
        centers[position], center_norms[position] = point, norm
    return selected
