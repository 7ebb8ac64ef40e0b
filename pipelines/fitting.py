"""How a method is fitted at scale: what every distributed fit is given, and the registry that picks one per method.

`reconray.methods` stays free of Ray: a method knows how to fit in one process. The Ray way to fit it is a hook
registered here for its class (or a base class, found through the class's MRO): bank methods condense feature
batches on Ray Data workers (`bank_fit`), RLR trains on Ray Train (`train_rlr`). `fit.py` and `run.py` only call
`distributed_fit`, so adding a method touches its own files and the import list at the bottom of this module.

Example:
    >>> @register_distributed_fit(MyMethod)
    ... def fit_my_method(method: MyMethod, context: FitContext) -> MyMethod:
    ...     method.fit(batch for batch in context.features().iter_batches(...))
    ...     return method
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import ray
import torch

from reconray.methods.artifact import ModelSpec
from reconray.methods.base import AnomalyMethod
from reconray.methods.errors import OptionError
from reconray.pipelines.datasets import Sample
from reconray.pipelines.ingest import BatchMap, Resources, feature_dataset, level_columns
from reconray.pipelines.storage import as_location, is_uri, modified_time

logger = logging.getLogger(__name__)


def cache_columns(spec: ModelSpec) -> list[str]:
    """What a feature cache keeps per image: the level features, the category (balanced sampling), the image path
    (a fit of fewer images reads its rows from a cache of more) and where the image lies on the canvas."""
    return [*level_columns(len(spec.levels)), "category", "image", "content"]

COMPLETE_MARKER = "COMPLETE"


def _in_one_thread(batch: dict[str, np.ndarray], then: BatchMap) -> dict[str, np.ndarray]:
    """`then` in a task that holds less than a core: one torch thread, so tasks never oversubscribe the node."""
    torch.set_num_threads(1)
    return then(batch)


class TrainConfig(pydantic.BaseModel):
    """How a trained method is scheduled on Ray Train: not part of the model, so not stored in the artifact.

    Attributes:
        num_workers: data-parallel workers (DDP).
        cpus_per_worker: CPUs each worker reserves; torch runs that many threads (at least one). None: a single
            worker takes every CPU of the largest node (a laptop trains on all its cores), several take one each.
        use_gpu: a GPU per worker when the cluster has GPUs (CPU otherwise).
        max_failures: worker failures a run recovers from by restarting from its last checkpoint.
        checkpoint_every: epochs between checkpoints (the last epoch is always checkpointed).
        validate_every: epochs between scorings of the validation split, when the fit has one (and after the last).
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    num_workers: int = pydantic.Field(1, ge=1)
    cpus_per_worker: float | None = pydantic.Field(None, gt=0.0)
    use_gpu: bool = True
    max_failures: int = pydantic.Field(3, ge=0)
    checkpoint_every: int = pydantic.Field(10, ge=1)
    validate_every: int = pydantic.Field(1, ge=1)


def worker_cpus(training: TrainConfig) -> float:
    """The CPUs each training worker reserves: the explicit setting, else see `TrainConfig.cpus_per_worker`."""
    if training.cpus_per_worker is not None:
        return training.cpus_per_worker
    if training.num_workers > 1:
        return 1.0
    return max([node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]] or [1.0])


def work_dir_for(out_dir: str | Path) -> Any:
    """Default work directory of a fit: beside the artifact, never inside it, so shipping a model ships no cache.

    For an artifact written to a URI it is the URI `<out>-work`: the feature cache and Ray Train's checkpoints are
    written by workers on every node, so they must live where every node reaches.
    """
    if is_uri(out_dir):
        return as_location(f"{str(out_dir).rstrip('/')}-work")
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}-work"


