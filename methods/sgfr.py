"""SGFR: subspace-guided feature reconstruction from a sparse basis of nominal patch features.

Nominal patch vectors lie near a union of low-dimensional subspaces (one per kind of normal texture or part).
A target patch y is reconstructed from the k basis vectors B retrieved for it by FAISS, with the self-expressive
model

    c* = argmin_c ||y - cB||² + λ (τ ||c||₁ + (1 - τ)/2 ||c||²),    ŷ = c*B,

and its residual |y - ŷ| is the anomaly signal: a combination of nominal neighbours "mimics" normal patterns that
are not literally in the basis, but cannot produce anomalous dimensions. τ = 0 is ridge regression, solved in closed
form for all patches of a batch at once; τ > 0 is an elastic net, solved by batched FISTA.

The basis is a small subset of the nominal vectors chosen by *sparse subspace sampling*: each vector of a sample is
coded sparsely over its nearest neighbours (itself excluded), the vectors that the codes use most are kept, and a
coverage pass then adds representatives until every nominal vector lies within a radius of a kept one, so that rare
normal patterns are not crowded out by frequently used "hub" vectors. Greedy coreset and random sampling are
selectable for ablations.

The self-expressive model and the use of code usage to pick representatives come from sparse subspace clustering
(Elhamifar & Vidal, "Sparse Subspace Clustering: Algorithm, Theory, and Applications", TPAMI 2013,
https://arxiv.org/abs/1203.1005); the elastic-net solver is FISTA (Beck & Teboulle, SIAM J. Imaging Sci. 2009).

Example:
    >>> method = create_method("sgfr", basis_ratio=0.2, k=8)
    >>> method.fit(feature_batches)
    >>> patch_scores = method.score(features)   # (B, h, w) residual norms
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from reconray.methods import knn
from reconray.methods.base import BankMethod, MethodOptions, MethodState, canonical_order, register_method
from reconray.methods.coreset import greedy_coreset
from reconray.methods.errors import DatasetError, check_fitted

logger = logging.getLogger(__name__)

_MAX_DENSITY_RANK = 1024
"""Cap on m, the neighbour rank that sets the coverage radius: only bases under 0.1% of the data reach it, and it
bounds the neighbour search (and stays within the k <= 2048 that FAISS GPU indexes search)."""
_COVER_IVF_FROM = 50_000
"""Kept-set size from which the coverage pass finds each vector's nearest kept one through IVF (`_nearest_kept`):
below it the exact pass takes seconds; above, its cost (all candidates x the kept set) grew to minutes for one
large category (benchmarks/RESULTS.md, "Unified vs per-category bank models")."""

IVF_FROM_VECTORS = 2048
"""sgfr's basis gets an IVF index (index="auto") from this size on, far below patchcore's `knn.IVF_MIN_VECTORS`:
patchcore's score *is* the nearest distance, which an approximate search inflates, while sgfr's neighbours only pick
the dictionary a patch is rebuilt from, and a near-nearest set spans the same local subspace (measurements:
benchmarks/notes/sgfr.md)."""

IVF_CELLS_PER_SQRT = 4
"""IVF cells = this x sqrt(basis size). A search costs a coarse pass over every cell centroid plus a scan of the
`nprobe` visited cells; more cells make the first dearer and the second cheaper (timings: benchmarks/notes/sgfr.md)."""

SEARCH_DIMS_LADDER = (16, 32, 64, 0)
"""PCA widths `recall_target` chooses among (0 = the full features); lite0's default levels are 152 wide."""

SELECTION_CHUNK = 262_144
"""Default `selection_chunk`. One selection pass over N candidates costs N^1.5 (the coverage search probes IVF cells
of sqrt(N) vectors for every candidate): 30 s at 195k candidates, 238 s at 779k (benchmarks/RESULTS.md, "Fit
scale"). Chunks of at most this size keep every shared dataset's validated fits in one pass up to MTD's 316k
candidates, whose two-chunk fit was validated against the one-pass fit (RESULTS, "Fit scale")."""

_SCORE_CHUNK = 1024
"""Patches solved at once when scoring: their (chunk, k, D) neighbours stay in cache. The FAISS search takes the
whole batch in one call instead, since its per-call cost (thread start-up, per-query set-up) is paid per call."""


Penalty = float | torch.Tensor
"""A penalty weight of the code solvers: one for every patch, or one per patch `(N,)` in float64. Per-patch values are
rounded to the patches' dtype once, after the arithmetic on them, as a float is when it meets a tensor, so a patch
solved among others gets the codes it gets alone (`sparse_sample_sets`)."""


