"""A bank-method model extended with new categories without refitting the old ones (`reconray fit --add-to`).

Each fit that went into the model is kept as one *part*: the bank (or basis) and index of its categories, untouched.
An image of a known category is scored by the part fitted on that category alone, so adding a product line leaves
every existing category's scores exactly as they were (the same tensors, index and arithmetic). An image whose
category is not given is scored by every part and gets the lowest score per patch: normal if any product line
explains it, which for patchcore's exact search is the nearest neighbour over the union of the banks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from reconray.methods.base import AnomalyMethod, BankMethod, MethodState
from reconray.methods.errors import OptionError


@dataclasses.dataclass
class Part:
    """One fit of the model: the categories it saw and the fitted bank method."""

    categories: list[str]
    method: BankMethod


class ExtendedBank(AnomalyMethod):
    """Parts of one bank method, each fitted on its own categories; scores route by category.

    Its `name` and `options` are the first part's, so the artifact, report and serve info read as that method.
    """

    def __init__(self, parts: Sequence[Part]) -> None:  # no options of its own: the parts carry them
        if len(parts) < 2 or len({type(part.method) for part in parts}) != 1:
            raise ValueError(f"an extended model needs two or more parts of one method, got {len(parts)}")
        seen: dict[str, int] = {}
        for number, part in enumerate(parts):
            for category in part.categories:
                if category in seen:
                    raise OptionError(f"category {category!r} is in parts {seen[category]} and {number}")
                seen[category] = number
        self.parts = list(parts)
        self.name = parts[0].method.name
        self.Options = type(parts[0].method.options)
        self.options = parts[0].method.options
        self._part_of = seen

    @classmethod
    def extending(cls, method: AnomalyMethod, categories: Sequence[str], new: BankMethod,
                  new_categories: Sequence[str]) -> ExtendedBank:
        """`method` (plain or already extended, fitted on `categories`) with `new` added for `new_categories`."""
        check_extensible(method)
        if type(new) is not type(_first(method)):
            raise OptionError(f"a {method.name} model is extended with {method.name}, not {new.name}")
        parts = method.parts if isinstance(method, ExtendedBank) else [Part(list(categories), method)]
        return cls([*parts, Part(list(new_categories), new)])

    def fit(self, feature_batches: Iterable[list[torch.Tensor]]) -> None:
        raise OptionError("an extended model is extended with `--add-to`, not refitted: fit a new model instead")

    def score(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Images of unknown category: every part scores them, the lowest score per patch wins."""
        return torch.stack([part.method.score(features) for part in self.parts]).amin(dim=0)

    def score_categories(self, features: list[torch.Tensor], categories: Sequence[str | None]) -> torch.Tensor:
        """Each image scored by the part of its category (`score` for a category no part has or None); a batch
        of one part's images is scored by that part as a whole, exactly as the model it came from would."""
        routes = [self._part_of.get(category) if category else None for category in categories]
        if routes and routes[0] is not None and routes.count(routes[0]) == len(routes):
            return self.parts[routes[0]].method.score(features)
        scores: torch.Tensor | None = None
        for route in dict.fromkeys(routes):
            rows = [row for row, other in enumerate(routes) if other == route]
            subset = [level[rows] for level in features]
            part_scores = self.score(subset) if route is None else self.parts[route].method.score(subset)
            if scores is None:
                scores = part_scores.new_empty((len(routes), *part_scores.shape[1:]))
            scores[rows] = part_scores
        return scores

    def state(self) -> MethodState:
        states = [part.method.state() for part in self.parts]
        numbered = list(enumerate(states))
        return MethodState(
            options=states[0].options,
            tensors={f"part{n}.{name}": tensor for n, state in numbered for name, tensor in state.tensors.items()},
            indexes={f"part{n}.{name}": index for n, state in numbered for name, index in state.indexes.items()},
            info={"parts": [{"categories": part.categories, "options": state.options, "info": state.info}
                            for part, state in zip(self.parts, states, strict=True)]},
        )

    @classmethod
    def from_state(cls, state: MethodState, method_class: type[BankMethod]) -> ExtendedBank:  # type: ignore[override]
        """The parts are instances of `method_class`; the artifact's config names it."""
        parts = []
        for number, part in enumerate(state.info["parts"]):
            prefix = f"part{number}."
            parts.append(Part(part["categories"], method_class.from_state(MethodState(
                options=part["options"],
                tensors={name.removeprefix(prefix): t for name, t in state.tensors.items() if name.startswith(prefix)},
                indexes={name.removeprefix(prefix): i for name, i in state.indexes.items() if name.startswith(prefix)},
                info=part["info"],
            ))))
        return cls(parts)

    def to(self, device: torch.device | str) -> ExtendedBank:
        for part in self.parts:
            part.method.to(device)
        return self

    def bank_stats(self) -> tuple[int | None, int | None]:
        stats = [part.method.bank_stats() for part in self.parts]
        return sum(vectors or 0 for vectors, _ in stats), sum(size or 0 for _, size in stats)


def check_extensible(method: AnomalyMethod) -> None:
    """Refuses, before any fit, to extend a model that is not made of bank-method parts."""
    if not isinstance(method, BankMethod | ExtendedBank):
        raise OptionError(f"--add-to extends a bank-method model (patchcore, sgfr); this model is {method.name}, "
                          "trained over all its categories at once: refit it on every category instead")


def _first(method: AnomalyMethod) -> AnomalyMethod:
    return method.parts[0].method if isinstance(method, ExtendedBank) else method


def is_extended(info: dict[str, Any]) -> bool:
    """Whether an artifact's `method_info` is that of an extended model."""
    return "parts" in info
