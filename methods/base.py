"""One interface for every anomaly-detection method, and the registry that maps names to implementations.

Modelled on timm's registry: a method is one class in one file, decorated with `@register_method`, and everything
else (CLI, Ray pipelines, artifact, serving) reaches it through `create_method(name, **options)`.

A method sees *features*, never images: a list with one tensor per backbone level, each `(B, C_l, H_l, W_l)`,
already locally averaged (see `methods.backbone`). It returns patch-level anomaly scores `(B, h, w)`; upsampling,
smoothing and the image score live in `methods.scoring`, so every method and every entry point post-processes alike.

Example:
    >>> method = create_method("patchcore", coreset_ratio=0.1)   # options validated here (OptionError)
    >>> method.fit(feature_batches)            # iterable of list[Tensor]
    >>> patch_scores = method.score(features)  # (B, h, w)
    >>> restored = type(method).from_state(method.state())
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import faiss
import pydantic
import torch

from reconray.methods.errors import DatasetError, OptionError

METHODS: dict[str, type[AnomalyMethod]] = {}
_CANONICAL_CHUNK = 65536  # rows cast to float64 at a time by `canonical_order`


class MethodOptions(pydantic.BaseModel):
    """Typed, validated options of one method: each subclass declares its fields with defaults and ranges.

    Values given as text (`--set key=value`) are converted to the field's type ("16" -> 16, "true" -> True), and a
    value out of range or of the wrong kind is refused when the method is built, before any feature is extracted.
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