@register_method
class SGFR(BankMethod):
    """Reconstructs each patch from its k nearest basis vectors; score = L2 norm of the reconstruction residual.

    The patch score is the L2 norm of the residual vector |y - ŷ|: it is in the units of feature distances (like
    PatchCore's nearest-neighbour distance, so maps and thresholds behave alike), every anomalous dimension
    contributes, and a squared norm would only stretch the map's dynamic range before the Gaussian smoothing.

    λ is given relative to the feature scale: the solver uses `lam * s`, where s is the mean squared norm of the
    basis vectors (the mean diagonal of a neighbour Gram matrix BBᵀ), so one value of `lam` fits any backbone.

    Options (`--set key=value`; the validation behind each default: benchmarks/notes/sgfr.md):
        basis_ratio: basis size as a fraction of all nominal patch vectors seen in the fit.
        max_basis: upper bound on the basis size (0 = none), for a scoring cost that stops growing with the data.
        sampling: "sparse" (sparse subspace sampling with coverage), "coreset" (the union of each image's greedy
            k-center coreset at `basis_ratio`, as patchcore's) or "random".
        candidate_factor: each training image is condensed to `candidate_factor * basis_ratio` of its vectors before
            the final selection, so the driver only gathers candidates and the final pass has room to choose
            (sparse and random sampling; `max_basis` alone selects among coreset sampling's).
        k: basis vectors retrieved per patch (and coded over when sampling); solve cost grows as k to k².
        lam: ridge / elastic-net weight relative to the feature scale (see above).
        tau: L1 share of the penalty when scoring; 0 = ridge in closed form, > 0 the elastic net by FISTA.
        sampling_tau: L1 share of the sampling codes' penalty, > 0 so that usage concentrates on the neighbours that
            span a vector's neighbourhood, while the L2 share keeps the code unique among near-duplicates.
        iterations: FISTA iterations of every elastic-net solve (fixed, so a score never depends on its batch).
        coverage_quantile: coverage radius = this quantile of distances to the m-th nearest neighbour (see
            `sparse_sample`); 1.0 makes coverage nearly void, and usage alone then favours hub vectors.
        cover_nprobe: IVF cells the coverage pass probes per vector (of sqrt(kept) cells) once the kept set reaches
            `_COVER_IVF_FROM` vectors: a missed neighbour only adds a representative, never breaks coverage, so
            fewer probes trade a slightly different basis for a faster selection. 8 (was 16) held the defaults rule
            on MTD and elpv, the datasets whose validation fits reach this search (benchmarks/RESULTS.md, "Fewer
            probes in the coverage search").
        sample_size: vectors coded per sampling call to estimate usage.
        selection_chunk: most candidates one final selection pass sees (0 = all at once, else at least 2 (k + 1), so
            that every chunk holds more than k); more are split at random
            into near-equal chunks that each select their share of the basis (`select_in_chunks`), so the fit's
            cost grows linearly with the data instead of as N^1.5.
        index, nlist, nprobe: FAISS index of the basis: "auto" (exact below `IVF_FROM_VECTORS` basis vectors, IVF
            from there on), "flat" or "ivf"; IVF cells (0 = `IVF_CELLS_PER_SQRT` x sqrt of the basis size) and
            cells visited per query.
        search_dims: neighbours are searched in a PCA projection onto this many dimensions (0 = the full features);
            the reconstruction always uses the full vectors, since the search only picks the dictionary.
        recall_target: with a value > 0, the fit chooses the search settings not pinned with `--set` (index kind,
            search_dims, nprobe) as the cheapest whose recall@k against exact full-width search reaches it, measured
            on held-out nominal vectors (`knn.choose_search`); 0 keeps the settings above. Either way the measured
            recall is stored in the artifact (`method_info.search`) and logged.
        seed: seed of sampling and IVF training, so fits are reproducible.
    """

    class Options(MethodOptions):
        basis_ratio: float = Field(0.2, gt=0.0, le=1.0)
        max_basis: int = Field(0, ge=0)
        sampling: Literal["sparse", "coreset", "random"] = "sparse"
        candidate_factor: float = Field(3.0, ge=1.0)
        k: int = Field(8, ge=1)
        lam: float = Field(0.01, gt=0.0)
        tau: float = Field(0.0, ge=0.0, le=1.0)
        sampling_tau: float = Field(0.5, gt=0.0, le=1.0)
        iterations: int = Field(100, ge=1)
        coverage_quantile: float = Field(0.9, gt=0.0, le=1.0)
        cover_nprobe: int = Field(8, ge=1)
        sample_size: int = Field(8192, ge=1)
        selection_chunk: int = Field(SELECTION_CHUNK, ge=0)
        index: Literal["auto", "flat", "ivf"] = "auto"
        nlist: int = Field(0, ge=0)
        nprobe: int = Field(4, ge=1)
        search_dims: int = Field(32, ge=0)
        recall_target: float = Field(0.0, ge=0.0, le=1.0)
        seed: int = 0

        @model_validator(mode="after")
        def _check_selection_chunk(self) -> SGFR.Options:
            # A chunk holds more than half of `selection_chunk` vectors; sparse sampling needs more than k of them.
            if self.selection_chunk and self.selection_chunk < 2 * (self.k + 1):
                raise ValueError(f"selection_chunk {self.selection_chunk} must be 0 (one pass) or at least "
                                 f"2 (k + 1) = {2 * (self.k + 1)}")
            return self

    name = "sgfr"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.basis: torch.Tensor | None = None
        self.index = None
        self._ridge_scale = 0.0
        self._fit_info: dict[str, Any] = {}

    def condense(self, vectors: torch.Tensor) -> torch.Tensor:
        """Keeps `candidate_factor * basis_ratio` of one image's vectors, chosen by the configured sampling.

        Coreset sampling keeps `basis_ratio` of them (rounded up, and at least k, like every sampling here), and
        the union of the images' k-center coresets is the basis (composable, like patchcore's): a global greedy
        pass over all candidates is quadratic in the data, about 50 minutes per fit on MTD's 515 images on 2 CPU
        cores.
        """
        return self.condense_each([vectors])[0]

    def condense_each(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """`condense` of every image, each on its own; sparse sampling solves all their codes in one batched call
        (`sparse_sample_sets`), so a batch of images pays the solver's per-call cost once, not once per image."""
        factor = 1.0 if self.options.sampling == "coreset" else self.options.candidate_factor
        ratio = min(1.0, factor * self.options.basis_ratio)
        quotas = [max(self.options.k, math.ceil(ratio * len(vectors))) for vectors in images]
        sampled = [number for number, (vectors, quota) in enumerate(zip(images, quotas, strict=True))
                   if quota < len(vectors)]
        chosen = self._select([(images[number], quotas[number], _content_seed(self.options.seed, images[number]))
                               for number in sampled])
        condensed = list(images)
        for number, kept in zip(sampled, chosen, strict=True):
            condensed[number] = images[number][kept]
        return condensed

    def fit_bank(self, vectors: torch.Tensor, total_vectors: int | None = None) -> None:
        """Selects the basis from the gathered candidates and indexes it.

        With sparse sampling the coverage guarantees chain: `condense` keeps every vector of an image within r₁ of a
        candidate, this pass keeps every candidate within r₂ of the basis, so every nominal vector is within
        r₁ + r₂ of the basis (triangle inequality), while the driver only ever holds candidates.

        Args:
            vectors: candidate vectors `(N, D)` (all nominal vectors, or what `condense` kept of them).
            total_vectors: how many nominal vectors the candidates were condensed from, which `basis_ratio` refers
                to; None when `vectors` are all of them.
        """
        total = len(vectors) if total_vectors is None else total_vectors
        k = self.options.k
        if len(vectors) < k:
            raise DatasetError(f"sgfr needs at least k={k} nominal vectors to build its basis, got {len(vectors)}")
        if total < len(vectors):
            raise ValueError(f"total_vectors={total} is smaller than the {len(vectors)} candidates it was condensed to")
        target = math.ceil(self.options.basis_ratio * total)
        if self.options.sampling == "coreset" and total_vectors is not None:  # `condense` already chose the basis
            target = len(vectors)
        if self.options.max_basis:
            target = min(target, self.options.max_basis)
        n_keep = min(len(vectors), max(k, target))
        vectors = vectors.float()
        vectors = vectors[canonical_order(vectors)]
        selected = None if n_keep >= len(vectors) else select_in_chunks(
            len(vectors), n_keep, self.options.selection_chunk, self.options.seed,
            lambda members, quota, seed: members[self._select([(vectors[members], quota, seed)])[0]])
        basis = vectors if selected is None else vectors[selected]
        queries, query_ids = _recall_queries(vectors, basis, selected, self.options.seed)
        index, choice = knn.choose_search(
            basis.cpu().numpy(), queries, k, self.options.recall_target, **self._search_settings(len(basis)),
            query_ids=query_ids, seed=self.options.seed,
        )
        if self.options.recall_target > 0:  # the options say what was chosen, so the artifact reads as one setting
            self.options = self.options.model_copy(update={"index": choice.kind, "search_dims": choice.search_dims,
                                                           "nprobe": choice.nprobe or self.options.nprobe})
        logger.info("sgfr: basis of %d vectors, search %s", len(basis), choice.describe())
        self._fit_info = {"seen_vectors": int(total), "candidate_vectors": len(vectors), "target_basis": n_keep,
                          "search": dataclasses.asdict(choice)}
        self._set_basis(basis, index)

    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        check_fitted(self.name, self.basis is not None, "score()")
        targets = vectors.float().to(self.basis.device)
        chunks = zip(targets.split(_SCORE_CHUNK), self._neighbour_ids(targets).split(_SCORE_CHUNK), strict=True)
        return torch.cat([self._residual_norm(chunk, chunk_ids) for chunk, chunk_ids in chunks]).to(vectors.device)

    def state(self) -> MethodState:
        check_fitted(self.name, self.basis is not None, "state()")
        return MethodState(
            options=self.options.model_dump(),
            tensors={"basis": self.basis.cpu().contiguous()},
            indexes={"basis": knn.to_cpu(self.index)},
            info=dict(self._fit_info),
        )

    @classmethod
    def from_state(cls, state: MethodState) -> SGFR:
        method = cls(**state.options)
        method._fit_info = {
            key: state.info[key] for key in ("seen_vectors", "candidate_vectors", "target_basis", "search")
            if key in state.info
        }
        method._set_basis(state.tensors["basis"].float(), knn.to_device(state.indexes["basis"]))
        return method

    def to(self, device: torch.device | str) -> SGFR:
        device = torch.device(device)
        if self.basis is not None:
            self.basis = self.basis.to(device)
            self.index = knn.to_device(knn.to_cpu(self.index), device.type == "cuda" and knn.gpu_available())
        return self

    def bank_stats(self) -> tuple[int | None, int | None]:
        """Basis vectors, and the bytes of the basis tensor plus its index (which holds only a projection of the
        vectors when `search_dims` is set, so both count)."""
        if self.index is None or self.basis is None:
            return None, None
        return int(self.index.ntotal), knn.index_bytes(self.index) + self.basis.numel() * self.basis.element_size()

    def _search_settings(self, basis_size: int) -> dict[str, Any]:
        """The search settings `knn.choose_search` may pick from: only the configured ones while `recall_target` is 0
        (it then measures their recall), else a ladder for each setting not pinned with `--set`."""
        options, choose = self.options, self.options.recall_target > 0
        pinned = options.model_fields_set if choose else set(options.model_fields)
        ivf = basis_size >= IVF_FROM_VECTORS
        kinds = [options.index] if options.index != "auto" else ["flat", "ivf"] if choose and ivf else \
            ["ivf" if ivf else "flat"]
        return {
            "kinds": kinds,
            "dims": [options.search_dims] if "search_dims" in pinned else SEARCH_DIMS_LADDER,
            "nprobes": [options.nprobe] if "nprobe" in pinned else knn.NPROBE_LADDER,
            "nlist": options.nlist or round(IVF_CELLS_PER_SQRT * math.sqrt(basis_size)),
        }

    def _set_basis(self, basis: torch.Tensor, index: Any) -> None:
        if index.ntotal != len(basis):
            raise ValueError(f"sgfr basis has {len(basis)} vectors but its index holds {index.ntotal}")
        self.basis = basis
        self.index = index
        self._ridge_scale = float(basis.pow(2).sum(dim=1).mean())

    def _neighbour_ids(self, targets: torch.Tensor) -> torch.Tensor:
        """Ids `(N, k)` of each target's k nearest basis vectors (-1 where an IVF search found fewer)."""
        _, ids = knn.search(self.index, targets.cpu().numpy(), self.options.k)
        return torch.from_numpy(ids).to(self.basis.device)

    def _residual_norm(self, targets: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """||y - cB|| from the normal equations, without forming ŷ: the same value as the residual's norm up to float
        rounding (relative 1e-5).

        ||y - cB||² = ||y||² - 2cᵀh + cᵀGc in general; the ridge codes solve (G + αI)c = h, so cᵀGc = cᵀh - α||c||²
        and the norm needs no product with G at all: ||y||² - cᵀh - α||c||².
        """
        codes, gram, rhs = self._reconstruction(targets, ids)
        if self.options.tau == 0:
            alpha = self.options.lam * self._ridge_scale / 2
            squared = targets.pow(2).sum(dim=1) - (codes * rhs).sum(dim=1) - alpha * codes.pow(2).sum(dim=1)
        else:
            fitted = (codes * torch.bmm(gram, codes.unsqueeze(2)).squeeze(2)).sum(dim=1)
            squared = targets.pow(2).sum(dim=1) - 2.0 * (codes * rhs).sum(dim=1) + fitted
        return squared.clamp_min(0.0).sqrt()

    def _reconstruction(self, targets: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Codes `(N, k)` of each target over its retrieved basis vectors, with their G and h."""
        neighbours = self.basis[ids.clamp_min(0)]
        # An IVF search that finds fewer than k vectors in its probed cells pads with id -1: those neighbours become
        # zero vectors, which the solve gives a zero coefficient, so the patch is reconstructed from what was found.
        missing = ids < 0
        if bool(missing.any()):
            neighbours.masked_fill_(missing.unsqueeze(2), 0.0)
        gram, rhs = normal_equations(neighbours, targets)
        lam, tau, iterations = self.options.lam * self._ridge_scale, self.options.tau, self.options.iterations
        return solve_codes(gram, rhs, lam, tau, iterations), gram, rhs

    def _select(self, sets: list[tuple[torch.Tensor, int, int]]) -> list[torch.Tensor]:
        """Indices of the vectors kept from each `(vectors, n_keep, seed)` set, by the configured sampling."""
        sampling = self.options.sampling
        if sampling == "random":
            return [torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[:n_keep]
                    for vectors, n_keep, seed in sets]
        if sampling == "coreset":
            return [greedy_coreset(vectors, n_keep, seed=seed) for vectors, n_keep, seed in sets]
        return sparse_sample_sets(
            sets,
            k=self.options.k,
            lam=self.options.lam,
            tau=self.options.sampling_tau,
            sample_size=self.options.sample_size,
            coverage_quantile=self.options.coverage_quantile,
            cover_nprobe=self.options.cover_nprobe,
            iterations=self.options.iterations,
        )


def select_in_chunks(
    count: int, n_keep: int, chunk_size: int, seed: int, select: Callable[[torch.Tensor, int, int], torch.Tensor]
) -> torch.Tensor:
    """Selects `n_keep` of `count` vectors with `select(members, quota, seed)` -> chosen members, chunk by chunk.

    Up to `chunk_size` vectors (or with `chunk_size` 0) one call selects among them all. A larger set is split by a
    seeded random permutation into the fewest near-equal chunks of at most `chunk_size`; each chunk gets its share
    of `n_keep` (largest remainders, so the shares add up to `n_keep`; a chunk whose share is 0 selects nothing) and
    selects on its own. Each chunk is a random sample of the whole
    set, so it holds every kind of vector at the same mix, and the union of the chunks' selections carries each
    chunk's guarantee (sparse sampling: every member within its chunk's coverage radius of a kept vector), as the
    union of per-image coresets does (`condense`): a composable selection, linear in `count` for a fixed chunk size.
    """
    everything = torch.arange(count)
    if not chunk_size or count <= chunk_size:
        return select(everything, n_keep, seed)
    chunks = math.ceil(count / chunk_size)
    members = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tensor_split(chunks)
    sizes = np.array([len(part) for part in members])
    exact = n_keep * sizes / count
    quotas = np.floor(exact).astype(np.int64)
    quotas[np.argsort(-(exact - quotas), kind="stable")[: n_keep - int(quotas.sum())]] += 1
    logger.info("sgfr: selecting %d of %d candidates in %d chunks of about %d", n_keep, count, chunks, sizes[0])
    return torch.cat([everything[:0]] + [select(part, int(quota), seed + number)
                                         for number, (part, quota) in enumerate(zip(members, quotas, strict=True))
                                         if quota])


def self_expressive_codes(
    neighbours: torch.Tensor, targets: torch.Tensor, lam: Penalty, tau: float, iterations: int = 100
) -> torch.Tensor:
    """Codes c `(N, k)` minimising ||y - cB||² + lam (tau ||c||₁ + (1 - tau)/2 ||c||²) for every patch at once.

    Args:
        neighbours: each target's dictionary B `(N, k, D)`.
        targets: patch vectors y `(N, D)`.
        lam: absolute penalty weight (> 0), one for all patches or one per patch (`Penalty`).
        tau: L1 share in [0, 1]; 0 takes the closed-form ridge path.
        iterations: FISTA iterations when tau > 0.
    """
    return solve_codes(*normal_equations(neighbours, targets), lam, tau, iterations)


def normal_equations(neighbours: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G = BBᵀ `(N, k, k)` and h = By `(N, k)`: all the solvers need of a patch and its dictionary."""
    gram = torch.bmm(neighbours, neighbours.transpose(1, 2))
    return gram, torch.bmm(neighbours, targets.unsqueeze(2)).squeeze(2)


def solve_codes(gram: torch.Tensor, rhs: torch.Tensor, lam: Penalty, tau: float, iterations: int = 100) -> torch.Tensor:
    """The codes of `self_expressive_codes` from the normal equations G, h."""
    if tau == 0:
        return ridge_codes(gram, rhs, lam / 2)
    return elastic_net_codes(gram, rhs, lam, tau, iterations)


def ridge_codes(gram: torch.Tensor, rhs: torch.Tensor, alpha: Penalty) -> torch.Tensor:
    """Solves `(G + alpha I) c = h` for a batch of symmetric PSD `G` `(N, k, k)` and `h` `(N, k)`.

    ||y - cB||² + 2 alpha ||c||² has this normal equation with G = BBᵀ, h = By. `G + alpha I` is positive definite, so
    a batched Cholesky factorisation and two triangular solves replace a generic LU solve (faster, timings in
    benchmarks/notes/sgfr.md). A matrix whose float32 factorisation
    fails (alpha far below rounding noise) is solved again in float64.
    """
    system = gram + _by_row(alpha, gram) * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    codes = torch.cholesky_solve(rhs.unsqueeze(2), factor).squeeze(2)
    failed = info != 0
    if bool(failed.any()):
        codes[failed] = torch.linalg.solve(system[failed].double(), rhs[failed].double()).to(codes.dtype)
    return codes


def _by_row(value: Penalty, like: torch.Tensor) -> Penalty:
    """A `Penalty` ready to meet `like` `(N, ...)`: a float as is, per-patch values rounded to `like`'s dtype and
    shaped to broadcast over its other axes."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return value


def elastic_net_codes(
    gram: torch.Tensor, rhs: torch.Tensor, lam: Penalty, tau: float, iterations: int = 100
) -> torch.Tensor:
    """Batched FISTA for min_c cGcᵀ - 2hᵀc + lam (tau ||c||₁ + (1 - tau)/2 ||c||²) (= the elastic-net objective).

    Starts from the ridge solution with the whole penalty as L2 (close to the answer for moderate tau), takes a fixed
    number of steps with the step size 1/L from a per-patch Lipschitz bound L = 2 min(trace G, max row sum |G|) +
    lam (1 - tau), both valid upper bounds of the largest eigenvalue, so no patch can diverge.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"elastic-net tau must be in (0, 1], got {tau}")
    smooth = _by_row(lam * (1.0 - tau), rhs)
    eigen_bound = torch.minimum(gram.diagonal(dim1=1, dim2=2).sum(dim=1), gram.abs().sum(dim=2).amax(dim=1))
    step = 1.0 / (2.0 * eigen_bound.unsqueeze(1) + smooth).clamp_min(torch.finfo(gram.dtype).tiny)
    threshold = _by_row(lam * tau, rhs) * step
    codes = ridge_codes(gram, rhs, lam / 2)
    momentum_point = codes
    momentum = 1.0
    for _ in range(iterations):
        gradient = 2.0 * (torch.bmm(gram, momentum_point.unsqueeze(2)).squeeze(2) - rhs) + smooth * momentum_point
        moved = momentum_point - step * gradient
        updated = moved.sign() * (moved.abs() - threshold).clamp_min(0.0)
        next_momentum = (1.0 + math.sqrt(1.0 + 4.0 * momentum * momentum)) / 2.0
        momentum_point = updated + ((momentum - 1.0) / next_momentum) * (updated - codes)
        codes, momentum = updated, next_momentum
    return codes


def sparse_sample(
    vectors: torch.Tensor,
    n_keep: int,
    k: int = 16,
    lam: float = 0.01,
    tau: float = 0.5,
    sample_size: int = 8192,
    coverage_quantile: float = 0.9,
    seed: int = 0,
    iterations: int = 100,
    cover_nprobe: int = 8,
) -> torch.Tensor:
    """Returns indices of a basis that spans the nominal subspaces of `vectors` `(N, D)`: sparse usage + coverage.

    1. Usage: `sample_size` vectors are each coded over their k nearest neighbours (themselves excluded) with the
       elastic net (penalty `lam` relative to the mean squared norm of `vectors`, L1 share `tau`); each code is
       normalised to unit L1 mass, so every sampled vector casts one vote, spread over the neighbours it uses.
    2. Coverage radius r = `coverage_quantile` of the sample's distances to their m-th nearest neighbour, with
       m = ceil(N / n_keep) the number of vectors each kept one stands for: a ball of radius r holds about m vectors
       for all but the sparsest (1 - quantile) of the data, which are exactly the rare patterns a budget of n_keep
       must not drop. (The plain 1-NN distance would force keeping every vector isolated beyond it, far more than
       n_keep at a 10% budget.) m is capped at `_MAX_DENSITY_RANK`.
    3. Keep the most used vectors (ties in random order); then, while some vector has no kept vector within r, add
       the uncovered vector farthest from the kept set.

    Size rule: coverage has priority over usage. Each coverage representative replaces the least used of the
    usage-ranked vectors, and the pass repeats until nothing is uncovered, so the result has exactly `n_keep`
    vectors unless coverage alone needs more; then it holds the coverage representatives only, more than `n_keep`.
    Every vector of `vectors` is within r of a kept one either way.
    """
    return sparse_sample_sets([(vectors, n_keep, seed)], k=k, lam=lam, tau=tau, sample_size=sample_size,
                              coverage_quantile=coverage_quantile, iterations=iterations,
                              cover_nprobe=cover_nprobe)[0]


def sparse_sample_sets(
    sets: Sequence[tuple[torch.Tensor, int, int]],
    k: int = 16,
    lam: float = 0.01,
    tau: float = 0.5,
    sample_size: int = 8192,
    coverage_quantile: float = 0.9,
    iterations: int = 100,
    cover_nprobe: int = 8,
) -> list[torch.Tensor]:
    """`sparse_sample` of each `(vectors, n_keep, seed)` set on its own, with one elastic-net solve for the codes of
    every set: the solver works row by row with each row's own penalty, so a set's codes, and its selection, are the
    same as alone (tested), while the solver's per-call cost (a hundred small steps) is paid once per batch of
    images instead of once per image."""
    sampled = [_usage_sample(vectors, n_keep, k, lam, sample_size, coverage_quantile, seed)
               for vectors, n_keep, seed in sets]
    if not sampled:
        return []
    penalties = torch.cat([torch.full((len(part.sample),), part.penalty, dtype=torch.float64) for part in sampled])
    offsets = np.cumsum([0] + [len(part.vectors) for part in sampled[:-1]]).tolist()
    # One set (a final selection's chunk, hundreds of MB on the driver) is used as is, not copied.
    vectors = sampled[0].vectors if len(sampled) == 1 else torch.cat([part.vectors for part in sampled])
    rows = torch.cat([part.sample + offset for part, offset in zip(sampled, offsets, strict=True)]).to(vectors.device)
    ids = torch.cat([part.neighbour_ids + offset for part, offset in zip(sampled, offsets, strict=True)])
    codes = self_expressive_codes(vectors[ids.to(vectors.device)], vectors[rows], penalties.to(vectors.device), tau,
                                  iterations).cpu().split([len(part.sample) for part in sampled])
    return [_cover(part.vectors, _usage_ranking(part, part_codes), part.n_keep, part.radius, cover_nprobe)
            for part, part_codes in zip(sampled, codes, strict=True)]


@dataclasses.dataclass
class _UsageSample:
    """One set of `sparse_sample_sets` before its codes are solved: the sampled vectors, each one's k nearest others,
    the coverage radius, the absolute penalty of its codes, and the generator that later breaks usage ties."""

    vectors: torch.Tensor
    n_keep: int
    sample: torch.Tensor
    neighbour_ids: torch.Tensor
    radius: float
    penalty: float
    generator: torch.Generator


def _usage_sample(
    vectors: torch.Tensor, n_keep: int, k: int, lam: float, sample_size: int, coverage_quantile: float, seed: int
) -> _UsageSample:
    """Steps 1 (up to the solve) and 2 of `sparse_sample` for one set."""
    count = len(vectors)
    if not 0 < n_keep <= count:
        raise ValueError(f"n_keep must be in 1..{count}, got {n_keep}")
    if count <= k:
        raise ValueError(f"sparse sampling needs more than k={k} vectors to code each over k others, got {count}")
    if not 0.0 < coverage_quantile <= 1.0:
        raise ValueError(f"coverage_quantile must be in (0, 1], got {coverage_quantile}")
    vectors = vectors.float()
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(count, generator=generator)[: min(sample_size, count)]
    density_rank = min(count - 1, math.ceil(count / n_keep), _MAX_DENSITY_RANK)
    index = knn.build_index(vectors.cpu().numpy(), kind="flat")
    distances, ids = knn.drop_self(*knn.search(index, vectors[sample].cpu().numpy(), max(k, density_rank) + 1),
                                   sample.numpy())
    distances, ids = torch.from_numpy(distances), torch.from_numpy(ids)
    radius = float(torch.quantile(distances[:, density_rank - 1].clamp_min(0.0).sqrt().double(), coverage_quantile))
    scale = float(vectors.pow(2).sum(dim=1).mean())
    return _UsageSample(vectors, n_keep, sample, ids[:, :k], radius, lam * scale, generator)


def _usage_ranking(part: _UsageSample, codes: torch.Tensor) -> torch.Tensor:
    """Step 3's order of `part`'s vectors from its sample's codes: most used first, ties in random order."""
    votes = codes.abs()
    votes = votes / votes.sum(dim=1, keepdim=True).clamp_min(torch.finfo(votes.dtype).tiny)
    count = len(part.vectors)
    usage = torch.zeros(count, dtype=votes.dtype).index_add_(0, part.neighbour_ids.reshape(-1), votes.reshape(-1))
    shuffle = torch.randperm(count, generator=part.generator)
    return shuffle[torch.argsort(usage[shuffle], descending=True, stable=True)]


def _cover(vectors: torch.Tensor, ranking: torch.Tensor, n_keep: int, radius: float, nprobe: int) -> torch.Tensor:
    """Applies the coverage rule of `sparse_sample` to vectors ranked by usage; returns the kept indices.

    Each vector remembers its nearest kept vector ("owner"); when representatives push the least used vectors out of
    the budget, only the vectors those owned are searched again, so the repeated passes stay cheap. A kept vector
    owns itself at distance 0 and is not searched for (its search would find itself): at a 1-in-3 budget that skips
    a third of the first pass, the costliest search of a fit (benchmarks/RESULTS.md, "Where a bank fit's time goes").
    """
    points = np.ascontiguousarray(vectors.cpu().numpy())
    ranking = ranking.numpy()
    n_usage = n_keep
    representatives = np.empty(0, dtype=np.int64)
    gap, owner = np.zeros(len(points)), np.arange(len(points))
    others = np.setdiff1d(np.arange(len(points)), ranking[:n_usage], assume_unique=True)
    if len(others):
        gap[others], owner[others] = _nearest_kept(points, ranking[:n_usage], others, nprobe)
    while True:
        uncovered = np.nonzero(gap > radius)[0]
        if len(uncovered) == 0:
            return torch.from_numpy(np.concatenate([ranking[:n_usage], representatives]))
        representatives = np.concatenate([representatives, _representatives(points, uncovered, gap, radius)])
        gap[uncovered], owner[uncovered] = 0.0, -1  # within radius of a representative, which is never dropped
        kept_usage = max(0, n_keep - len(representatives))
        affected = np.nonzero(np.isin(owner, ranking[kept_usage:n_usage]))[0]
        n_usage = kept_usage
        if len(affected):
            kept = np.concatenate([ranking[:n_usage], representatives])
            gap[affected], owner[affected] = _nearest_kept(points, kept, affected, nprobe)


def _nearest_kept(
    points: np.ndarray, kept: np.ndarray, queries: np.ndarray, nprobe: int
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each query vector to a nearest kept vector, and that vector's index (-1, at infinity: none).

    Kept sets of `_COVER_IVF_FROM` vectors or more are searched through an IVF index: the exact pass costs
    queries x kept distances, which grows with the square of the data. An approximate neighbour is never nearer than
    the true one, so the gap is an upper bound: a vector it calls covered is covered, and a miss only adds a
    representative; the coverage guarantee of `sparse_sample` holds either way.
    """
    index = knn.build_index(points[kept], kind="auto", ivf_from=_COVER_IVF_FROM, nprobe=nprobe)
    distances, ids = knn.search(index, points[queries], 1)
    found = ids[:, 0] >= 0
    gap = np.where(found, np.sqrt(np.maximum(distances[:, 0], 0.0)), np.inf)
    return gap, np.where(found, kept[ids[:, 0]], -1)


def _representatives(points: np.ndarray, uncovered: np.ndarray, gap: np.ndarray, radius: float) -> np.ndarray:
    """Representatives that bring every uncovered vector within `radius` of one of them, farthest first.

    The uncovered vectors are visited from the farthest from the kept set; each one not yet within `radius` of a
    chosen representative becomes one and covers its `radius`-neighbours (one FAISS range search over the uncovered
    vectors instead of a distance pass per representative).
    """
    order = uncovered[np.argsort(-gap[uncovered], kind="stable")]
    outliers = np.ascontiguousarray(points[order])
    index = knn.build_index(outliers, kind="flat", use_gpu=False)  # range search runs on CPU indexes only
    limits, _, neighbours = index.range_search(outliers, np.float32(radius) ** 2)
    covered = np.zeros(len(order), dtype=bool)
    chosen = []
    for position in range(len(order)):
        if not covered[position]:
            chosen.append(order[position])
            covered[neighbours[limits[position] : limits[position + 1]]] = True
    return np.asarray(chosen, dtype=np.int64)


def _recall_queries(
    candidates: torch.Tensor, basis: torch.Tensor, selected: torch.Tensor | None, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Held-out nominal vectors to measure the basis search's recall on: up to `knn.RECALL_QUERIES` candidates the
    basis did not keep (the kind of vector a test patch is), or, when it kept them all, basis vectors left out of
    their own results (`query_ids`, their rows in the basis)."""
    rng = np.random.default_rng(seed)
    outside = np.setdiff1d(np.arange(len(candidates)), selected.cpu().numpy()) if selected is not None else []
    if len(outside):
        picked = rng.choice(outside, min(len(outside), knn.RECALL_QUERIES), replace=False)
        return candidates[torch.from_numpy(picked)].cpu().numpy(), None
    ids = rng.choice(len(basis), min(len(basis), knn.RECALL_QUERIES), replace=False)
    return basis[torch.from_numpy(ids)].cpu().numpy(), ids


def _content_seed(seed: int, vectors: torch.Tensor) -> int:
    """A seed derived from the vectors' content (one image's), so that images sample different cells, and an image
    the same cells wherever and whenever it is condensed."""
    first = np.ascontiguousarray(vectors[:1].detach().float().cpu().numpy())
    return (seed * 1_000_003 + zlib.crc32(first.tobytes()) + len(vectors)) % (2**31)

