"""Ray Data ingest: sample rows → decoded, resized, normalized images → backbone features or scores, streamed.

Two operators per pipeline, read like Ray's batch-inference examples: stateless decode tasks, then an actor pool
(`compute=ActorPoolStrategy(...)`) in which each actor holds one backbone (on a GPU when the cluster has one) or one
loaded artifact. The driver only ever iterates over the results (features, candidate vectors or scores), never the
raw image set.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from ray.data import ActorPoolStrategy

from reconray.methods.artifact import ModelSpec, load_artifact, read_config
from reconray.methods.device import pick_device
from reconray.methods.errors import DatasetError
from reconray.pipelines.console import stage
from reconray.pipelines.datasets import Sample, decode_rgb, load_mask
from reconray.pipelines.storage import local_model

LEVEL_COLUMN = "level_{}"
"""Feature rows hold one column per backbone level, finest first: `level_0`, `level_1`, ... each `(C, h, w)` float32."""
SAMPLE_COLUMNS = ("image", "category", "split", "label", "defect", "mask")
BatchMap = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
"""A function of one numpy batch, as `map_batches` takes it."""
_ACTOR_START_TIMEOUT_S = 600
"""How long a pipeline waits for its initial actors to be placed: long enough for an autoscaler to add a node."""


@dataclasses.dataclass(frozen=True)
class Resources:
    """How a pipeline spreads over the cluster: actor count and size, decode task size, batch size."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    decode_cpus: float
    batch_size: int = 16

    @property
    def torch_threads(self) -> int:
        """Intra-op threads for an actor: the CPUs it holds, so actors never oversubscribe their cores."""
        return max(1, round(self.cpus_per_actor))


