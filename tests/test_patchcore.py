"""PatchCore: scores are nearest-neighbour distances, flat and IVF search agree, greedy coreset is k-center."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from reconray.methods import create_method, knn
from reconray.methods.base import canonical_order
from reconray.methods.coreset import greedy_coreset
from reconray.methods.errors import NotFittedError, OptionError
from reconray.methods.patchcore import PatchCore


def _clusters(count: int, dim: int, clusters: int = 10, spread: float = 0.05, seed: int = 0) -> torch.Tensor:
    """`count` points around `clusters` well-separated centres: easy data where approximate search is exact."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (clusters, dim))
    points = centres[rng.integers(0, clusters, count)] + rng.normal(0, spread, (count, dim))
    return torch.from_numpy(points.astype(np.float32))


def _as_features(vectors: torch.Tensor, batch: int, height: int, width: int) -> list[torch.Tensor]:
    """Patch vectors `(B*h*w, C)` back to one feature level `(B, C, h, w)`, the layout a method receives."""
    return [vectors.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()]


def _fitted(vectors: torch.Tensor, **options) -> PatchCore:
    method = create_method("patchcore", **options)
    method.fit([_as_features(vectors, len(vectors) // 16, 4, 4)])
    return method


def test_scores_are_distances_to_the_nearest_bank_patch() -> None:
    generator = torch.Generator().manual_seed(0)
    train = [torch.randn(3, 6, 8, 8, generator=generator), torch.randn(3, 10, 4, 4, generator=generator)]
    test = [torch.randn(2, 6, 8, 8, generator=generator), torch.randn(2, 10, 4, 4, generator=generator)]
    method = create_method("patchcore")
    method.fit([train])
    bank = method.embed(train)
    assert bank.shape == (3 * 8 * 8, 16)
    expected = torch.cdist(method.embed(test), bank).min(dim=1).values.reshape(2, 8, 8)
    scores = method.score(test)
    assert scores.shape == (2, 8, 8)
    torch.testing.assert_close(scores, expected, atol=1e-3, rtol=1e-4)
    assert method.score(train).abs().max() < 1e-2
    assert method.bank_stats()[0] == 3 * 8 * 8


def test_flat_and_ivf_search_agree_on_easy_data() -> None:
    train, test = _clusters(2048, 24, seed=0), _clusters(256, 24, seed=0) + 0.01
    flat = _fitted(train, index="flat")
    ivf = _fitted(train, index="ivf", nlist=32, nprobe=8)
    assert isinstance(knn.to_cpu(flat.index), faiss.IndexFlatL2)
    assert isinstance(knn.to_cpu(ivf.index), faiss.IndexIVFFlat)
    assert (knn.to_cpu(ivf.index).nprobe, knn.to_cpu(ivf.index).nlist) == (8, 32)
    queries = _as_features(test, 16, 4, 4)
    torch.testing.assert_close(ivf.score(queries), flat.score(queries), atol=1e-4, rtol=1e-4)


def test_auto_index_switches_to_ivf_for_large_banks(monkeypatch: pytest.MonkeyPatch) -> None:
    train = _clusters(1024, 8)
    assert isinstance(knn.to_cpu(_fitted(train).index), faiss.IndexFlatL2)
    monkeypatch.setattr(knn, "IVF_MIN_VECTORS", 1000)
    assert isinstance(knn.to_cpu(_fitted(train).index), faiss.IndexIVFFlat)


def test_large_bank_search_is_the_cheapest_reaching_the_recall_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hard data (uniform in 16 dims, no clusters for IVF to exploit): the nprobe chosen is the first of the ladder
    whose leave-one-out recall@1 reaches the target, measured again here from scratch."""
    monkeypatch.setattr(knn, "IVF_MIN_VECTORS", 1000)
    bank = torch.from_numpy(np.random.default_rng(1).random((4096, 16), dtype=np.float32))
    method = _fitted(bank, recall_target=0.9)
    search = method.state().info["search"]
    assert (search["kind"], search["nlist"], search["k"]) == ("ivf", 64, 1) and search["recall"] >= 0.9
    assert (method.options.index, method.options.nprobe) == ("ivf", search["nprobe"])
    vectors = bank[canonical_order(bank)].numpy()  # the order the fit stores its bank in
    ids = np.random.default_rng(0).choice(len(vectors), knn.RECALL_QUERIES, replace=False)
    exact = knn.exact_neighbours(vectors, vectors[ids], 1, ids)
    index = knn.to_cpu(method.index)
    recalls = {}
    for probe in knn.NPROBE_LADDER:
        index.nprobe = probe
        recalls[probe] = knn.recall_at_k(index, vectors[ids], exact, ids)
    assert search["nprobe"] == min(probe for probe, recall in recalls.items() if recall >= 0.9)
    assert recalls[search["nprobe"]] == pytest.approx(search["recall"])
    assert search["nprobe"] > 1, "the test data should need more than one cell"
    restored = PatchCore.from_state(method.state())
    assert restored.state().info["search"] == search
    queries = _as_features(bank[:64], 4, 4, 4)
    torch.testing.assert_close(restored.score(queries), method.score(queries))


def test_pinned_or_disabled_recall_search_keeps_the_configured_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn, "IVF_MIN_VECTORS", 1000)
    bank = torch.from_numpy(np.random.default_rng(1).random((4096, 16), dtype=np.float32))
    pinned = _fitted(bank, index="ivf", nprobe=1).state().info["search"]
    assert (pinned["kind"], pinned["nprobe"]) == ("ivf", 1) and pinned["recall"] < 0.95  # measured, below target
    measured = _fitted(bank, recall_target=0.0).state().info["search"]
    assert (measured["kind"], measured["nprobe"]) == ("ivf", 16) and 0 < measured["recall"] <= 1
    small = _fitted(bank[:512]).state().info["search"]
    assert (small["kind"], small["recall"]) == ("flat", 1.0)


def test_greedy_coreset_is_k_center_selection() -> None:
    points = torch.from_numpy(np.random.default_rng(3).random((300, 2), dtype=np.float32))
    selected = greedy_coreset(points, 12, seed=5)
    assert len(set(selected.tolist())) == 12
    distances = torch.cdist(points, points)
    for position in range(1, 12):
        to_chosen = distances[:, selected[:position]].min(dim=1).values
        assert selected[position] == torch.argmax(to_chosen), f"pick {position} is not the farthest point"
    radius = distances[:, selected].min(dim=1).values.max()
    chosen = distances[selected][:, selected] + torch.eye(12) * 1e9
    # Every pick was the farthest point when chosen, so picks are at least the final covering radius apart:
    # the property that makes greedy k-center a 2-approximation of the optimal covering radius.
    assert chosen.min() >= radius


@pytest.mark.parametrize("dim", [3, 300], ids=["exact", "projected"])
def test_coreset_takes_one_point_per_cluster(dim: int) -> None:
    rng = np.random.default_rng(dim)
    labels = rng.integers(0, 6, 500)
    centres = rng.normal(0, 10, (6, dim))
    points = torch.from_numpy((centres[labels] + rng.normal(0, 0.05, (500, dim))).astype(np.float32))
    selected = greedy_coreset(points, 6, seed=1)
    assert sorted(labels[selected.numpy()].tolist()) == [0, 1, 2, 3, 4, 5]


def test_coreset_ratio_keeps_a_subset_of_the_training_patches() -> None:
    train = _clusters(640, 12)
    method = _fitted(train, coreset_ratio="0.1")
    assert method.options.coreset_ratio == 0.1
    assert method.bank_stats()[0] == 40 * 2  # each of the 40 images keeps round(0.1 * 16) of its patches
    bank = torch.from_numpy(knn.to_cpu(method.index).reconstruct_n(0, 80))
    assert torch.cdist(bank, train, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.max() < 1e-5
    full = _fitted(train)
    queries = _as_features(_clusters(160, 12, seed=9), 10, 4, 4)
    assert torch.all(method.score(queries) >= full.score(queries) - 1e-4)


def test_state_round_trip_keeps_scores() -> None:
    method = _fitted(_clusters(256, 8))
    restored = PatchCore.from_state(method.state())
    queries = _as_features(_clusters(64, 8, seed=4), 4, 4, 4)
    assert torch.equal(restored.score(queries), method.score(queries))
    vectors, size = restored.bank_stats()
    assert (vectors, size) == method.bank_stats()
    assert vectors == 256 and size >= 256 * 8 * 4


def test_invalid_options_and_unfitted_use_are_refused() -> None:
    for ratio, bound in ((0.0, "greater than 0"), (1.5, "less than or equal to 1")):
        with pytest.raises(OptionError, match=rf"patchcore\.coreset_ratio={ratio}: Input should be {bound}"):
            create_method("patchcore", coreset_ratio=ratio)
    with pytest.raises(OptionError, match=r"patchcore\.index='foo': Input should be 'auto', 'flat' or 'ivf'"):
        create_method("patchcore", index="foo")
    with pytest.raises(OptionError, match=r"unknown option\(s\) \['neighbours'\] for method 'patchcore'"):
        create_method("patchcore", neighbours=3)
    with pytest.raises(NotFittedError, match=r"patchcore is not fitted: score\(\) needs fit\(\)"):
        create_method("patchcore").score([torch.zeros(1, 4, 2, 2)])
    with pytest.raises(NotFittedError, match=r"patchcore is not fitted: state\(\)"):
        create_method("patchcore").state()
    with pytest.raises(ValueError, match=r"coreset size must be in 1\.\.10, got 11"):
        greedy_coreset(torch.zeros(10, 2), 11)
    with pytest.raises(ValueError, match=r"k=5 neighbours requested but the index holds only 4 vectors"):
        knn.search(knn.build_index(np.zeros((4, 2)), use_gpu=False), np.zeros((1, 2)), k=5)


# --- search settings chosen by measured recall (methods/knn.py) ------------------------------------------------------


def _clustered(count: int, dim: int = 24, seed: int = 0) -> np.ndarray:
    """Vectors around 32 centres with a few dominant directions: a bank with the structure of patch features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, dim)) * np.linspace(3.0, 0.2, dim)
    return (centres[rng.integers(0, 32, count)] + rng.normal(scale=0.5, size=(count, dim))).astype(np.float32)


def _squared_distances(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return ((queries[:, None, :] - vectors[None]) ** 2).sum(axis=2)


def test_recall_matches_a_brute_force_count() -> None:
    vectors, queries = _clustered(2000), _clustered(100, seed=1)
    index = knn.build_index(vectors, kind="ivf", nlist=40, nprobe=2, use_gpu=False, search_dims=8)
    exact = knn.exact_neighbours(vectors, queries, 8)
    nearest = np.argsort(_squared_distances(vectors, queries), axis=1)[:, :8]
    np.testing.assert_array_equal(np.sort(exact, axis=1), np.sort(nearest, axis=1))
    found = index.search(queries, 8)[1]
    expected = np.mean([len(set(row) & set(truth)) / 8 for row, truth in zip(found, exact, strict=True)])
    assert knn.recall_at_k(index, queries, exact) == pytest.approx(expected)
    assert 0.2 < expected < 1.0  # a setting that misses some: the count is not trivially 0 or 1
    # Leave-one-out: indexed vectors as queries, each left out of its own neighbours.
    ids = np.arange(50)
    held_out = knn.exact_neighbours(vectors, vectors[ids], 8, query_ids=ids)
    assert not (held_out == ids[:, None]).any()
    np.testing.assert_array_equal(held_out, np.argsort(_squared_distances(vectors, vectors[ids]), axis=1)[:, 1:9])


def test_the_chosen_search_is_the_cheapest_that_reaches_the_target() -> None:
    vectors, queries = _clustered(6000), _clustered(300, seed=1)
    settings = {"kinds": ("flat", "ivf"), "dims": (4, 8, 16, 0), "nlist": 80}
    index, choice = knn.choose_search(vectors, queries, 8, 0.9, **settings)
    exact = knn.exact_neighbours(vectors, queries, 8)
    assert choice.recall >= 0.9 and knn.recall_at_k(index, queries, exact) == pytest.approx(choice.recall)
    assert choice.cost < choice.exact_cost
    # Every cheaper setting misses the target: the choice is the cheapest that reaches it.
    count, dim = vectors.shape
    for kind in settings["kinds"]:
        for width in settings["dims"]:
            for probe in knn.NPROBE_LADDER if kind == "ivf" else (0,):
                cells = 80 if kind == "ivf" else 0
                if knn.search_cost(count, dim, width, cells, probe) >= choice.cost:
                    continue
                candidate = knn.build_index(vectors, kind=kind, nlist=cells or None, nprobe=probe or 1,
                                            use_gpu=False, search_dims=width)
                assert knn.recall_at_k(candidate, queries, exact) < 0.9, (kind, width, probe)
    # A higher target costs at least as much; settings that cannot reach it give the one with the highest recall.
    _, stricter = knn.choose_search(vectors, queries, 8, 0.99, **settings)
    assert stricter.cost >= choice.cost and stricter.recall >= 0.99
    _, short = knn.choose_search(vectors, queries, 8, 1.0, kinds=("ivf",), dims=(4,), nlist=80, nprobes=(1, 2))
    assert (short.kind, short.search_dims, short.nprobe) == ("ivf", 4, 2) and short.recall < 1.0
