"""RLR model: window geometry, masks, efficient attention against the dense oracle, loss, scores and state."""

import math

import pytest
import torch

from reconray.methods.errors import NotFittedError, OptionError
from reconray.methods.rlr import (
    RECIPES,
    RLR,
    LRSchedule,
    RLRModel,
    add_jitter,
    category_repeats,
    channel_statistics,
    check_grid,
    local_window_mask,
    make_optimizer,
    patience_ran_out,
    resolve_precision,
    token_scores,
    train_step,
    window_blocks,
    window_size,
)
from reconray.methods.rlr_reference import RLRReferenceModel, dense_window_masks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP barriers that cost 20x under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _expected_window(height: int, width: int) -> torch.Tensor:
    """Brute force, position by position: True where key (r2, c2) is inside the window of query (r1, c1)."""
    half_h, half_w = window_size(height) // 2, window_size(width) // 2
    expected = torch.zeros(height * width, height * width, dtype=torch.bool)
    for r1 in range(height):
        for c1 in range(width):
            for r2 in range(max(0, r1 - half_h), min(height, r1 + half_h + 1)):
                for c2 in range(max(0, c1 - half_w), min(width, c1 + half_w + 1)):
                    expected[r1 * width + c1, r2 * width + c2] = True
    return expected


def test_window_size_follows_the_reference_table_and_scales_with_the_grid():
    assert [window_size(g) for g in (16, 32, 64)] == [5, 7, 11]
    sides = [window_size(g) for g in range(1, 200)]
    assert all(side % 2 == 1 and side >= 3 for side in sides)
    assert sides == sorted(sides)
    assert window_size(128) == 15 and window_size(8) == 3


@pytest.mark.parametrize("grid", [(16, 16), (32, 32), (7, 9), (20, 13)])
def test_lca_blocks_see_exactly_each_window(grid):
    height, width = grid
    blocks = window_blocks(height, width)
    tiles, slots = blocks.queries.shape
    seen = torch.zeros(height * width, height * width, dtype=torch.bool)
    for position in range(height * width):
        tile, slot = divmod(int(blocks.slot[position]), slots)
        assert blocks.queries[tile, slot] == position
        seen[position, blocks.keys[tile][blocks.allowed[tile, slot]]] = True
    assert torch.equal(seen, _expected_window(height, width))
    assert blocks.slot.unique().numel() == height * width  # every position lands in its own slot


def test_lca_blocks_read_far_fewer_keys_than_the_dense_grid_on_large_grids():
    blocks = window_blocks(64, 64)
    assert blocks.keys.shape[1] <= 0.2 * 64 * 64


@pytest.mark.parametrize("grid", [(16, 16), (32, 32), (7, 9)])
def test_mlka_never_sees_its_own_window_and_sees_everything_else(grid):
    allowed = ~local_window_mask(*grid)
    assert torch.equal(allowed, ~_expected_window(*grid))
    assert allowed.any(dim=1).all()


def test_oracle_masks_agree_with_the_window_rule():
    lca, mlka = dense_window_masks(7, 9)
    window = _expected_window(7, 9)
    assert torch.equal(lca == 0, window) and torch.equal(mlka == 0, ~window)


@pytest.mark.parametrize(
    "grids, ref_len",
    [
        ([(16, 16), (8, 8)], 1),
        ([(32, 32)], 1),
        ([(64, 64)], 1),
        ([(13, 11), (7, 6)], 2),
    ],
)
def test_efficient_model_matches_the_dense_oracle(grids, ref_len):
    torch.manual_seed(0)
    channels = [6, 10][: len(grids)]
    efficient = RLRModel(channels, grids, d_model=16, heads=2, layers=1, ref_len=ref_len).double()
    efficient.set_feature_statistics([(torch.randn(c), torch.rand(c) + 0.5) for c in channels])
    oracle = RLRReferenceModel(channels, grids, d_model=16, heads=2, layers=1, ref_len=ref_len).double()
    oracle.load_state_dict(efficient.state_dict())
    features = [torch.randn(2, c, *grid, dtype=torch.float64) for c, grid in zip(channels, grids, strict=True)]
    for fast, plain in zip(efficient(features), oracle(features), strict=True):
        assert ((fast - plain).norm() / plain.norm()).item() < 1e-5


def test_lca_output_ignores_reference_tokens_outside_the_window():
    torch.manual_seed(0)
    model = RLRModel([4], [(16, 16)], d_model=16, heads=2, layers=1).double()
    lca = model.levels[0].layers[0].lca
    x = torch.randn(1, 256, 16, dtype=torch.float64)
    reference = torch.randn(1, 256, 16, dtype=torch.float64)
    moved = reference.clone()
    moved[0, 15 * 16 + 15] += 10.0  # bottom-right corner token
    before, after = lca(x, reference), lca(x, moved)
    changed = (before - after).abs().amax(dim=-1)[0].reshape(16, 16) > 0
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[13:, 13:] = True  # positions whose 5x5 window holds the corner
    assert torch.equal(changed, expected)


