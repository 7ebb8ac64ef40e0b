"""Extended models (`fit --add-to`): parts per fit, scores routed by category, old categories bit-for-bit unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reconray.methods import create_method
from reconray.methods.artifact import ModelSpec, load_artifact, save_artifact
from reconray.methods.errors import OptionError
from reconray.methods.extended import ExtendedBank, Part


def _features(seed: int, shift: float, count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(count, 6, 4, 4, generator=generator) + shift, torch.randn(count, 5, 2, 2, generator=generator)]


@pytest.fixture(params=["patchcore", "sgfr"])
def parts(request: pytest.FixtureRequest) -> tuple[object, object]:
    """One model per product line, fitted on features far apart: a plain model of `old` and one of `new`."""
    old, new = create_method(request.param), create_method(request.param)
    old.fit([_features(0, 0.0, 8)])
    new.fit([_features(1, 6.0, 8)])
    return old, new


def test_known_categories_are_scored_by_their_own_part(parts) -> None:
    old, new = parts
    extended = ExtendedBank.extending(old, ["old"], new, ["new"])
    old_images, new_images = _features(2, 0.0), _features(3, 6.0)
    assert torch.equal(extended.score_categories(old_images, ["old"] * 3), old.score(old_images))
    assert torch.equal(extended.score_categories(new_images, ["new"] * 3), new.score(new_images))
    mixed = [torch.cat([a, b]) for a, b in zip(old_images, new_images, strict=True)]
    routed = extended.score_categories(mixed, ["old"] * 3 + ["new"] * 3)
    torch.testing.assert_close(routed, torch.cat([old.score(old_images), new.score(new_images)]))
    # no category (or one no part has): the lowest score of every part, per patch
    lowest = torch.minimum(old.score(mixed), new.score(mixed))
    torch.testing.assert_close(extended.score(mixed), lowest)
    torch.testing.assert_close(extended.score_categories(mixed, [None] * 3 + ["other"] * 3), lowest)


def test_an_extended_model_round_trips_through_the_artifact(parts, tmp_path: Path) -> None:
    old, new = parts
    third = create_method(old.name)
    third.fit([_features(4, -6.0, 8)])
    extended = ExtendedBank.extending(ExtendedBank.extending(old, ["a"], new, ["b"]), ["a", "b"], third, ["c"])
    spec = ModelSpec("tf_efficientnet_lite0", [2, 3], 64, [0.5] * 3, [0.5] * 3)
    save_artifact(tmp_path, extended, spec, threshold=1.0, categories=["a", "b", "c"])
    loaded = load_artifact(tmp_path)
    assert isinstance(loaded.method, ExtendedBank) and loaded.config.method == old.name
    assert [part.categories for part in loaded.method.parts] == [["a"], ["b"], ["c"]]
    images = _features(5, 0.0)
    for category in ("a", "b", "c"):
        assert torch.equal(loaded.method.score_categories(images, [category] * 3),
                           extended.score_categories(images, [category] * 3))
    assert loaded.method.bank_stats() == extended.bank_stats()
    assert loaded.config.bank_vectors == sum(part.method.bank_stats()[0] for part in extended.parts)


def test_what_cannot_be_extended_is_refused(parts) -> None:
    old, new = parts
    with pytest.raises(OptionError, match="--add-to extends a bank-method model .* this model is rlr"):
        ExtendedBank.extending(create_method("rlr"), ["a"], new, ["b"])
    other = create_method("sgfr" if old.name == "patchcore" else "patchcore")
    with pytest.raises(OptionError, match=f"a {old.name} model is extended with {old.name}, not {other.name}"):
        ExtendedBank.extending(old, ["a"], other, ["b"])
    with pytest.raises(OptionError, match="category 'a' is in parts 0 and 1"):
        ExtendedBank([Part(["a"], old), Part(["a", "b"], new)])
    with pytest.raises(OptionError, match="extended with `--add-to`, not refitted"):
        ExtendedBank.extending(old, ["a"], new, ["b"]).fit([])
