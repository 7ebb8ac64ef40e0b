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

import dataclasses
import logging
import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from reconray.methods import knn
from reconray.methods.base import BankMethod, MethodOptions, MethodState, canonical_order, register_method
from reconray.methods.coreset import greedy_coreset
from reconray.methods.errors import check_fitted

logger = logging.getLogger(__name__)


@register_method
class PatchCore(BankMethod):
    """Nominal patch bank in a FAISS index; score = distance to the nearest nominal patch.

    Options:
        coreset_ratio: fraction of patches kept by greedy coreset selection; 1.0 keeps the full bank.
        index: FAISS index kind, "auto" (exact flat search, IVF from `knn.IVF_MIN_VECTORS` vectors), "flat" or "ivf".
        nlist, nprobe: IVF cells (0 = sqrt of the bank size) and cells visited per query.
        recall_target: with a value > 0, a bank large enough for IVF (`knn.IVF_MIN_VECTORS`) gets the cheapest
            search (index kind and nprobe, where not pinned with `--set`) whose recall@1 against exact search, on
            bank vectors left out of their own results, reaches it. A missed nearest neighbour only raises a
            nominal patch's distance to its runner-up's, so 0.95 costs little score; smaller banks are searched
            exactly. The choice and its measured recall are stored in the artifact (`method_info.search`).
        seed: seed of the coreset start and the IVF k-means, so fits are reproducible.
    """

    class Options(MethodOptions):
        coreset_ratio: float = Field(1.0, gt=0.0, le=1.0)
        index: Literal["auto", "flat", "ivf"] = "auto"
        nlist: int = Field(0, ge=0)
        nprobe: int = Field(16, ge=1)
        recall_target: float = Field(0.95, ge=0.0, le=1.0)
        seed: int = 0

    name = "patchcore"

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.index = None
        self._search: dict[str, Any] = {}

    def condense(self, vectors: torch.Tensor) -> torch.Tensor:
        """Greedy coreset of one image (when `coreset_ratio` < 1), run where the image's features are computed.

        The bank is the union of the per-image coresets: a composable coreset for k-center, within a constant factor
        of one global greedy pass, but linear in the data instead of quadratic (a global pass over MTD's 680k
        patches would take tens of minutes on CPU), and it distributes over Ray Data workers.
        """
        ratio = self.options.coreset_ratio
        if ratio >= 1.0:
            return vectors
        keep = max(1, int(round(ratio * len(vectors))))
        return vectors[greedy_coreset(vectors, keep, seed=self.options.seed)]

    def fit_bank(self, vectors: torch.Tensor, total_vectors: int | None = None) -> None:
        bank = np.ascontiguousarray(vectors[canonical_order(vectors)].float().cpu().numpy())
        del vectors  # the gathered candidates, when the caller passed them on: from here only the ordered copy counts
        query_ids = np.random.default_rng(self.options.seed).choice(
            len(bank), min(len(bank), knn.RECALL_QUERIES), replace=False)
        settings = self._search_settings(len(bank))
        self.index, choice = knn.choose_search(bank, bank[query_ids], 1, self.options.recall_target, **settings,
                                               query_ids=query_ids, seed=self.options.seed)
        kinds, nprobes = settings["kinds"], settings["nprobes"]
        if len(kinds) > 1 or ("ivf" in kinds and len(nprobes) > 1):  # chosen: the options say what, as one setting
            self.options = self.options.model_copy(update={"index": choice.kind,
                                                           "nprobe": choice.nprobe or self.options.nprobe})
        logger.info("patchcore: bank of %d vectors, search %s", len(bank), choice.describe())
        self._search = dataclasses.asdict(choice)

    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        check_fitted(self.name, self.index is not None, "score()")
        distances, _ = knn.search(self.index, vectors.float().cpu().numpy(), k=1)
        return torch.from_numpy(np.sqrt(np.maximum(distances[:, 0], 0.0))).to(vectors.device)

    def state(self) -> MethodState:
        check_fitted(self.name, self.index is not None, "state()")
        return MethodState(options=self.options.model_dump(), indexes={"bank": knn.to_cpu(self.index)},
                           info={"search": self._search} if self._search else {})

    @classmethod
    def from_state(cls, state: MethodState) -> PatchCore:
        method = cls(**state.options)
        method.index = knn.to_device(state.indexes["bank"])
        method._search = dict(state.info.get("search", {}))
        return method

    def bank_stats(self) -> tuple[int | None, int | None]:
        if self.index is None:
            return None, None
        return int(self.index.ntotal), knn.index_bytes(self.index)

    def _search_settings(self, bank_size: int) -> dict[str, Any]:
        """The searches `knn.choose_search` may pick from: the configured one while `recall_target` is 0 (its recall
        is then measured), else, for an "auto" index, exact search below `knn.IVF_MIN_VECTORS` vectors and from
        there an IVF nprobe ladder (unless nprobe is pinned) with exact search as its safe end."""
        options, choose = self.options, self.options.recall_target > 0
        ivf = bank_size >= knn.IVF_MIN_VECTORS
        if options.index != "auto":
            kinds = [options.index]
        else:
            kinds = ["flat", "ivf"] if choose and ivf else ["ivf" if ivf else "flat"]
        pinned = "nprobe" in options.model_fields_set or not choose
        return {"kinds": kinds, "dims": [0], "nprobes": [options.nprobe] if pinned else knn.NPROBE_LADDER,
                "nlist": options.nlist or round(math.sqrt(bank_size))}
