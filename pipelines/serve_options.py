"""Settings of a Serve deployment, validated: kept apart from `serve.py` so the CLI reads its defaults without
importing Ray Serve."""

import math
import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MAX_BYTES = 20_000_000
"""Largest accepted image upload (20 MB): larger bodies get a 413 before they are read in full."""
DEFAULT_MAX_SIDE = 8000
"""Largest accepted width or height in pixels, checked from the image header before decoding."""
GPU_BATCH_SIZE = 8
"""Default `max_batch_size` of a replica with a GPU; CPU replicas default to 1."""
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A served model's name: one URL path segment."""


def check_model_name(name: str) -> str:
    """`name` if it can be the `{name}` of `/v1/score/{name}`, else a ValueError that says what can."""
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' and '-', at most 64, starting with a "
                         "letter or digit")
    return name


class ServeOptions(BaseModel):
    """Deployment settings: the arguments of `build_app`, of `serve run reconray.pipelines.serve:build_app key=value
    ...` and of a RayService `args:` block. Strings from the command line are converted and range-checked here."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(None, description="artifact directory or URI written by `reconray fit`, or a "
                                  "folder of artifacts (each served under its folder name)")
    models: dict[str, str] | None = Field(None, description="model name → artifact directory or URI, each served at "
                                          "/v1/score/{name}")
    max_models_per_replica: int = Field(3, ge=1, le=1024, description="several models: models a replica keeps "
                                        "loaded (LRU); others load on their first request")
    threshold: float | None = Field(None, description="deployment threshold; default: the artifact's calibrated one")
    min_replicas: int = Field(1, ge=1, le=1024)
    max_replicas: int = Field(2, ge=1, le=1024)
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="autoscaling target per replica; default: one full batch, at least 2 (one being "
                                "scored while the next is decoded)"
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="requests a replica holds at once; default: 32, at least 2 x max_batch_size"
    )
    max_batch_size: int | None = Field(
        None, ge=1, le=256, description=f"images per backbone pass; default: {GPU_BATCH_SIZE} with a GPU per replica, "
                                        "1 on CPU, where batching measured slower (benchmarks/RESULTS.md)"
    )
    upscale_delay_s: float = Field(30.0, ge=0.0, description="load above target this long adds replicas (Serve's "
                                   "default)")
    downscale_delay_s: float = Field(600.0, ge=0.0, description="load below target this long removes replicas "
                                     "(Serve's default)")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0)
    num_cpus: float = Field(1.0, gt=0.0, le=1024.0, description="CPUs per replica, fractional allowed")
    num_gpus: float = Field(0.0, ge=0.0, le=16.0, description="GPUs per replica, fractional allowed")
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1)
    max_side: int = Field(DEFAULT_MAX_SIDE, ge=1, le=65535)

    @property
    def batch_size(self) -> int:
        """The batch size in effect: the one given, else the device default."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        return GPU_BATCH_SIZE if self.num_gpus > 0 else 1

    @model_validator(mode="after")
    def _check(self) -> "ServeOptions":
        if (self.model_dir is None) == (self.models is None):
            raise ValueError("give one of model_dir (an artifact or a folder of them) and models (name → artifact)")
        if self.models is not None and not self.models:
            raise ValueError("models is empty: name at least one artifact")
        for name in self.models or {}:
            check_model_name(name)
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold}")
        return self
