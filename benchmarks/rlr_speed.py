"""Training speed of one RLR step: reconray's step vs the plain reference-style step, at the reference settings.

Usage:
    python benchmarks/rlr_speed.py [--reps 5] [--threads 2] [--profile-rows 15]

Both steps train the same weights on the same images (batch 4, 256x256, tf_efficientnet_lite0 levels 2-3 -> grids
32x32 / 16x16, channels 40 / 112, d_model 256 / 512, 4 layers, 8 heads, jitter 4, Adam lr 1e-4):

- reconray: backbone features cached once (training never re-runs the frozen backbone), windowed LCA + masked SDPA
  (`methods.rlr.RLRModel`), fused Adam (`make_optimizer`), in the default precision (bfloat16 autocast on a CPU with
  AMX or AVX512-BF16, else float32), i.e. exactly `methods.rlr.train_step`; where the default is bfloat16, the same
  step in float32 is timed too.
- oracle: the backbone re-run on the images every step, dense `nn.MultiheadAttention` with -inf masks rebuilt every
  forward (`methods.rlr_reference.RLRReferenceModel`), plain `torch.optim.Adam`, as the paper's code trains.

The machine may be shared, so reps of the two steps are interleaved and both wall time and CPU time
(`time.process_time`, all threads of this process) are reported as medians. To explain the ratio, the backbone alone
(4 images) and the attention alone (LCA + MLKA forward and backward, all layers and levels) are timed the same way,
and one reconray step is profiled (top operators by self CPU time).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from reconray.methods.backbone import FeatureExtractor
from reconray.methods.rlr import RLR, RLRModel, make_optimizer, resolve_precision, rlr_loss, train_step
from reconray.methods.rlr_reference import RLRReferenceModel, dense_window_masks
from reconray.pipelines.console import console_session

BATCH = 4
IMAGE_SIZE = 256
D_MODEL, LAYERS, HEADS, JITTER, LR = 256, 4, 8, 4.0, 1e-4

# Under "reconray", so that `console_session` shows these lines.
logger = logging.getLogger("reconray.benchmarks.rlr_speed")


def _measure(step: Callable[[], object]) -> tuple[float, float]:
    """Runs `step` once; returns (wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def _attention_step(model: nn.Module, dense: bool, inputs: list[torch.Tensor]) -> Callable[[], None]:
    """Forward + backward of every layer's LCA and MLKA at every level, on fixed embedded tokens (as in a step)."""
    tokens = []
    for level, level_features in zip(model.levels, inputs, strict=True):
        x = level.input_embed(level_features.flatten(2)).transpose(1, 2) + level.position_code
        reference = level.reference_embed(level.reference.transpose(1, 2)).transpose(1, 2) + level.position_code
        tokens.append((x.detach().requires_grad_(), reference.detach().requires_grad_()))

    def run() -> None:
        total = 0
        for level, (x, reference) in zip(model.levels, tokens, strict=True):
            for layer in level.layers:
                if dense:  # what the oracle layer does: rebuild the masks, dense attention over a batch-sized reference
                    lca_mask, mlka_mask = (mask.to(x) for mask in dense_window_masks(*layer.grid))
                    batch_reference = reference.expand(x.shape[0], -1, -1)
                    lca = layer.lca(x, batch_reference, batch_reference, attn_mask=lca_mask)[0]
                    mlka = layer.mlka(x, batch_reference, x, attn_mask=mlka_mask)[0]
                else:
                    lca, mlka = layer.lca(x, reference), layer.mlka(x, reference)
                total = total + (2 * lca + mlka).square().mean()
        total.backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed reps of each step, after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-rows", type=int, default=15)
    args = parser.parse_args()
    with console_session(None):
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    backbone = FeatureExtractor()
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    cached = backbone(images)
    channels, grids = [f.shape[1] for f in cached], [tuple(f.shape[2:]) for f in cached]
    print(f"levels: channels {channels}, grids {grids}, d_model {D_MODEL}/{2 * D_MODEL}, {LAYERS} layers, "
          f"{HEADS} heads, batch {BATCH}, torch threads {args.threads}", flush=True)

    efficient = RLRModel(channels, grids, d_model=D_MODEL, heads=HEADS, layers=LAYERS).train()
    oracle = RLRReferenceModel(channels, grids, d_model=D_MODEL, heads=HEADS, layers=LAYERS).train()
    oracle.load_state_dict(efficient.state_dict())
    efficient_optimizer = make_optimizer(efficient, LR)
    oracle_optimizer = torch.optim.Adam(oracle.parameters(), lr=LR)

    def oracle_step() -> None:
        oracle_optimizer.zero_grad()
        loss = rlr_loss(oracle, backbone(images), JITTER)
        loss.backward()
        oracle_optimizer.step()

    default = resolve_precision(torch.device("cpu"))
    reference = RLR.Options(jitter=JITTER, recipe="reference")  # the paper's recipe: constant lr, no warm-up
    steps: dict[str, Callable[[], object]] = {
        f"reconray step, default precision = {default} (cached features, efficient attention, fused Adam)": (
            lambda: train_step(efficient, efficient_optimizer, cached, reference)
        ),
        "oracle step (backbone every step, dense masked attention, Adam)": oracle_step,
        "backbone alone (4 images, no grad)": lambda: backbone(images),
        "attention alone, efficient (LCA+MLKA fwd+bwd, all layers/levels)": _attention_step(efficient, False, cached),
        "attention alone, oracle (masks rebuilt, dense, fwd+bwd)": _attention_step(oracle, True, cached),
    }
    if default != "float32":  # the same step without autocast, to separate the two gains
        steps["reconray step, float32"] = lambda: train_step(efficient, efficient_optimizer, cached,
                                                                  reference.model_copy(update={"precision": "float32"}))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for rep in range(args.reps + 1):
        for name, step in steps.items():
            measured = _measure(step)
            if rep:  # rep 0 warms up allocator and kernels
                times[name].append(measured)
        logger.info("rep %d/%d done", rep, args.reps)

    medians = {
        name: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
        for name, runs in times.items()
    }
    print(f"\n| step ({args.reps} interleaved reps, medians) | wall s | CPU s | images/s (wall) | images/s (CPU) |")
    print("|---|---|---|---|---|")
    for name, (wall, cpu) in medians.items():
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {BATCH / wall:.2f} | {BATCH / cpu:.2f} |")
    names = list(steps)
    (fast_wall, fast_cpu), (slow_wall, slow_cpu) = medians[names[0]], medians[names[1]]
    print(f"\nspeed-up of the reconray step over the oracle step: {slow_wall / fast_wall:.2f}x wall, "
          f"{slow_cpu / fast_cpu:.2f}x CPU")
    if len(names) > 5:
        float32_wall, float32_cpu = medians[names[5]]
        print(f"float32 reconray step over the oracle step: {slow_wall / float32_wall:.2f}x wall, "
              f"{slow_cpu / float32_cpu:.2f}x CPU; {default} autocast over float32: "
              f"{float32_wall / fast_wall:.2f}x wall")
    oracle_no_backbone = slow_cpu - medians[names[2]][1]
    print(f"oracle step without its backbone (CPU): {oracle_no_backbone:.2f} s -> model-only speed-up "
          f"{oracle_no_backbone / fast_cpu:.2f}x; attention alone {medians[names[4]][1] / medians[names[3]][1]:.2f}x")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        train_step(efficient, efficient_optimizer, cached, reference)
    print("\nprofile of one reconray step (top operators by self CPU time):")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


if __name__ == "__main__":
    main()
