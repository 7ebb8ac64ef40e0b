"""FAISS nearest-neighbour indexes shared by every bank-based method (patchcore's bank, sgfr's basis).

One place decides the index type, so methods stay free of FAISS plumbing: exact flat L2 search while the bank is
small, an inverted-file index (IVF, `nlist` cells, `nprobe` visited per query) once it is large, and a GPU copy of
either when a GPU is present. Saved indexes are always CPU indexes (`faiss.write_index` cannot write GPU ones).
"""

from __future__ import annotations

import math

import faiss
import numpy as np

IVF_MIN_VECTORS = 200_000
"""Banks at least this large get an IVF index by default: exact search over them costs seconds per image on CPU."""

_TRAIN_POINTS_PER_CELL = 64


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
    """Serialized size of `index` in bytes: what the bank costs on disk and, roughly, in memory."""
    return int(faiss.serialize_index(to_cpu(index)).nbytes)
