"""Distributed fit of bank methods (patchcore, sgfr): condense on the Ray Data workers, build the index on the driver.

Each image's patch vectors are condensed (`BankMethod.condense`: patchcore's greedy coreset, sgfr's candidate
sampling) where they were computed, so the driver only ever gathers candidate vectors and calls `fit_bank` once; as
each image is condensed on its own and `fit_bank` orders its candidates by value, the model does not depend on how
Ray Data batched the images, nor on a task retried on another node.
Condensing runs inside the backbone actor when the features are streamed (`FitContext.features`' `then`).
Patches of a padded canvas's padding (`ModelSpec.resize = "keep-aspect"`) are dropped before condensing: they are
not part of any image. The threshold's calibration images go through the same pass: their patch vectors come back
whole and are scored once the bank exists (`BankMethod.score_vectors`, then `methods.scoring`'s map and image
score), so a fit runs the backbone once, with one actor pool, instead of a second Ray Data pass that loads the saved
artifact.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import numpy as np
import torch

from reconray.methods import create_method
from reconray.methods.base import BankMethod, take_all
from reconray.methods.errors import DatasetError
from reconray.methods.scoring import anomaly_map, content_mask, image_scores
from reconray.pipelines.console import stage
from reconray.pipelines.fitting import FitContext, register_distributed_fit
from reconray.pipelines.ingest import as_tensor, level_tensors


@register_distributed_fit(BankMethod)
def fit_bank(method: BankMethod, context: FitContext) -> BankMethod:
    """Condenses every image on the workers, then builds the bank or basis from the gathered candidates;
    scores the calibration images' vectors, gathered in the same pass, into `context.calibration_scores`."""
    calibration = {sample.image: number for number, sample in enumerate(context.calibration)}
    everything = dataclasses.replace(context, samples=[*context.samples, *context.calibration])
    condensed = everything.features(then=functools.partial(
        _condense_batch, method_name=method.name, options=method.options.model_dump(), calibration=calibration,
        canvas=context.spec.image_size))
    candidates, total_vectors, held_out = [], 0, []
    started = time.perf_counter()
    with stage(f"fit {method.name}: features + condense", total=len(everything.samples)) as advance:
        for batch in condensed.iter_batches(batch_size=None, batch_format="numpy"):
            kept = batch["calibration"] < 0
            candidates.append(as_tensor(batch["vectors"][kept]))
            total_vectors += int(batch["patch_count"].sum())
            if not kept.all():
                held_out.append({key: value[~kept] for key, value in batch.items()})
            advance(int(batch["image_count"].sum()))
    streamed = time.perf_counter()
    method.fit_bank(take_all(candidates), total_vectors=total_vectors)
    built = time.perf_counter()
    if context.calibration:
        context.calibration_scores = _calibration_scores(method, held_out, len(context.calibration),
                                                         (context.spec.image_size, context.spec.image_size))
    context.stage_s |= {"features_condense": streamed - started, "bank": built - streamed,
                        "calibration_scores": time.perf_counter() - built}
    return method


def _calibration_scores(method: BankMethod, held_out: list[dict[str, np.ndarray]], count: int,
                        image_size: tuple[int, int]) -> np.ndarray:
    """Image scores of the calibration images from their patch vectors (rows of `held_out`, in row-major grid order
    per image), through the scoring path's map and image score."""
    rows = {key: np.concatenate([part[key] for part in held_out]) for key in ("vectors", "calibration", "grid",
                                                                            "content")}
    order = np.argsort(rows["calibration"], kind="stable")  # each image's vectors together, in grid order
    patch_scores = method.score_vectors(as_tensor(rows["vectors"][order]))
    scores = np.full(count, np.nan)
    numbers, starts = np.unique(rows["calibration"][order], return_index=True)
    for number, start in zip(numbers, starts, strict=True):
        height, width = (int(side) for side in rows["grid"][order[start]])
        patches = patch_scores[start:start + height * width].reshape(1, height, width)
        content = rows["content"][order[start]][None]
        scores[number] = float(image_scores(anomaly_map(patches, image_size), content)[0])
    if np.isnan(scores).any():
        raise DatasetError(f"{int(np.isnan(scores).sum())} calibration images were missing from the fit's feature pass")
    return scores


def _condense_batch(
    batch: dict[str, np.ndarray], method_name: str, options: dict[str, Any], calibration: dict[str, int], canvas: int
) -> dict[str, np.ndarray]:
    """Embeds one feature batch and keeps its candidate vectors, one row per vector; the vectors of calibration
    images (numbered in `calibration`) follow whole, marked with their number (-1: a candidate).

    `patch_count` and `image_count` tell the driver how many fit patches and images the batch had before
    condensing: the first row carries them, the other rows 0 (Ray Data columns must all have one value per row, and
    a batch may condense to fewer vectors than it had images). `grid` is each calibration vector's image's patch grid
    and `content` its image's size on the `canvas`-pixel square.
    """
    method = create_method(method_name, **options)
    numbers = np.array([calibration.get(str(image), -1) for image in batch["image"]])
    features = level_tensors(batch)
    fit_rows, held_rows = np.flatnonzero(numbers < 0), np.flatnonzero(numbers >= 0)
    parts, marks, fit_vectors = [], [], 0
    grid = np.asarray(features[0].shape[-2:])
    if len(fit_rows):
        images, fit_vectors = method.condense_images([level[fit_rows] for level in features],
                                                     content_mask(batch["content"][fit_rows], grid, canvas))
        parts.append(torch.cat(images).float().numpy())
        marks.append(np.full(len(parts[-1]), -1))
    per_image = int(grid.prod())
    if len(held_rows):
        parts.append(method.embed([level[held_rows] for level in features]).float().numpy())
        marks.append(np.repeat(numbers[held_rows], per_image))
    marked = np.concatenate(marks)
    patch_count, image_count = np.zeros(len(marked), dtype=np.int64), np.zeros(len(marked), dtype=np.int64)
    patch_count[0] = fit_vectors
    image_count[0] = len(numbers)
    content = np.zeros((len(marked), 2), dtype=np.int32)
    if len(held_rows):
        content[len(marked) - len(held_rows) * per_image:] = np.repeat(batch["content"][held_rows], per_image, axis=0)
    return {"vectors": np.concatenate(parts), "calibration": marked, "grid": np.tile(grid, (len(marked), 1)),
            "content": content, "patch_count": patch_count, "image_count": image_count}