@dataclasses.dataclass
class FitContext:
    """Everything a distributed fit needs besides the method itself.

    Attributes:
        samples: the normal training images to fit on (the calibration hold-out already removed).
        spec: how images become features.
        resources: actor pool and batch sizes for Ray Data.
        work_dir: training byproducts (feature cache, Ray Train checkpoints), beside the artifact; a `Path`, or a
            `UPath` for object storage (`storage.as_location`).
        training: Ray Train scheduling, for methods that train.
        feature_cache: a feature cache folder shared by several fits of the same images (None: `work_dir/cache`
            when a method needs a cache, and streamed features otherwise).
        validation: the painted validation split, for a method that chooses its training state on one
            (`AnomalyMethod.selects_on_validation`); empty otherwise.
        calibration: the held-out normal images the threshold is calibrated on. A hook may score them in its own
            feature pass (bank methods do: one pass of the backbone for the whole fit) and put their image scores,
            in this order, in `calibration_scores`; `fit_model` scores them with the saved artifact otherwise.
    """

    samples: list[Sample]
    spec: ModelSpec
    resources: Resources
    work_dir: Any
    training: TrainConfig = TrainConfig()
    feature_cache: Path | None = None
    validation: list[Sample] = dataclasses.field(default_factory=list)
    calibration: list[Sample] = dataclasses.field(default_factory=list)
    calibration_scores: np.ndarray | None = None
    stage_s: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds of the hook's own stages, by name, for the fit record (`FitRecord.stages`)."""

    def features(self, then: BatchMap | None = None) -> ray.data.Dataset:
        """Backbone features of the samples: from the shared cache when there is one, else streamed once.

        `then` maps each feature batch where it is computed: inside the backbone actor when streamed
        (`ingest.feature_dataset`), else in one-thread tasks over the cached rows.
        """
        if self.feature_cache is None:
            return feature_dataset(self.samples, self.spec, self.resources, then=then)
        rows = self.cached_features()
        if then is None:
            return rows
        return rows.map_batches(_in_one_thread, fn_kwargs={"then": then}, batch_size=self.resources.batch_size,
                                num_cpus=self.resources.decode_cpus)

    def cached_features(self) -> ray.data.Dataset:
        """Backbone features of the samples, extracted once into Parquet shards keyed by `feature_key`.

        Training methods read these every epoch instead of re-running the frozen backbone; a different backbone,
        level set, image size or file list gets a new key and so a fresh extraction, unless a complete cache in the
        same folder holds every one of the samples with the same spec: then its rows of these images are read (an
        rlr fit, which holds a validation split out, reads the cache a bank fit of all the images wrote).
        """
        cache_root = (self.feature_cache or self.work_dir / "cache").resolve()
        cache_dir = cache_root / self.feature_key()
        complete = cache_dir / COMPLETE_MARKER
        if complete.exists():
            logger.info("reusing cached features of %d images (%s)", len(self.samples), cache_dir)
            return ray.data.read_parquet(str(cache_dir), file_extensions=["parquet"])
        superset = self._superset_cache(cache_root)
        if superset is not None:
            logger.info("reusing cached features of %d images from a cache of more images (%s)", len(self.samples),
                        superset)
            images = sorted(sample.image for sample in self.samples)
            return ray.data.read_parquet(str(superset), file_extensions=["parquet"]).map_batches(
                _rows_of_images, fn_kwargs={"images": images}, batch_format="numpy")
        logger.info("extracting features of %d images into the cache %s", len(self.samples), cache_dir)
        features = feature_dataset(self.samples, self.spec, self.resources)
        features.select_columns(cache_columns(self.spec)).write_parquet(str(cache_dir))
        complete.write_text(self._key_source())
        return ray.data.read_parquet(str(cache_dir), file_extensions=["parquet"])

    def _superset_cache(self, cache_root: Path) -> Path | None:
        """A complete cache under `cache_root` with this spec and columns whose images (and their modification
        times) include every one of the samples; None if there is none."""
        wanted = json.loads(self._key_source())
        needed = {tuple(image) for image in wanted["images"]}
        for marker in sorted(cache_root.glob(f"*/{COMPLETE_MARKER}")):
            try:
                source = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if (source.get("spec"), source.get("columns")) == (wanted["spec"], wanted["columns"]) and needed <= {
                    tuple(image) for image in source.get("images", [])}:
                return marker.parent
        return None

    def feature_key(self) -> str:
        """Identity of the features: the spec and every training file with its modification time."""
        return hashlib.sha256(self._key_source().encode()).hexdigest()[:16]

    def _key_source(self) -> str:
        return json.dumps({
            "spec": dataclasses.asdict(self.spec),
            "columns": cache_columns(self.spec),
            "images": sorted((sample.image, modified_time(sample.image)) for sample in self.samples),
        })


def _rows_of_images(batch: dict[str, Any], images: list[str]) -> dict[str, Any]:
    """The rows of the batch whose `image` is one of `images` (sorted)."""
    keep = np.isin(batch["image"].astype(str), images)
    return {key: value[keep] for key, value in batch.items()}


DistributedFit = Callable[[Any, FitContext], AnomalyMethod]
_DISTRIBUTED_FITS: dict[type[AnomalyMethod], DistributedFit] = {}


def register_distributed_fit(method_class: type[AnomalyMethod]) -> Callable[[DistributedFit], DistributedFit]:
    """Decorator: `fit(method, context) -> fitted method` is how instances of `method_class` are fitted on Ray."""

    def decorator(fit: DistributedFit) -> DistributedFit:
        if method_class in _DISTRIBUTED_FITS:
            raise ValueError(f"{method_class.__name__} has two distributed fits registered")
        _DISTRIBUTED_FITS[method_class] = fit
        return fit

    return decorator


def distributed_fit(method: AnomalyMethod, context: FitContext) -> AnomalyMethod:
    """Fits `method` with the hook registered for its class or its closest registered base class."""
    for cls in type(method).__mro__:
        if cls in _DISTRIBUTED_FITS:
            return _DISTRIBUTED_FITS[cls](method, context)
    raise OptionError(f"method {method.name!r} has no distributed fit registered (see reconray.pipelines.fitting)")


# Importing the hook modules fills the registry, as importing reconray.methods fills the method registry.
from reconray.pipelines import bank_fit as _bank_fit  # noqa: E402,F401  isort: skip
from reconray.pipelines import train_rlr as _train_rlr  # noqa: E402,F401  isort: skip
