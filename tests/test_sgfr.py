"""SGFR: batched solvers against direct solutions, the coverage guarantee of sparse sampling, round-trips, a toy."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch
from sklearn.linear_model import ElasticNet
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from reconray.methods import create_method, knn, sgfr
from reconray.methods import sgfr as sgfr_module
from reconray.methods.artifact import ModelSpec, load_artifact, save_artifact
from reconray.methods.coreset import greedy_coreset
from reconray.methods.errors import NotFittedError, OptionError
from reconray.methods.sgfr import SGFR, elastic_net_codes, ridge_codes, self_expressive_codes, sparse_sample


def _as_features(vectors: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Patch vectors `(batch * h * w, D)` as one feature level `(batch, D, h, w)` on a square grid."""
    side = math.isqrt(len(vectors) // batch)
    return [vectors.reshape(batch, side, side, -1).permute(0, 3, 1, 2).contiguous()]


def _subspaces(count: int, dim: int = 32, subspaces: int = 3, rank: int = 4, noise: float = 0.02, seed: int = 0):
    """Points on a union of `subspaces` random `rank`-dimensional subspaces of R^dim, plus a little noise.

    Returns the points and the orthonormal bases, so a test can build anomalies off every subspace.
    """
    generator = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(dim, rank, generator=generator))[0] for _ in range(subspaces)]
    labels = torch.randint(subspaces, (count,), generator=generator)
    points = torch.stack([bases[int(label)] @ torch.randn(rank, generator=generator) for label in labels])
    return points + noise * torch.randn(count, dim, generator=generator), bases