def test_a_grid_is_refused_exactly_when_some_position_has_every_long_range_key_blocked():
    for grid in ((3, 3), (3, 2), (2, 3), (3, 1), (1, 3), (2, 2), (1, 1)):
        with pytest.raises(ValueError, match=f"grid {grid[0]}x{grid[1]} is too small"):
            check_grid(grid)
    for grid in ((4, 4), (4, 1), (1, 4), (4, 3), (16, 16)):
        assert check_grid(grid) == grid
    for height in range(1, 8):  # against the mask itself: a row of all-True means nothing left for MLKA
        for width in range(1, 8):
            blocked = bool(local_window_mask(height, width).all(dim=1).any())
            try:
                check_grid((height, width))
                refused = False
            except ValueError:
                refused = True
            assert refused == blocked, (height, width)


def test_architecture_errors_name_the_values():
    with pytest.raises(ValueError, match="d_model 30 must be a positive multiple of heads 4"):
        RLRModel([4], [(8, 8)], d_model=30, heads=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        RLRModel([4], [(8, 8)], d_model=6, heads=2)
    model = RLRModel([4], [(8, 8)], d_model=16, heads=2, layers=1)
    with pytest.raises(ValueError, match=r"expected features \(B, 4, 8, 8\), got \(1, 4, 4, 4\)"):
        model([torch.randn(1, 4, 4, 4)])


def test_jitter_scales_with_the_token_norm_over_channels():
    torch.manual_seed(0)
    features = torch.ones(64, 16, 8, 8) * 3.0  # token norm 12, / 16 channels = 0.75
    assert torch.equal(add_jitter(features, 0.0), features)
    noise = add_jitter(features, 4.0) - features
    assert noise.std().item() == pytest.approx(0.75 * 4.0, rel=0.02)


def test_rms_jitter_is_the_same_share_of_the_token_on_any_channel_count():
    torch.manual_seed(0)
    for channels in (16, 64):
        features = torch.ones(64, channels, 8, 8) * 3.0  # every token's root-mean-square is 3
        noise = add_jitter(features, 0.5, "rms") - features
        assert noise.std().item() == pytest.approx(3.0 * 0.5, rel=0.02)
    with pytest.raises(OptionError, match="jitter_unit 'percent' is invalid"):
        add_jitter(features, 0.5, "percent")


def test_the_schedule_warms_up_linearly_then_decays_along_a_cosine_to_zero():
    options = RLR.Options(epochs=10, lr_schedule="cosine", warmup=0.1)
    schedule = LRSchedule(options, steps_per_epoch=10)  # 100 steps, 10 of them warm-up
    factors = [schedule.factor(step) for step in range(100)]
    assert factors[:10] == pytest.approx([(step + 1) / 11 for step in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5, abs=1e-9)  # half-way through the decay
    assert all(later < earlier for earlier, later in zip(factors[10:], factors[11:], strict=False))
    assert factors[99] < 1e-3
    constant = LRSchedule(RLR.Options(epochs=10, warmup=0.1), steps_per_epoch=10)
    assert [constant.factor(step) for step in (0, 9, 10, 99)] == pytest.approx([1 / 11, 10 / 11, 1.0, 1.0])


def test_a_time_budget_moves_the_end_of_the_decay_to_where_the_budget_runs_out():
    schedule = LRSchedule(RLR.Options(epochs=100, lr_schedule="cosine", time_budget_s=60.0), steps_per_epoch=10)
    assert schedule.horizon == 1000
    schedule.step = 10
    schedule.fit_budget(elapsed_s=3.0)  # 10 steps in 3 s: the budget holds 200
    assert schedule.horizon == 200 and schedule.factor(100) == pytest.approx(0.5) and schedule.factor(199) < 1e-3
    schedule.fit_budget(elapsed_s=0.1)  # a faster pace never stretches it past the epochs
    assert schedule.horizon == 1000


def test_the_reference_tokens_learn_at_their_own_rate():
    torch.manual_seed(0)
    model = RLRModel([6, 12], [(8, 8), (4, 4)], d_model=16, heads=2, layers=1)
    optimizer = make_optimizer(model, lr=1e-4, reference_lr=1e-2)
    reference_group = next(group for group in optimizer.param_groups if group["base_lr"] == 1e-2)
    assert {id(param) for param in reference_group["params"]} == {id(level.reference) for level in model.levels}
    options = RLR.Options(epochs=1, lr=1e-4, reference_lr=1e-2, lr_schedule="cosine", warmup=0.5, precision="float32")
    schedule = LRSchedule(options, steps_per_epoch=4)
    before = [level.reference.detach().clone() for level in model.levels]
    weights = model.levels[0].projection.weight.detach().clone()
    train_step(model, optimizer, [torch.randn(2, 6, 8, 8), torch.randn(2, 12, 4, 4)], options, schedule)
    # Adam's first step moves every weight by its rate (times the sign of its gradient): here warm-up's 1/3 of each.
    assert reference_group["lr"] == pytest.approx(1e-2 / 3)
    moved = (model.levels[0].reference.detach() - before[0]).abs()
    assert moved.median().item() == pytest.approx(1e-2 / 3, rel=1e-3)
    assert (model.levels[0].projection.weight.detach() - weights).abs().median().item() == pytest.approx(
        1e-4 / 3, rel=1e-3)
    assert not torch.equal(model.levels[1].reference, before[1])


def test_feature_statistics_put_the_output_on_the_features_scale():
    """With its output projection at zero a standardised model predicts each channel's training mean: the
    reparametrisation starts the output at the features' scale, where a raw one starts at zero."""
    torch.manual_seed(0)
    features = [torch.randn(8, 6, 8, 8) * 5 + 10, torch.randn(8, 12, 4, 4) * 4 - 3]
    statistics = channel_statistics([[level[:4] for level in features], [level[4:] for level in features]])
    for (mean, std), level in zip(statistics, features, strict=True):
        assert torch.allclose(mean, level.double().mean(dim=(0, 2, 3)).float(), atol=1e-4)
        assert torch.allclose(std, level.double().std(dim=(0, 2, 3), unbiased=False).float(), atol=1e-4)
    raw = RLRModel([6, 12], [(8, 8), (4, 4)], d_model=16, heads=2, layers=1)
    standardized = RLRModel([6, 12], [(8, 8), (4, 4)], d_model=16, heads=2, layers=1)
    standardized.set_feature_statistics(statistics)
    for model in (raw, standardized):
        for level in model.levels:
            torch.nn.init.zeros_(level.projection.weight)
            torch.nn.init.zeros_(level.projection.bias)
    with torch.no_grad():
        for (mean, _), output in zip(statistics, standardized(features), strict=True):
            assert torch.allclose(output, mean[None, :, None, None].expand_as(output))
        assert all(output.abs().max().item() == 0 for output in raw(features))
    with pytest.raises(Exception, match="no training features"):
        channel_statistics([])


def test_balanced_sampling_repeats_each_category_to_match_the_largest():
    assert category_repeats({"magnetic_tile": 460, "kos": 280, "wood": 23, "nut": 30}) == {
        "magnetic_tile": 1, "kos": 2, "wood": 20, "nut": 15}
    assert category_repeats({"only": 5}) == {"only": 1}


def test_early_stopping_waits_for_patience_scores_without_a_new_best():
    assert not patience_ran_out([0.5, 0.6, 0.6], None)
    assert not patience_ran_out([0.5, 0.6], 2)  # too few scores to judge
    assert patience_ran_out([0.5, 0.6, 0.6, 0.55], 2)  # ties do not count as progress
    assert not patience_ran_out([0.5, 0.6, 0.55, 0.61], 2)


def test_the_recipe_fills_only_what_the_user_left_unset_and_says_which(caplog):
    caplog.set_level("INFO", logger="reconray")
    laptop = RLR(lr=5e-4)
    laptop.use_recipe(gpu=False)
    assert laptop.options.recipe == "cpu" and laptop.options.lr == 5e-4
    assert {key: getattr(laptop.options, key) for key in RECIPES["cpu"] if key != "lr"} == {
        key: value for key, value in RECIPES["cpu"].items() if key != "lr"}
    assert "rlr: cpu recipe (auto: no GPU to train on); it sets epochs=" in caplog.text
    again = RLR(**laptop.options.model_dump())
    again.use_recipe(gpu=True)  # a resolved recipe stays what it is
    assert again.options == laptop.options
    gpu = RLR()
    gpu.use_recipe(gpu=True)
    assert gpu.options.recipe == "reference" and gpu.options == RLR.Options(recipe="reference")
    assert "rlr: reference recipe (auto: training on a GPU)" in caplog.text
    forced = RLR(recipe="reference")
    forced.use_recipe(gpu=False)
    assert forced.options.d_model == 256 and forced.options.lr_schedule == "constant"


def test_token_scores_are_zero_for_perfect_reconstruction_and_localise_errors():
    features = [torch.rand(2, 4, 8, 8) + 0.5, torch.rand(2, 6, 4, 4) + 0.5]
    assert token_scores(features, features).abs().max().item() < 1e-6
    damaged = [features[0].clone(), features[1]]
    damaged[0][1, :, 5, 2] = -1.0
    scores = token_scores(features, damaged)
    assert scores.shape == (2, 8, 8)
    assert scores[0].abs().max().item() < 1e-6
    assert tuple(divmod(int(scores[1].argmax()), 8)) == (5, 2)


def _structured_batches(count: int, seed: int) -> list[list[torch.Tensor]]:
    """Normal 'images': smooth stripes at a random phase, as two feature levels (8x8 and 4x4)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count // 4):
        phase = torch.rand(4, 1, 1, 1, generator=generator) * 2 * math.pi
        rows = torch.arange(8.0).view(1, 1, 8, 1)
        fine = torch.sin(rows / 2 + phase + torch.arange(6.0).view(1, 6, 1, 1)).expand(4, 6, 8, 8) + 1.5
        coarse = torch.nn.functional.avg_pool2d(fine, 2).repeat(1, 2, 1, 1)
        batches.append([fine.contiguous(), coarse.contiguous()])
    return batches


def _tiny_rlr(**options) -> RLR:
    settings = {"epochs": 6, "lr": 2e-3, "d_model": 16, "heads": 2, "layers": 1, "jitter": 1.0}
    return RLR(**(settings | options))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_fit_lowers_the_loss_and_scores_anomalies_higher(precision):
    method = _tiny_rlr(precision=precision)
    method.fit(_structured_batches(32, seed=0))
    losses = method.info["losses"]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    assert method.info["epoch"] == 6 and method.info["loss"] == losses[-1] and method.info["images_per_s"] > 0
    normal = _structured_batches(4, seed=1)[0]
    anomalous = [level.clone() for level in normal]
    anomalous[0][:, :, 2:4, 2:4] = 6.0
    anomalous[1][:, :, 1, 1] = 6.0
    normal_scores, anomalous_scores = method.score(normal), method.score(anomalous)
    assert normal_scores.shape == (4, 8, 8)
    assert (anomalous_scores[:, 2:4, 2:4].mean() > 2 * normal_scores[:, 2:4, 2:4].mean()).item()


def test_a_time_budget_ends_training_after_the_epoch_that_spends_it():
    method = _tiny_rlr(epochs=50, time_budget_s=1e-3)  # any epoch takes longer than a millisecond
    method.fit(_structured_batches(8, seed=0))
    assert method.info["epoch"] == 1 and method.info["elapsed_s"] >= 1e-3 and len(method.info["losses"]) == 1
    with pytest.raises(OptionError, match="time_budget_s"):
        _tiny_rlr(time_budget_s=0)


def test_state_round_trip_rebuilds_the_same_model():
    method = _tiny_rlr(epochs=1)
    batches = _structured_batches(8, seed=0)
    method.fit(batches)
    state = method.state()
    assert state.info["channels"] == [6, 12] and state.info["grids"] == [[8, 8], [4, 4]]
    assert set(state.options) == set(RLR.defaults())  # the options define the model only
    restored = RLR.from_state(state)
    assert torch.allclose(restored.score(batches[0]), method.score(batches[0]), atol=1e-6)


def test_precision_auto_is_bfloat16_only_with_native_support_and_unknown_ones_are_refused():
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert resolve_precision(torch.device("cpu")) == ("bfloat16" if native else "float32")
    assert resolve_precision(torch.device("cpu"), "float32") == "float32"
    with pytest.raises(OptionError, match=r"rlr\.precision='half': Input should be 'auto', 'float32' or 'bfloat16'"):
        _tiny_rlr(precision="half")
    with pytest.raises(OptionError, match=r"unknown option\(s\) \['num_workers'\]"):
        _tiny_rlr(num_workers=2)  # scheduling is a training setting of the pipeline, not a model option


def test_bfloat16_scores_agree_with_float32_scores():
    """Autocast changes rounding, not the score: same model, same maps up to bfloat16's ~3 significant digits."""
    method = _tiny_rlr(precision="float32", epochs=2)
    batches = _structured_batches(8, seed=0)
    method.fit(batches)
    exact = method.score(batches[0])
    method.options = method.options.model_copy(update={"precision": "bfloat16"})
    mixed = method.score(batches[0])
    assert exact.shape == mixed.shape
    assert ((mixed - exact).abs() / exact.abs().clamp_min(1e-3)).median() < 0.02
    ranks = torch.stack([exact.flatten().argsort().argsort(), mixed.flatten().argsort().argsort()]).float()
    assert torch.corrcoef(ranks)[0, 1] > 0.95


def test_score_before_fit_is_refused():
    with pytest.raises(NotFittedError, match=r"rlr is not fitted: score\(\)"):
        _tiny_rlr().score([torch.zeros(1, 6, 8, 8)])
    with pytest.raises(OptionError, match="d_model 30 must be a multiple of 4 and of heads 4"):
        _tiny_rlr(d_model=30, heads=4)
