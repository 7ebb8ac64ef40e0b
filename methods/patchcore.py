"""PatchCore: nearest-neighbour distance to a memory bank of nominal patch features, the baseline of reconray.

Every patch of every normal training image goes into a bank (optionally thinned by greedy coreset selection, which
keeps the bank's coverage of feature space while dropping near-duplicates); a test patch scores its L2 distance to
the nearest bank vector. Paper: Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022,
https://arxiv.org/abs/2106.08265.

Example:
    >>> method = create_method("patchcore", coreset_ratio=0.1)
    >>> method.fit(feature_batches)
    >>> patch_scores = method.score(features)   # (B, h, w) distances
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from methods import knn
from methods.base import BankMethod, MethodState, register_method


@register_method
class PatchCore(BankMethod):
    """Nominal patch bank in a FAISS index; score = distance to the nearest nominal patch.

    Options:
        coreset_ratio: fraction of patches kept by greedy coreset selection; 1.0 keeps the full bank.
        index: FAISS index kind, "auto" (exact flat search, IVF from `knn.IVF_MIN_VECTORS` vectors), "flat" or "ivf".
        nlist, nprobe: IVF cells (0 = sqrt of the bank size) and cells visited per query.
        seed: seed of the coreset start and the IVF k-means, so fits are reproducible.
    """

    name = "patchcore"
    defaults: dict[str, Any] = {"coreset_ratio": 1.0, "index": "auto", "nlist": 0, "nprobe": 16, "seed": 0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not 0.0 < self.options["coreset_ratio"] <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.options['coreset_ratio']}")
        self.index = None

    def condense(self, vectors: torch.Tensor) -> torch.Tensor:
        """Greedy coreset of one batch (when `coreset_ratio` < 1), run where the batch's features are computed.

        The bank is the union of the per-batch coresets: a composable coreset for k-center, within a constant factor
        of one global greedy pass, but linear in the data instead of quadratic (a global pass over MTD's 680k
        patches would take tens of minutes on CPU), and it distributes over Ray Data workers.
        """
        ratio = self.options["coreset_ratio"]
        if ratio >= 1.0:
            return vectors
        keep = max(1, int(round(ratio * len(vectors))))
        return vectors[greedy_coreset(vectors, keep, seed=self.options["seed"])]

    def fit_bank(self, vectors: torch.Tensor, total_vectors: int | None = None) -> None:
        self.index = knn.build_index(
            vectors.float().cpu().numpy(),
            kind=self.options["index"],
            nlist=self.options["nlist"] or None,
            nprobe=self.options["nprobe"],
            seed=self.options["seed"],
        )

    def score(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.index is None:
            raise RuntimeError("patchcore is not fitted: call fit() or load an artifact first")
        batch, _, height, width = features[0].shape
        distances, _ = knn.search(self.index, self.embed(features).float().cpu().numpy(), k=1)
        patch_scores = torch.from_numpy(np.sqrt(np.maximum(distances[:, 0], 0.0)))
        return patch_scores.reshape(batch, height, width).to(features[0].device)

    def state(self) -> MethodState:
        vectors, size = self.bank_stats()
        return MethodState(
            options=dict(self.options),
            indexes={"bank": knn.to_cpu(self.index)},
            info={"bank_vectors": vectors, "bank_bytes": size},
        )

    @classmethod
    def from_state(cls, state: MethodState) -> PatchCore:
        method = cls(**state.options)
        method.index = knn.to_device(state.indexes["bank"])
        return method

    def bank_stats(self) -> tuple[int | None, int | None]:
        if self.index is None:
            return None, None
        return int(self.index.ntotal), knn.index_bytes(self.index)


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