def _random_problem(patches: int, k: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(patches, k, dim, generator=generator), torch.randn(patches, dim, generator=generator)


def test_batched_ridge_matches_a_direct_least_squares_solution_per_patch() -> None:
    neighbours, targets = _random_problem(64, 16, 152, seed=0)
    lam = 5.0
    codes = self_expressive_codes(neighbours, targets, lam, tau=0.0)
    for basis, target, code in zip(neighbours.double().numpy(), targets.double().numpy(), codes.numpy(), strict=True):
        # ||y - cB||² + lam/2 ||c||² is the least-squares problem || [Bᵀ; sqrt(lam/2) I] c - [y; 0] ||².
        design = np.vstack([basis.T, math.sqrt(lam / 2) * np.eye(16)])
        expected = np.linalg.lstsq(design, np.concatenate([target, np.zeros(16)]), rcond=None)[0]
        np.testing.assert_allclose(code, expected, atol=1e-5, rtol=1e-5)


def test_ridge_falls_back_to_float64_when_float32_cholesky_fails() -> None:
    gram = torch.zeros(3, 4, 4)
    gram[1] = -torch.eye(4)  # not positive definite even after alpha: the float32 factorisation reports failure
    rhs = torch.ones(3, 4)
    codes = ridge_codes(gram, rhs, alpha=0.5)
    torch.testing.assert_close(codes[0], torch.full((4,), 2.0))
    torch.testing.assert_close(codes[1], torch.full((4,), -2.0))


def _elastic_net_objective(code: np.ndarray, basis: np.ndarray, target: np.ndarray, lam: float, tau: float) -> float:
    residual = target - code @ basis
    return float(residual @ residual + lam * (tau * np.abs(code).sum() + (1 - tau) / 2 * code @ code))


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_batched_elastic_net_matches_sklearn_per_patch(tau: float) -> None:
    neighbours, targets = _random_problem(24, 16, 152, seed=1)
    lam = 40.0
    codes = self_expressive_codes(neighbours.double(), targets.double(), lam, tau=tau, iterations=400).numpy()
    dim = neighbours.shape[2]
    zeros = 0
    for basis, target, code in zip(neighbours.double().numpy(), targets.double().numpy(), codes, strict=True):
        # sklearn minimises 1/(2n) ||y - Xw||² + a r ||w||₁ + a (1 - r)/2 ||w||²: ours divided by 2n, n = dim.
        reference = ElasticNet(alpha=lam / (2 * dim), l1_ratio=tau, fit_intercept=False, tol=1e-12, max_iter=100_000)
        expected = reference.fit(basis.T, target).coef_
        np.testing.assert_allclose(code, expected, atol=1e-4)
        ours, theirs = (_elastic_net_objective(c, basis, target, lam, tau) for c in (code, expected))
        assert ours <= theirs * (1 + 1e-6)
        zeros += int((expected == 0).sum())
    assert zeros > 0, "the test penalty must make some coefficients exactly zero, or the L1 part goes untested"


@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_patches_solved_together_with_their_own_penalties_get_the_codes_they_get_alone(tau: float) -> None:
    """Per-patch penalties (float64, rounded once) give each group of patches bit for bit its codes solved alone."""
    neighbours, targets = _random_problem(40, 8, 152, seed=5)
    penalties = [3.7 * math.pi, 0.1 / 3.0]
    together = self_expressive_codes(neighbours, targets, torch.tensor([penalties[0]] * 25 + [penalties[1]] * 15,
                                                                       dtype=torch.float64), tau=tau)
    alone = torch.cat([self_expressive_codes(neighbours[rows], targets[rows], penalty, tau=tau)
                       for rows, penalty in ((slice(0, 25), penalties[0]), (slice(25, 40), penalties[1]))])
    assert torch.equal(together, alone)


def test_condensing_images_together_keeps_what_each_keeps_alone() -> None:
    points, _ = _subspaces(3 * 200 + 90, seed=7)
    images = [points[:200], points[200:400], points[400:600], points[600:]]
    method = create_method("sgfr", basis_ratio=0.2, k=8)
    together = method.condense_each(images)
    assert [len(kept) for kept in together] == [math.ceil(3.0 * 0.2 * len(image)) for image in images]
    assert all(torch.equal(kept, method.condense(image)) for kept, image in zip(together, images, strict=True))


def test_elastic_net_refuses_tau_outside_its_range() -> None:
    with pytest.raises(ValueError, match="tau must be in"):
        elastic_net_codes(torch.eye(2).expand(1, 2, 2), torch.ones(1, 2), lam=1.0, tau=0.0)


def _mth_neighbour_radius(points: np.ndarray, n_keep: int, quantile: float) -> float:
    """The documented coverage radius, recomputed with sklearn (every point sampled)."""
    rank = math.ceil(len(points) / n_keep)
    distances, _ = NearestNeighbors(n_neighbors=rank + 1).fit(points).kneighbors(points)
    return float(np.quantile(distances[:, rank], quantile))


def _assert_covered(points: np.ndarray, kept: np.ndarray, radius: float) -> None:
    gaps = NearestNeighbors(n_neighbors=1).fit(points[kept]).kneighbors(points)[0][:, 0]
    assert gaps.max() <= radius * (1 + 1e-5), f"a vector lies {gaps.max()} from the basis, radius {radius}"


def test_sparse_sampling_keeps_its_size_and_covers_every_vector() -> None:
    points, _ = _subspaces(1200)
    kept = sparse_sample(points, 120, k=8, sample_size=5000, coverage_quantile=0.95, seed=0)
    assert len(kept) == 120 and len(torch.unique(kept)) == 120
    _assert_covered(points.numpy(), kept.numpy(), _mth_neighbour_radius(points.numpy(), 120, 0.95))


@pytest.mark.parametrize("cover_nprobe", [1, 16])
def test_sparse_sampling_covers_every_vector_with_an_approximate_kept_search(
    monkeypatch: pytest.MonkeyPatch, cover_nprobe: int
) -> None:
    """Large kept sets are searched through IVF in the coverage pass; its neighbours are never nearer than the true
    ones, so every vector is still within the radius of the basis, at any number of probed cells."""
    built: list[str] = []
    build_index = sgfr.knn.build_index

    def recording_build_index(*args, **kwargs):
        index = build_index(*args, **kwargs)
        built.append(type(faiss.downcast_index(index)).__name__)
        return index

    monkeypatch.setattr(sgfr, "_COVER_IVF_FROM", 400)
    monkeypatch.setattr(sgfr.knn, "build_index", recording_build_index)
    points, _ = _subspaces(2400, seed=4)
    kept = sparse_sample(points, 800, k=8, sample_size=5000, coverage_quantile=0.95, seed=0, cover_nprobe=cover_nprobe)
    assert "IndexIVFFlat" in built
    assert len(kept) >= 800 and len(torch.unique(kept)) == len(kept)
    _assert_covered(points.numpy(), kept.numpy(), _mth_neighbour_radius(points.numpy(), 800, 0.95))


def test_the_coverage_pass_searches_only_the_vectors_outside_the_kept_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept vector owns itself, so the first coverage search skips the kept vectors; coverage still holds."""
    searches: list[tuple[np.ndarray, np.ndarray]] = []
    nearest_kept = sgfr._nearest_kept

    def recording_nearest_kept(points: np.ndarray, kept: np.ndarray, queries: np.ndarray, nprobe: int):
        searches.append((kept.copy(), queries.copy()))
        return nearest_kept(points, kept, queries, nprobe)

    monkeypatch.setattr(sgfr, "_nearest_kept", recording_nearest_kept)
    points, _ = _subspaces(1200, seed=3)
    kept = sparse_sample(points, 120, k=8, sample_size=5000, coverage_quantile=0.95, seed=0)
    first_kept, first_queries = searches[0]
    assert len(first_kept) == 120 and len(first_queries) == 1080
    assert np.array_equal(np.sort(np.concatenate([first_kept, first_queries])), np.arange(1200))
    _assert_covered(points.numpy(), kept.numpy(), _mth_neighbour_radius(points.numpy(), 120, 0.95))


def test_sparse_sampling_keeps_every_isolated_pattern_even_beyond_its_budget() -> None:
    points, _ = _subspaces(900)
    generator = torch.Generator().manual_seed(5)
    outliers = 20.0 * torch.randn(30, points.shape[1], generator=generator)
    everything = torch.cat([points, outliers])
    kept = sparse_sample(everything, 10, k=8, sample_size=5000, coverage_quantile=0.95, seed=0)
    assert len(kept) > 10 and len(torch.unique(kept)) == len(kept)
    assert set(range(900, 930)) <= set(kept.tolist())
    _assert_covered(everything.numpy(), kept.numpy(), _mth_neighbour_radius(everything.numpy(), 10, 0.95))


def test_chunks_partition_the_candidates_and_share_the_basis_by_size() -> None:
    calls: list[tuple[torch.Tensor, int, int]] = []

    def first(members: torch.Tensor, quota: int, seed: int) -> torch.Tensor:
        calls.append((members, quota, seed))
        return members[:quota]

    chosen = sgfr.select_in_chunks(2500, 250, 1000, 7, first)
    assert [(len(members), quota, seed) for members, quota, seed in calls] == [(834, 84, 7), (833, 83, 8), (833, 83, 9)]
    assert torch.equal(torch.sort(torch.cat([members for members, _, _ in calls])).values, torch.arange(2500))
    assert len(torch.unique(chosen)) == 250
    calls.clear()
    assert torch.equal(sgfr.select_in_chunks(2500, 250, 0, 7, first), torch.arange(250)) and len(calls) == 1
    calls.clear()
    assert len(sgfr.select_in_chunks(3000, 2, 1000, 0, first)) == 2  # fewer to keep than chunks: still exactly 2
    assert sorted(quota for _, quota, _ in calls) == [1, 1]


def test_a_selection_chunk_some_chunk_could_not_sample_in_is_refused() -> None:
    with pytest.raises(OptionError, match=r"selection_chunk 16 must be 0 \(one pass\) or at least 2 \(k \+ 1\) = 34"):
        create_method("sgfr", k=16, selection_chunk=16)
    assert create_method("sgfr", k=16, selection_chunk=34).options.selection_chunk == 34


def test_a_large_candidate_set_is_selected_in_chunks_that_each_cover_their_members(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Beyond `selection_chunk` candidates, sparse sampling runs on random chunks (a fit linear in the data): the
    basis keeps its size, every candidate is within its chunk's coverage radius of the basis, and the basis depends
    on the candidates only, not on their order."""
    selections: list[tuple[np.ndarray, np.ndarray, int]] = []
    sample_sets = sgfr.sparse_sample_sets

    def recording_sample_sets(sets: list[tuple[torch.Tensor, int, int]], **kwargs) -> list[torch.Tensor]:
        chosen = sample_sets(sets, **kwargs)
        selections.extend((vectors.numpy(), kept.numpy(), n_keep)
                          for (vectors, n_keep, _), kept in zip(sets, chosen, strict=True))
        return chosen

    monkeypatch.setattr(sgfr, "sparse_sample_sets", recording_sample_sets)
    points, _ = _subspaces(3000, seed=6)
    options = {"basis_ratio": 0.1, "k": 8, "selection_chunk": 1000, "coverage_quantile": 0.95, "sample_size": 5000}
    method = create_method("sgfr", **options)
    method.fit_bank(points)
    assert [len(vectors) for vectors, _, _ in selections] == [1000, 1000, 1000]
    assert method.bank_stats()[0] == 300 == sum(len(kept) for _, kept, _ in selections)
    for vectors, kept, n_keep in selections:
        _assert_covered(vectors, kept, _mth_neighbour_radius(vectors, n_keep, 0.95))
    reordered = create_method("sgfr", **options)
    reordered.fit_bank(points[torch.randperm(3000, generator=torch.Generator().manual_seed(2))])
    assert torch.equal(method.basis, reordered.basis)


@pytest.mark.parametrize("sampling", ["sparse", "coreset", "random"])
def test_basis_size_follows_the_ratio_of_all_vectors_seen(sampling: str) -> None:
    points, _ = _subspaces(8 * 64, seed=2)
    method = create_method("sgfr", sampling=sampling, basis_ratio=0.1, k=4, candidate_factor=2.0)
    method.fit([_as_features(points[:256], 4), _as_features(points[256:], 4)])
    # Coreset sampling: the union of the 8 images' own coresets, each rounded up (at most one vector an image over).
    expected = 8 * math.ceil(0.1 * 64) if sampling == "coreset" else math.ceil(0.1 * 512)
    assert method.bank_stats()[0] == expected
    assert method.basis.shape == (expected, 32)

    # Distributed path: condense runs on workers (other instances), the driver passes the original count.
    workers = [create_method("sgfr", sampling=sampling, basis_ratio=0.1, k=4) for _ in range(2)]
    candidates = torch.cat([worker.condense(chunk) for worker, chunk in zip(workers, points.split(256), strict=True)])
    factor = 1.0 if sampling == "coreset" else workers[0].options.candidate_factor  # coreset: the union is the basis
    assert len(candidates) == 2 * math.ceil(0.1 * factor * 256)
    driver = create_method("sgfr", sampling=sampling, basis_ratio=0.1, k=4)
    driver.fit_bank(candidates, total_vectors=512)
    assert driver.bank_stats()[0] == 52
    with pytest.raises(ValueError, match=f"total_vectors=50 is smaller than the {len(candidates)} candidates"):
        driver.fit_bank(candidates, total_vectors=50)

    capped = create_method("sgfr", sampling=sampling, basis_ratio=0.1, k=4, max_basis=40)
    capped.fit_bank(candidates, total_vectors=512)
    assert capped.bank_stats()[0] == 40 and capped.options.max_basis == 40
    assert create_method("sgfr").options.max_basis == 0


def test_coreset_sampling_keeps_the_union_of_each_images_own_k_center_coreset() -> None:
    """A composable coreset, like patchcore's: linear in the images, where one global greedy pass is quadratic."""
    points, _ = _subspaces(4 * 64, seed=4)
    method = create_method("sgfr", sampling="coreset", basis_ratio=0.25, k=4)
    method.fit([_as_features(points, 4)])
    union = torch.cat([image[greedy_coreset(image, 16, seed=sgfr._content_seed(0, image))]
                       for image in points.reshape(4, 64, -1)])
    assert method.bank_stats()[0] == 64
    assert torch.equal(method.basis[sgfr.canonical_order(method.basis)], union[sgfr.canonical_order(union)])


@pytest.mark.parametrize(("name", "options"), [("sgfr", {"sampling": "sparse"}), ("sgfr", {"sampling": "coreset"}),
                                               ("patchcore", {"coreset_ratio": 0.25})])
def test_a_bank_fit_depends_on_its_images_not_on_their_batching_or_order(name: str, options: dict) -> None:
    """Ray Data batches a fit's images as they come (another batch size, a task retried on a surviving node): each
    image is condensed on its own and the candidates put in a value order, so any batching fits the same model."""
    points, _ = _subspaces(12 * 64, seed=3)
    images = points.reshape(12, 64, -1)
    shuffled = images[torch.randperm(12, generator=torch.Generator().manual_seed(1))]
    fitted = []
    for layout, sizes in ((images, (4, 4, 4)), (shuffled, (5, 7))):
        method = create_method(name, **options)
        method.fit([_as_features(batch.reshape(-1, batch.shape[-1]), len(batch)) for batch in layout.split(sizes)])
        fitted.append(method)
    assert fitted[0].bank_stats()[0] < len(points)
    queries = _subspaces(200, seed=4)[0]
    assert torch.equal(fitted[0].score_vectors(queries), fitted[1].score_vectors(queries))


def test_neighbours_an_ivf_search_could_not_find_are_left_out_of_the_reconstruction() -> None:
    points, _ = _subspaces(4 * 64, seed=11)
    method = create_method("sgfr", basis_ratio=1.0, k=16, index="ivf", nlist=64, nprobe=1)
    method.fit([_as_features(points, 4)])
    queries = _subspaces(64, seed=12)[0]
    _, ids = knn.search(method.index, queries.numpy(), 16)
    assert (ids < 0).any(), "the test needs probed cells holding fewer than k vectors"
    alpha = method.options.lam * float(method.basis.pow(2).sum(dim=1).mean()) / 2
    expected = []
    for query, row in zip(queries.double().numpy(), ids, strict=True):
        basis = method.basis.double().numpy()[row[row >= 0]]
        design = np.vstack([basis.T, math.sqrt(alpha) * np.eye(len(basis))])
        code = np.linalg.lstsq(design, np.concatenate([query, np.zeros(len(basis))]), rcond=None)[0]
        expected.append(np.linalg.norm(query - code @ basis))
    scores = method.score(_as_features(queries, 1)).reshape(-1)
    np.testing.assert_allclose(scores.numpy(), np.array(expected), rtol=1e-4, atol=1e-5)


def test_options_are_checked_with_the_allowed_range() -> None:
    with pytest.raises(OptionError, match=r"sgfr\.sampling='greedy': Input should be 'sparse', 'coreset' or 'random'"):
        create_method("sgfr", sampling="greedy")
    with pytest.raises(OptionError, match=r"sgfr\.basis_ratio='1.5': Input should be less than or equal to 1"):
        create_method("sgfr", basis_ratio="1.5")
    with pytest.raises(OptionError, match=r"sgfr\.k='eight': Input should be a valid integer"):
        create_method("sgfr", k="eight")
    with pytest.raises(NotFittedError, match=r"sgfr is not fitted: score\(\)"):
        create_method("sgfr").score([torch.zeros(1, 4, 2, 2)])
    with pytest.raises(NotFittedError, match=r"sgfr is not fitted: state\(\)"):
        create_method("sgfr").state()


@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_artifact_round_trip_gives_identical_scores(tmp_path, tau: float) -> None:
    points, _ = _subspaces(4 * 64, seed=3)
    method = create_method("sgfr", basis_ratio=0.25, k=8, tau=tau, iterations=20)
    method.fit([_as_features(points, 4)])
    queries = _as_features(_subspaces(2 * 64, seed=4)[0], 2)
    spec = ModelSpec(backbone="tf_efficientnet_lite0", levels=[2, 3], image_size=64, mean=[0.5] * 3, std=[0.5] * 3)
    save_artifact(tmp_path, method, spec, threshold=None, categories=["toy"])
    restored = load_artifact(tmp_path).method.to("cpu")
    assert isinstance(restored, SGFR)
    assert torch.equal(restored.basis, method.basis)
    assert restored.bank_stats() == method.bank_stats()
    assert torch.equal(restored.score(queries), method.score(queries))


def test_auto_index_is_ivf_from_its_own_threshold_and_scores_like_exact_search() -> None:
    """sgfr switches to IVF far below patchcore's threshold; the approximate neighbour sets rebuild nominal points as
    well as the exact ones, so scores barely move."""
    points, _ = _subspaces(64 * 64 + 256, seed=11)
    train, queries = points[: 64 * 64], _as_features(points[64 * 64 :], 1)
    assert len(train) * 0.5 >= sgfr_module.IVF_FROM_VECTORS > len(train) * 0.5 * 0.5
    small = create_method("sgfr", basis_ratio=0.25, sampling="random")
    small.fit([_as_features(train, 4)])
    assert isinstance(small.index, faiss.IndexFlatL2)
    method = create_method("sgfr", basis_ratio=0.5, sampling="random")
    method.fit([_as_features(train, 4)])
    assert isinstance(method.index, faiss.IndexIVFFlat)
    cells = round(sgfr_module.IVF_CELLS_PER_SQRT * math.sqrt(len(method.basis)))
    assert method.index.nlist == cells and method.index.nprobe == 4
    exact = create_method("sgfr", basis_ratio=0.5, sampling="random", index="flat")
    exact.fit([_as_features(train, 4)])
    assert torch.equal(exact.basis, method.basis)
    approximate, reference = method.score(queries).flatten(), exact.score(queries).flatten()
    assert float(((approximate - reference).abs() / reference).median()) < 0.05
    assert float(approximate.mean()) == pytest.approx(float(reference.mean()), rel=0.05)


def test_faiss_index_round_trip_gives_identical_search() -> None:
    points, _ = _subspaces(2048, seed=6)
    for kind in ("flat", "ivf"):
        index = knn.build_index(points.numpy(), kind=kind, nlist=16, nprobe=4, use_gpu=False)
        copy = faiss.deserialize_index(faiss.serialize_index(index))
        queries = points[:300].numpy() + 0.01
        expected, got = knn.search(index, queries, 16), knn.search(copy, queries, 16)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])