@dataclasses.dataclass
class MethodState:
    """Everything needed to rebuild a fitted method, in pickle-free parts.

    Attributes:
        options: JSON-serialisable options the method was built with (after defaults were applied).
        tensors: named tensors, saved with safetensors.
        indexes: named FAISS indexes, saved with `faiss.write_index`.
        info: JSON-serialisable facts about the fit (basis sampling, training curve, ...), stored in config.json.
    """

    options: dict[str, Any]
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    indexes: dict[str, faiss.Index] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class AnomalyMethod(ABC):
    """A method that learns nominal features and scores patches by how far they are from nominal.

    Subclasses declare `name` and `Options` (a `MethodOptions` model); `self.options` is the validated instance.
    """

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]]

    def __init__(self, **options: Any) -> None:
        self.options = parse_options(self.name, self.Options, options)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every accepted option with its default value."""
        return cls.Options().model_dump()

    @property
    def selects_on_validation(self) -> bool:
        """Whether fitting holds out a validation split to choose among training states (RLR's checkpoints)."""
        return False

    @abstractmethod
    def fit(self, feature_batches: Iterable[list[torch.Tensor]]) -> None:
        """Learns nominal features from batches of per-level features of normal images, in this process."""

    @abstractmethod
    def score(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Returns patch-level anomaly scores `(B, h, w)` on the finest level's grid (higher = more anomalous)."""

    def score_categories(self, features: list[torch.Tensor], categories: Sequence[str | None]) -> torch.Tensor:
        """`score` for images whose categories are known (None where not); a model fitted over all its categories at
        once scores every image alike, and only an extended model (`methods.extended`) routes by category."""
        return self.score(features)

    @abstractmethod
    def state(self) -> MethodState:
        """Returns the fitted state (options, tensors, FAISS indexes)."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: MethodState) -> AnomalyMethod:
        """Rebuilds a fitted method from `state()`."""

    def to(self, device: torch.device | str) -> AnomalyMethod:
        """Moves the method's tensors to `device`; methods with device state override it."""
        return self

    def bank_stats(self) -> tuple[int | None, int | None]:
        """Returns `(vectors, bytes)` of the memory bank or basis, or `(None, None)` for methods without one."""
        return None, None


def register_method(cls: type[AnomalyMethod]) -> type[AnomalyMethod]:
    """Class decorator that adds a method to `METHODS` under its `name`."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice ({METHODS[cls.name]} and {cls})")
    METHODS[cls.name] = cls
    return cls


def create_method(name: str, **options: Any) -> AnomalyMethod:
    """Builds the registered method `name` with `options` (text values are converted to each option's type)."""
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](**options)


def parse_options(method: str, options_class: type[MethodOptions], options: dict[str, Any]) -> MethodOptions:
    """Validates `options` against `options_class`; the error names the method, the key and the value."""
    accepted = sorted(options_class.model_fields)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OptionError(f"unknown option(s) {unknown} for method {method!r}; accepted: {accepted}")
    try:
        return options_class(**options)
    except pydantic.ValidationError as error:
        raise OptionError("; ".join(_option_problem(method, item) for item in error.errors())) from None


def _option_problem(method: str, item: Any) -> str:
    """One pydantic error as `method.key=value: what is accepted` (or `method: problem` for cross-field checks)."""
    message = item["msg"].removeprefix("Value error, ")
    if not item["loc"]:
        return f"invalid {method} options: {message}"
    key = ".".join(str(part) for part in item["loc"])
    return f"invalid option {method}.{key}={item.get('input')!r}: {message}"


class BankMethod(AnomalyMethod):
    """A method whose model is a set of nominal patch vectors (a memory bank or a basis) searched with FAISS.

    Fitting is split so that it distributes: `condense` runs where the features are computed (on any worker) and
    shrinks one image's patch vectors to the candidates worth keeping; the driver then gathers only those candidates
    and calls `fit_bank` once, which orders them by value (`canonical_order`). `fit` chains the two for in-process
    use. Condensing image by image makes the bank a function of the training images alone, not of how a run batched
    them or in which order they arrived: another batch size or worker count, or a Ray Data task retried after a
    lost node, fits the same model.
    """

    def embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Returns the patch vectors `(B*h*w, D)` of per-level features, all levels on the finest grid."""
        from reconray.methods.backbone import patch_vectors

        return patch_vectors(features)

    def condense(self, vectors: torch.Tensor) -> torch.Tensor:
        """Returns the candidate vectors of one image worth gathering; by default all of them."""
        return vectors

    def condense_each(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """`condense` of each image's vectors. A method may share work across the images (one batched solve), but
        each image's candidates must be what `condense` keeps of it alone."""
        return [self.condense(vectors) for vectors in images]

    def condense_images(self, features: list[torch.Tensor],
                        patch_masks: torch.Tensor | None = None) -> tuple[list[torch.Tensor], int]:
        """Embeds one feature batch and condenses each image's patch vectors on its own; `patch_masks` `(B, h, w)`
        keep each image's own region of a padded canvas (`methods.scoring.content_mask`). Returns the candidates of
        each image and how many patch vectors they were condensed from."""
        batch, _, height, width = features[0].shape
        vectors = self.embed(features)
        per_image = vectors.reshape(batch, height * width, vectors.shape[-1])
        if patch_masks is not None:
            masks = patch_masks.reshape(batch, -1).to(per_image.device)
            images = [image[mask] for image, mask in zip(per_image, masks, strict=True)]
        else:
            images = list(per_image)
        return self.condense_each(images), sum(len(image) for image in images)

    def score(self, features: list[torch.Tensor]) -> torch.Tensor:
        batch, _, height, width = features[0].shape
        return self.score_vectors(self.embed(features)).reshape(batch, height, width).to(features[0].device)

    @abstractmethod
    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Anomaly scores `(N,)` of patch vectors `(N, D)` (`embed`'s output): `score` without the reshaping, so
        vectors embedded elsewhere (a fit's calibration images, on the workers) are scored alike."""

    @abstractmethod
    def fit_bank(self, vectors: torch.Tensor, total_vectors: int | None = None) -> None:
        """Builds the bank / basis and its index from the gathered candidate vectors `(N, D)`, in any order (put them
        in `canonical_order` first: the model must not depend on the order workers delivered them in).

        `total_vectors` is how many patch vectors there were before `condense` (None: as many as `vectors`), so that
        size ratios refer to the whole training set wherever the candidates were condensed.
        """

    def fit(self, feature_batches: Iterable[list[torch.Tensor]],
            patch_masks: Iterable[torch.Tensor] | None = None) -> None:
        """`AnomalyMethod.fit`; `patch_masks` (one `(B, h, w)` bool per batch) keep only the patches of each image's
        own region of a padded canvas (`methods.scoring.content_mask`)."""
        candidates, total_vectors = [], 0
        masks = None if patch_masks is None else iter(patch_masks)
        for features in feature_batches:
            images, count = self.condense_images(features, None if masks is None else next(masks))
            candidates.extend(images)
            total_vectors += count
        if not candidates:
            raise DatasetError(f"{self.name}: no training features to fit on (empty training split?)")
        self.fit_bank(take_all(candidates), total_vectors=total_vectors)


def take_all(parts: list[torch.Tensor]) -> torch.Tensor:
    """`parts` joined into one tensor, the list emptied: a fit holds the gathered candidates once, and a `fit_bank`
    that copies them (into value order, into an index) can drop them (driver memory, RESULTS "Fit scale")."""
    joined = torch.cat(parts)
    parts.clear()
    return joined


def canonical_order(vectors: torch.Tensor) -> torch.Tensor:
    """A permutation of `vectors` `(N, D)` that depends on their values only: ascending along a fixed random
    direction, so a set of candidates gathered in any order is fitted alike (random draws index into it)."""
    direction = torch.randn(vectors.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direction = direction.to(vectors.device)
    keys = torch.cat([chunk.double() @ direction for chunk in vectors.split(_CANONICAL_CHUNK)])
    return torch.argsort(keys, stable=True)
