"""FAISS nearest-neighbour indexes shared by every bank-based method (patchcore's bank, sgfr's basis).

One place decides the index type, so methods stay free of FAISS plumbing: exact flat L2 search while the bank is
small, an inverted-file index (IVF, `nlist` cells, `nprobe` visited per query) once it is large, and a GPU copy of
either when a GPU is present. Saved indexes are always CPU indexes (`faiss.write_index` cannot write GPU ones).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import faiss
import numpy as np

IVF_MIN_VECTORS = 200_000
"""Banks at least this large get an IVF index by default: exact search over them costs seconds per image on CPU."""

_TRAIN_POINTS_PER_CELL = 64

RECALL_QUERIES = 1024
"""Held-out vectors the recall of a search setting is measured on: its standard error at a recall of 0.95 is about
0.007 / sqrt(k), well below the gaps between the settings of a ladder."""
NPROBE_LADDER = (1, 2, 4, 8, 16, 32, 64, 128)
"""IVF cells visited per query that `choose_search` tries, cheapest first."""


def build_index(
    vectors: np.ndarray,
    kind: str = "auto",
    nlist: int | None = None,
    nprobe: int = 16,
    use_gpu: bool | None = None,
    seed: int = 0,
    ivf_from: int | None = None,
    search_dims: int = 0,
) -> faiss.Index:
    """Builds an L2 index over `vectors` `(N, D)`.

    Args:
        vectors: the bank, float32 or castable to it.
        kind: "flat" (exact), "ivf" (inverted file, approximate) or "auto" (ivf from `ivf_from` vectors on).
        nlist: IVF cells; default sqrt(N), which keeps training and probing cheap.
        nprobe: IVF cells visited per query.
        use_gpu: put the index on the GPU; None = when FAISS sees one.
        seed: k-means seed, so that a fit is reproducible.
        ivf_from: bank size from which "auto" picks IVF; a method whose score tolerates approximate neighbours
            lowers it (None: `IVF_MIN_VECTORS`).
        search_dims: when in (0, D), the index searches a PCA projection of the vectors onto this many dimensions
            (a FAISS `IndexPreTransform`, trained on `vectors` and saved with the index): neighbours are found by
            their projected distance, and the distances `search` returns are projected distances.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"need a non-empty (N, D) bank to index, got shape {vectors.shape}")
    if kind not in ("auto", "flat", "ivf"):
        raise ValueError(f"unknown index kind {kind!r}; choose auto, flat or ivf")
    count, dim = vectors.shape
    if kind == "auto":
        kind = "ivf" if count >= (ivf_from or IVF_MIN_VECTORS) else "flat"
    projected = 0 < search_dims < dim
    if projected:
        pca = faiss.PCAMatrix(dim, search_dims)
        pca.train(vectors)
        searched, dim = pca.apply(vectors), search_dims
    else:
        searched = vectors
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatL2(dim)
    else:
        cells = max(1, min(nlist or int(math.sqrt(count)), count))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, cells)
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # small bases train on all they have; FAISS would warn below 39 per cell
        rng = np.random.default_rng(seed)
        sample_size = min(count, cells * _TRAIN_POINTS_PER_CELL)
        index.train(searched[rng.choice(count, sample_size, replace=False)] if sample_size < count else searched)
        index.nprobe = min(nprobe, cells)
    index.add(searched)
    if projected:
        index = faiss.IndexPreTransform(pca, index)
    return to_device(index, use_gpu)


def to_device(index: faiss.Index, use_gpu: bool | None = None) -> faiss.Index:
    """Returns `index` on the GPU when asked (or, with None, when FAISS has a GPU), else unchanged."""
    if use_gpu is None:
        use_gpu = gpu_available()
    if not use_gpu:
        return index
    if not gpu_available():
        raise RuntimeError("a GPU FAISS index was requested but FAISS sees no GPU (install the 'gpu' extra)")
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


def to_cpu(index: faiss.Index) -> faiss.Index:
    """Returns a CPU copy of an index that lives on a GPU, also inside a PCA wrapper (for saving); else the index."""
    return faiss.index_gpu_to_cpu(index) if gpu_available() else index


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns squared L2 distances and ids `(Q, k)` of the `k` nearest bank vectors of each query."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if k > index.ntotal:
        raise ValueError(f"k={k} neighbours requested but the index holds only {index.ntotal} vectors")
    return index.search(queries, k)


def index_bytes(index: faiss.Index) -> int:
    """Serialized size of `index` in bytes: what the bank costs on disk and, roughly, in memory. Counted as FAISS
    writes it, without holding the serialized copy (as large as the bank)."""
    written = 0

    def count(chunk: bytes) -> int:
        nonlocal written
        written += len(chunk)
        return len(chunk)

    faiss.write_index(to_cpu(index), faiss.PyCallbackIOWriter(count))
    return written


@dataclasses.dataclass(frozen=True)
class SearchChoice:
    """A search setting chosen by `choose_search`, with what it was measured to deliver.

    Attributes:
        kind: "flat" or "ivf".
        search_dims: PCA dimensions searched (0 = the full vectors).
        nlist: IVF cells (0 for a flat index).
        nprobe: IVF cells visited per query (0 for a flat index).
        recall: measured recall@k against exact full-width search, on `queries` held-out vectors.
        target: the recall it had to reach.
        k: neighbours the recall counts.
        queries: how many held-out vectors it was measured on.
        cost: estimated multiply-adds per query (`search_cost`), what "cheapest" means.
        exact_cost: the same for exact full-width search, for scale.
    """

    kind: str
    search_dims: int
    nlist: int
    nprobe: int
    recall: float
    target: float
    k: int
    queries: int
    cost: float
    exact_cost: float

    def describe(self) -> str:
        dims = f"{self.search_dims} PCA dims" if self.search_dims else "full width"
        where = f"ivf {self.nprobe} of {self.nlist} cells" if self.kind == "ivf" else "flat"
        return (f"{where}, {dims}: recall@{self.k} {self.recall:.3f} (target {self.target}) on {self.queries} "
                f"held-out vectors, {self.cost / self.exact_cost:.3f}x the multiply-adds of exact search")