def test_residual_ranks_off_subspace_patches_above_nominal_ones() -> None:
    points, bases = _subspaces(16 * 64 + 512, seed=7)
    train, normal, shifted = points[:1024], points[1024:1280], points[1280:]
    method = create_method("sgfr", basis_ratio=0.1, k=16)
    method.fit([_as_features(train, 16)])
    # Anomalies: nominal points plus an offset orthogonal to every subspace, a tenth of a typical point's norm.
    generator = torch.Generator().manual_seed(9)
    span = torch.linalg.qr(torch.cat(bases, dim=1))[0]
    offset = torch.randn(256, train.shape[1], generator=generator)
    offset = offset - offset @ span @ span.T
    anomalies = shifted + offset / offset.norm(dim=1, keepdim=True) * 0.1 * normal.norm(dim=1).mean()
    scores = method.score(_as_features(torch.cat([normal, anomalies]), 8)).reshape(-1)
    auroc = roc_auc_score(np.r_[np.zeros(256), np.ones(256)], scores.numpy())
    assert auroc > 0.9, f"toy AUROC {auroc:.3f}"


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_projected_search_finds_the_neighbours_of_the_pca_projection_and_survives_a_round_trip(kind: str) -> None:
    points, _ = _subspaces(2048, dim=64, subspaces=4, rank=6, seed=13)
    index = knn.build_index(points.numpy(), kind=kind, nlist=16, nprobe=16, use_gpu=False, search_dims=12)
    assert isinstance(index, faiss.IndexPreTransform) and index.d == 64
    queries = points[:200].numpy() + 0.01
    distances, ids = knn.search(index, queries, 8)
    # The same search done by hand: PCA onto the 12 leading directions of the points, then exact search there.
    centred = points.double().numpy() - points.double().numpy().mean(axis=0)
    directions = np.linalg.eigh(centred.T @ centred)[1][:, ::-1][:, :12]
    projected = NearestNeighbors(n_neighbors=8).fit(centred @ directions)
    expected = projected.kneighbors((queries - points.double().numpy().mean(axis=0)) @ directions)
    np.testing.assert_allclose(np.sqrt(distances), expected[0], rtol=1e-3, atol=1e-4)
    assert (np.sort(ids, axis=1) == np.sort(expected[1], axis=1)).mean() > 0.99
    copy = faiss.deserialize_index(faiss.serialize_index(index))
    np.testing.assert_array_equal(knn.search(copy, queries, 8)[1], ids)


