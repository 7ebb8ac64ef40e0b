"""Distributed fit of bank methods (patchcore, sgfr): condense on the Ray Data workers, build the index on the driver.

Each feature batch is embedded and condensed (`BankMethod.condense`: patchcore's greedy coreset, sgfr's candidate
sampling) where it was computed, so the driver only ever gathers candidate vectors and calls `fit_bank` once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from reconray.methods import create_method
from reconray.methods.base import BankMethod
from reconray.pipelines.console import stage
from reconray.pipelines.fitting import FitContext, register_distributed_fit
from reconray.pipelines.ingest import as_tensor, level_tensors


@register_distributed_fit(BankMethod)
def fit_bank(method: BankMethod, context: FitContext) -> BankMethod:
    """Condenses every feature batch on the workers, then builds the bank or basis from the gathered candidates."""
    condensed = context.features().map_batches(
        _condense_batch,
        fn_kwargs={"method_name": method.name, "options": method.options.model_dump()},
        batch_size=context.resources.batch_size,
        num_cpus=context.resources.decode_cpus,
    )
    candidates, total_vectors = [], 0
    with stage(f"fit {method.name}: features + condense", total=len(context.samples)) as advance:
        for batch in condensed.iter_batches(batch_size=None, batch_format="numpy"):
            candidates.append(as_tensor(batch["vectors"]))
            total_vectors += int(batch["patch_count"].sum())
            advance(int(batch["image_count"].sum()))
    method.fit_bank(torch.cat(candidates), total_vectors=total_vectors)
    return method


def _condense_batch(batch: dict[str, np.ndarray], method_name: str, options: dict[str, Any]) -> dict[str, np.ndarray]:
    """Embeds one feature batch and keeps its candidate vectors, one row per vector.

    `patch_count` and `image_count` tell the driver how many patches and images the batch had before condensing:
    the first row carries them, the other rows 0 (Ray Data columns must all have one value per row, and a batch may
    condense to fewer vectors than it had images).
    """
    torch.set_num_threads(1)
    method = create_method(method_name, **options)
    features = level_tensors(batch)
    vectors = method.embed(features)
    candidates = method.condense(vectors).float().numpy()
    patch_count = np.zeros(len(candidates), dtype=np.int64)
    image_count = np.zeros(len(candidates), dtype=np.int64)
    patch_count[0], image_count[0] = len(vectors), len(features[0])
    return {"vectors": candidates, "patch_count": patch_count, "image_count": image_count}