def plan_resources(batch_size: int = 16) -> Resources:
    """Sizes the actor pool from the cluster's nodes: one actor per GPU, else actors on three quarters of each node's
    CPUs (one per node up to 4 CPUs, 2-CPU actors on bigger nodes). Every actor must fit on one node, so the actor
    size is the smallest node's; two 1-CPU nodes get one 0.75-CPU actor each, never one 1.5-CPU actor no node holds."""
    available = ray.cluster_resources()
    gpus = int(available.get("GPU", 0))
    if gpus:
        return Resources(gpus, 1.0, 1.0, 0.5, batch_size)
    node_cpus = [float(node["Resources"].get("CPU", 0.0)) for node in ray.nodes() if node["Alive"]]
    node_cpus = [cpus for cpus in node_cpus if cpus > 0] or [float(available.get("CPU", 1))]
    size = min(cpus * 0.75 if cpus <= 4 else 2.0 for cpus in node_cpus)
    actors = sum(max(1, int(cpus * 0.75 // size + 1e-9)) for cpus in node_cpus)
    return Resources(actors, size, 0.0, min(0.5, min(node_cpus) * 0.25), batch_size)


def sample_rows(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Sample dataclasses → Ray Data rows (no None: Arrow needs one type per column)."""
    return [{**dataclasses.asdict(sample), "mask": sample.mask or ""} for sample in samples]


def image_dataset(samples: Sequence[Sample], spec: ModelSpec, resources: Resources, masks: bool) -> ray.data.Dataset:
    """Rows of decoded images `(3, S, S)` float32 normalized for the backbone, their `content` size `(2,)` int32 on
    that canvas (`ModelSpec.content_size`), plus `(S, S)` uint8 masks if asked."""
    if not samples:
        raise DatasetError("no images to process")
    return ray.data.from_items(sample_rows(samples)).map_batches(
        _decode_batch,
        fn_kwargs={"spec": spec, "masks": masks},
        batch_size=resources.batch_size,
        num_cpus=resources.decode_cpus,
    )


def feature_dataset(
    samples: Sequence[Sample], spec: ModelSpec, resources: Resources, masks: bool = False,
    then: BatchMap | None = None,
) -> ray.data.Dataset:
    """Rows with backbone features, one column per level (`level_0` finest, each `(C, h, w)` float32), and the
    `(S, S)` uint8 ground-truth masks in `gt_mask` when `masks` is set.

    `then`, if given, maps each feature batch inside the backbone actor, with the actor's threads (a bank fit's
    condensing): one operator and one pool of workers fewer than a separate `map_batches`, and only its output
    leaves the actor."""
    return _through_actor_pool(samples, spec, resources, masks, _FeatureActor,
                               {"spec": spec, "threads": resources.torch_threads, "then": then})


def _through_actor_pool(
    samples: Sequence[Sample], spec: ModelSpec, resources: Resources, masks: bool, actor: type,
    constructor_kwargs: dict[str, Any],
) -> ray.data.Dataset:
    """The decoded `samples` (`image_dataset`) mapped by a pool of `actor`s: as many as the plan allows and the images
    can keep busy (a batch each), started at once so that a job on several nodes runs on all of them (Ray Data
    spreads actors over nodes).

    A pool of several actors is up before any image is decoded. Ray Data starts actors asynchronously by default:
    decode tasks then run first and can hold the CPUs a pending actor needs, and a two-batch fit on two 1-CPU nodes
    ran on one node, the first actor up doing all the work. If the cluster cannot place the actors (other jobs hold
    its CPUs), Ray Data stops the job after `_ACTOR_START_TIMEOUT_S` with "Timed out while starting actors"."""
    images = image_dataset(samples, spec, resources, masks=masks)
    initial = min(resources.actors, max(1, math.ceil(len(samples) / resources.batch_size)))
    if initial > 1:
        images.context.wait_for_min_actors_s = _ACTOR_START_TIMEOUT_S  # the Dataset's own copy of the context
    return images.map_batches(
        actor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=resources.batch_size,
        compute=ActorPoolStrategy(min_size=initial, max_size=resources.actors),
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor,
    )


def feature_batches(
    spec: ModelSpec, sets: dict[str, Sequence[Sample]], resources: Resources, stage_prefix: str
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Backbone features of each named set of images, in one Ray Data pass (one actor pool), as numpy batches with
    the `level_<n>` columns, `category`, `label`, `content` and `gt_mask` (zeros for images without a mask)."""
    home = {sample.image: name for name, samples in sets.items() for sample in samples}
    batches: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in sets}
    with stage(f"{stage_prefix} {', '.join(sets)} images", total=len(home)) as advance:
        rows = feature_dataset([sample for samples in sets.values() for sample in samples], spec, resources, masks=True)
        for batch in rows.iter_batches(batch_size=resources.batch_size, batch_format="numpy"):
            kept = {key: value for key, value in batch.items() if key.startswith("level_") or key in
                    ("category", "label", "gt_mask", "content")}
            names = np.array([home[image] for image in batch["image"]])
            for name in sets:
                if (names == name).any():
                    batches[name].append({key: value[names == name] for key, value in kept.items()})
            advance(len(batch["image"]))
    return batches


def score_dataset(
    model_dir: str, samples: Sequence[Sample], resources: Resources, masks: bool = False, threshold: float | None = None
) -> ray.data.Dataset:
    """Rows with `image_score`, `anomaly_map` `(S, S)` and per-image timings, scored by the artifact's `Scorer`."""
    spec = read_config(local_model(model_dir)).spec
    return _through_actor_pool(samples, spec, resources, masks, _ScoreActor,
                               {"model_dir": str(model_dir), "threads": resources.torch_threads})


def preprocess(rgb: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """`(H, W, 3)` uint8 → `(3, S, S)` float32: bilinear antialiased resize onto the canvas at the spec's content size
    (`ModelSpec.content_size`), the backbone's normalization, zeros (the mean colour) on any padding."""
    image = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float() / 255.0
    size = spec.content_size(*rgb.shape[:2])
    image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return _on_canvas((image.clamp(0.0, 1.0) - mean) / std, spec.image_size)


def preprocess_mask(mask: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """`(H, W)` bool → `(S, S)` uint8 0/1 placed as `preprocess` places its image, resized nearest-neighbour so it
    stays binary."""
    size = spec.content_size(*mask.shape[:2])
    resized = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=size, mode="nearest")[0]
    return (_on_canvas(resized, spec.image_size)[0] > 0.5).numpy().astype(np.uint8)


def _on_canvas(image: torch.Tensor, side: int) -> torch.Tensor:
    """`(C, h, w)` → `(C, side, side)`, the image in the top-left corner and zeros elsewhere."""
    return F.pad(image, (0, side - image.shape[-1], 0, side - image.shape[-2]))


def _decode_batch(batch: dict[str, np.ndarray], spec: ModelSpec, masks: bool) -> dict[str, np.ndarray]:
    torch.set_num_threads(1)
    images, content = [], []
    for path in batch["image"]:
        try:
            rgb = decode_rgb(path)
        except (OSError, ValueError) as error:
            raise DatasetError(f"{path}: cannot decode image ({error})") from error
        images.append(preprocess(rgb, spec).numpy())
        content.append(spec.content_size(*rgb.shape[:2]))
    batch["pixels"] = np.stack(images)
    batch["content"] = np.array(content, dtype=np.int32)
    if masks:
        size = spec.image_size
        batch["gt_mask"] = np.stack(
            [preprocess_mask(load_mask(path), spec) if path else np.zeros((size, size), np.uint8)
             for path in batch["mask"]]
        )
    return batch


class _FeatureActor:
    """Holds one frozen backbone; turns image batches into per-level feature columns, mapped by `then` if given."""

    def __init__(self, spec: ModelSpec, threads: int,
                 then: BatchMap | None = None) -> None:
        torch.set_num_threads(threads)
        self.device = pick_device()
        self.extractor = spec.extractor().to(self.device).eval()
        self.then = then

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            features = self.extractor(as_tensor(batch.pop("pixels")).to(self.device))
        for level, tensor in enumerate(features):
            batch[LEVEL_COLUMN.format(level)] = tensor.float().cpu().numpy()
        return batch if self.then is None else self.then(batch)


class _ScoreActor:
    """Holds one loaded, hash-verified artifact; scores image batches through `methods.scoring.Scorer`."""

    def __init__(self, model_dir: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.scorer = load_artifact(local_model(model_dir)).scorer(pick_device())  # a URI: fetched on this node

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        scored = self.scorer(as_tensor(pixels), [str(category) or None for category in batch["category"]],
                             batch["content"])
        count = len(pixels)
        batch["image_score"] = scored.image_scores.numpy().astype(np.float64)
        batch["anomaly_map"] = scored.anomaly_maps.numpy().astype(np.float32)
        batch["extract_ms"] = np.full(count, 1000.0 * scored.extract_s / count)
        batch["score_ms"] = np.full(count, 1000.0 * scored.score_s / count)
        return batch


def level_columns(count: int) -> list[str]:
    """The feature column names of `count` backbone levels, finest first."""
    return [LEVEL_COLUMN.format(level) for level in range(count)]


def level_count(columns: Iterable[str]) -> int:
    """How many consecutive feature columns (`level_0`, `level_1`, ...) a batch or row has; at least one."""
    names = set(columns)
    count = 0
    while LEVEL_COLUMN.format(count) in names:
        count += 1
    if not count:
        raise ValueError(f"no feature columns ({LEVEL_COLUMN.format(0)}, ...) among {sorted(names)}")
    return count


def level_tensors(batch: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """The per-level feature tensors of a feature batch, finest level first."""
    return [as_tensor(batch[column]) for column in level_columns(level_count(batch))]


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a Ray Data column; read-only (zero-copy) arrays are copied once, since torch needs writable."""
    return torch.from_numpy(np.require(array, requirements=["W", "C"]))