def test_sgfr_searches_a_projection_only_when_it_is_narrower_than_the_features(tmp_path) -> None:
    points, _ = _subspaces(4 * 64, dim=64, seed=14)
    queries = _as_features(_subspaces(64, dim=64, seed=15)[0], 1)
    wide = create_method("sgfr", basis_ratio=0.5, k=8, search_dims=64)
    wide.fit([_as_features(points, 4)])
    assert isinstance(wide.index, faiss.IndexFlatL2)
    narrow = create_method("sgfr", basis_ratio=0.5, k=8, search_dims=16)
    narrow.fit([_as_features(points, 4)])
    assert isinstance(narrow.index, faiss.IndexPreTransform)
    # The index holds 16-dimensional projections; the 64-dimensional basis it reconstructs from is counted too.
    assert narrow.bank_stats()[1] > narrow.basis.numel() * 4 + len(narrow.basis) * 16 * 4
    spec = ModelSpec(backbone="tf_efficientnet_lite0", levels=[2, 3], image_size=64, mean=[0.5] * 3, std=[0.5] * 3)
    save_artifact(tmp_path, narrow, spec, threshold=None, categories=["toy"])
    restored = load_artifact(tmp_path).method
    assert isinstance(restored.index, faiss.IndexPreTransform)
    assert torch.equal(restored.score(queries), narrow.score(queries))