def search_cost(count: int, dim: int, search_dims: int, nlist: int, nprobe: int) -> float:
    """Multiply-adds per query of a search over `count` vectors of width `dim`: the PCA projection, then a flat scan
    of every vector (nlist 0) or the coarse pass over the `nlist` centroids plus the `nprobe` cells' vectors."""
    width = search_dims or dim
    projection = dim * search_dims
    if not nlist:
        return float(projection + count * width)
    return float(projection + nlist * width + min(nprobe, nlist) * (count / nlist) * width)


def exact_neighbours(
    vectors: np.ndarray, queries: np.ndarray, k: int, query_ids: np.ndarray | None = None
) -> np.ndarray:
    """Ids `(Q, k)` of each query's k nearest vectors by exact full-width search; with `query_ids` (the queries' own
    rows of `vectors`), each query's own row is left out, so the queries count as held out."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # no copy of a float32 bank: it may be gigabytes
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if query_ids is None:
        return faiss.knn(queries, vectors, k)[1]
    return drop_self(*faiss.knn(queries, vectors, k + 1), query_ids)[1]


def recall_at_k(index: faiss.Index, queries: np.ndarray, exact_ids: np.ndarray,
                query_ids: np.ndarray | None = None) -> float:
    """Share of the exact k nearest neighbours `exact_ids` `(Q, k)` that `index` finds among its own k."""
    if exact_ids.size == 0:
        return 1.0  # no neighbour to miss (a one-vector bank searched leave-one-out)
    k = exact_ids.shape[1]
    found = _found(index, queries, k, query_ids)
    hits = sum(len(np.intersect1d(row, truth)) for row, truth in zip(found, exact_ids, strict=True))
    return hits / exact_ids.size


def drop_self(distances: np.ndarray, ids: np.ndarray, query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Removes each query's own id from its k + 1 neighbours (the last one when exact duplicates or an approximate
    search hid it): what is left are its k nearest other vectors."""
    is_self = ids == np.asarray(query_ids)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    rows = len(ids)
    return distances[keep].reshape(rows, -1), ids[keep].reshape(rows, -1)


def _found(index: faiss.Index, queries: np.ndarray, k: int, query_ids: np.ndarray | None) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if query_ids is None:
        return index.search(queries, k)[1]
    distances, ids = index.search(queries, k + 1)
    return drop_self(distances, ids, query_ids)[1]


def choose_search(
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    target: float,
    *,
    kinds: Sequence[str],
    dims: Sequence[int],
    nlist: int,
    nprobes: Sequence[int] = NPROBE_LADDER,
    query_ids: np.ndarray | None = None,
    seed: int = 0,
    use_gpu: bool | None = None,
) -> tuple[faiss.Index, SearchChoice]:
    """The cheapest search setting (by `search_cost`) whose recall@k on `queries` reaches `target`, and its index.

    Recall is measured against exact full-width search over the same `vectors`, on held-out vectors: `queries` that
    are not indexed, or indexed ones named by `query_ids`, which are then left out of their own results. Settings are
    tried from the cheapest and the first to reach the target wins, so an index is built only for the kinds and widths
    tried before it (nprobe is set on a built index). When none reaches it (settings pinned by the user can make the
    target unreachable), the setting with the highest recall is returned, its `recall` below `target`.

    Args:
        vectors: what the index holds `(N, D)`.
        queries: held-out vectors `(Q, D)` to measure recall on.
        k: neighbours per query that count.
        target: recall@k to reach, in (0, 1].
        kinds: index kinds to consider ("flat", "ivf").
        dims: PCA widths to consider (0 = full width).
        nlist: IVF cells of an "ivf" index.
        nprobes: cells visited per query to consider.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    k = min(k, count - (1 if query_ids is not None else 0))
    exact_ids = None
    nlist = max(1, min(nlist, count))
    settings = sorted(
        {(kind, width if 0 < width < dim else 0, nlist if kind == "ivf" else 0, min(probe, nlist) if kind == "ivf"
          else 0) for kind in kinds for width in dims for probe in (nprobes if kind == "ivf" else (0,))},
        key=lambda setting: search_cost(count, dim, *setting[1:]),
    )
    exact_cost = search_cost(count, dim, 0, 0, 0)
    built: dict[tuple[str, int], faiss.Index] = {}
    best: tuple[tuple[str, int], SearchChoice] | None = None
    for kind, width, cells, probe in settings:
        cost = search_cost(count, dim, width, cells, probe)
        index = built.get((kind, width))
        if index is None:
            index = built[kind, width] = build_index(vectors, kind=kind, nlist=cells or None, nprobe=max(probe, 1),
                                                     use_gpu=False, seed=seed, search_dims=width)
        if kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = probe
        if kind == "flat" and not width:
            recall = 1.0  # exact search by construction: nothing to measure
        else:
            if exact_ids is None:
                exact_ids = exact_neighbours(vectors, queries, k, query_ids)
            recall = recall_at_k(index, queries, exact_ids, query_ids)
        choice = SearchChoice(kind, width, cells, probe, recall, target, k, len(queries), cost, exact_cost)
        if recall >= target:
            return to_device(index, use_gpu), choice
        if best is None or recall > best[1].recall:
            best = (kind, width), choice
    (kind, width), choice = best
    index = built[kind, width]
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = choice.nprobe
    return to_device(index, use_gpu), choice