def test_the_fit_measures_its_search_recall_and_chooses_settings_by_it() -> None:
    """recall_target 0 keeps the configured search and records its measured recall; a target picks the cheapest
    setting that reaches it on held-out vectors, leaves pinned settings alone, and the artifact keeps the choice."""
    vectors, _ = _subspaces(12_000, dim=48, subspaces=6, rank=8, noise=0.05)
    default = create_method("sgfr", basis_ratio=0.25, sampling="random", search_dims=8, nprobe=1)
    default.fit_bank(vectors)
    measured = default.state().info["search"]
    assert (measured["kind"], measured["search_dims"], measured["nprobe"], measured["target"]) == ("ivf", 8, 1, 0.0)
    assert 0.0 < measured["recall"] < 0.95 and measured["queries"] == knn.RECALL_QUERIES
    assert default.options.index == "auto"

    chosen = create_method("sgfr", basis_ratio=0.25, sampling="random", recall_target=0.95)
    chosen.fit_bank(vectors)
    search = chosen.state().info["search"]
    assert search["recall"] >= 0.95 and search["cost"] < search["exact_cost"]
    assert (chosen.options.index, chosen.options.search_dims, chosen.options.nprobe) == (
        search["kind"], search["search_dims"], search["nprobe"] or chosen.options.nprobe)
    # Measured again on the vectors the basis did not keep, the chosen index reaches the target too.
    basis = chosen.basis.numpy()
    kept = {row.tobytes() for row in basis}
    held_out = np.stack([row for row in vectors.numpy() if row.tobytes() not in kept][:500])
    exact = knn.exact_neighbours(basis, held_out, chosen.options.k)
    assert knn.recall_at_k(chosen.index, held_out, exact) >= 0.93
    restored = SGFR.from_state(chosen.state())
    assert restored.state().info["search"] == search

    pinned = create_method("sgfr", basis_ratio=0.25, sampling="random", recall_target=0.95, search_dims=8)
    pinned.fit_bank(vectors)
    pinned_search = pinned.state().info["search"]
    assert pinned_search["search_dims"] == pinned.options.search_dims == 8  # kept, whatever recall it reaches
    assert pinned_search["recall"] > measured["recall"]  # more cells probed than the default's one
