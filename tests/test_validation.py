"""Validation split: disjoint stable carving that matches the threshold hold-out, exact painted masks, every kind."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from reconray.methods.errors import DatasetError, OptionError
from reconray.pipelines.datasets import Sample, decode_rgb, load_mask, validate
from reconray.pipelines.synthetic import SyntheticConfig, render_sample
from reconray.pipelines.validation import (
    AREA_FRACTION,
    CHANGE_TOLERANCE,
    DEFECT_SHARES,
    MANIFEST,
    MAX_CALIBRATION_IMAGES,
    calibration_split,
    carve,
    paint_validation_set,
)


def _write_texture(path: Path, height: int, width: int, seed: int, grey: bool = False) -> Path:
    """A smooth lit texture with grain and a flat dark band (where a colour change on black changes nothing)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 120 + 60 * np.sin(cols / rng.uniform(5, 15) + rng.uniform(0, 6)) * np.cos(rows / rng.uniform(8, 30))
    image = base[..., None] * rng.uniform(0.7, 1.1, 3) + rng.normal(0, 6, (height, width, 3))
    image[: height // 5] = 0
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert("L" if grey else "RGB").save(path)
    return path


def _textures(root: Path, category: str, count: int, height: int = 48, width: int = 40, suffix: str = ".png",
              grey: bool = False) -> list[Sample]:
    return [Sample(str(_write_texture(root / category / f"{index:03d}{suffix}", height, width, index, grey)),
                   category, "train", 0) for index in range(count)]


def _synthetic(root: Path, category: str, count: int, size: int) -> list[Sample]:
    config = SyntheticConfig(image_size=size)
    samples = []
    for index in range(count):
        path = root / category / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_sample(category, "train", "good", index, config).image).save(path)
        samples.append(Sample(str(path), category, "train", 0))
    return samples


def _files(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    root = tmp_path_factory.mktemp("train")
    return _textures(root, "grid", 50, 8, 8) + _textures(root, "tile", 12, 8, 8)


def test_carve_is_disjoint_complete_and_independent_of_input_order(two_categories: list[Sample]) -> None:
    carving = carve(two_categories)
    shuffled = list(reversed(two_categories))
    random.Random(3).shuffle(shuffled)
    assert carve(shuffled) == carving
    parts = [set(carving.fit), set(carving.calibration), set(carving.validation)]
    assert sum(map(len, parts)) == len(set.union(*parts)) == len(two_categories)
    assert set.union(*parts) == set(two_categories)
    for category in ("grid", "tile"):
        assert all(any(sample.category == category for sample in part) for part in parts)


def test_calibration_is_what_fit_holds_out_for_the_threshold(two_categories: list[Sample]) -> None:
    assert set(carve(two_categories).calibration) == set(calibration_split(two_categories)[1])


def test_calibration_holds_out_a_tenth_up_to_a_cap_and_fits_the_rest() -> None:
    """A large category's threshold needs no more held-out images than a 0.99 quantile can use; the rest are fitted."""
    samples = [Sample(f"/parts/{category}/{index:05d}.png", category, "train", 0)
               for category, count in (("large", 4000), ("small", 30)) for index in range(count)]
    fit, held_out = calibration_split(samples)
    assert Counter(sample.category for sample in held_out) == {"large": MAX_CALIBRATION_IMAGES, "small": 3}
    assert len(fit) + len(held_out) == len(samples) and not set(fit) & set(held_out)


@pytest.mark.parametrize(("ratio", "expected"), [(0.2, {"grid": 10, "tile": 2}), (0.3, {"grid": 15, "tile": 4})])
def test_validation_slice_has_the_requested_share(two_categories: list[Sample], ratio: float,
                                                   expected: dict[str, int]) -> None:
    assert Counter(sample.category for sample in carve(two_categories, ratio).validation) == expected


def test_validation_spreads_over_folders_when_file_names_repeat(tmp_path: Path) -> None:
    """KolektorSDD layout: kos01/Part0.jpg, kos02/Part0.jpg, ...; the name alone would take one part position."""
    samples = [Sample(str(_write_texture(tmp_path / f"kos{folder:02d}" / f"Part{part}.jpg", 8, 8, part)), "ksdd",
                      "train", 0) for folder in range(1, 21) for part in range(4)]
    carving = carve(samples)
    assert carve(samples[::-1]) == carving
    assert set(carving.calibration) == set(calibration_split(samples)[1])
    assert len(carving.validation) == 16
    names = Counter(Path(sample.image).name for sample in carving.validation)
    assert len(names) == 4 and max(names.values()) <= 8, names  # by name: 12 of one part position (20 minus 8)


def test_a_category_too_small_is_refused_by_name(tmp_path: Path) -> None:
    carve(_textures(tmp_path, "smallest", 4, 8, 8))  # one fit, one calibration, two validation images
    with pytest.raises(DatasetError, match="'tiny'"):
        carve(_textures(tmp_path, "fine", 20, 8, 8) + _textures(tmp_path, "tiny", 3, 8, 8))
    with pytest.raises(DatasetError, match="'single'"):
        carve(_textures(tmp_path, "single", 1, 8, 8))
    with pytest.raises(DatasetError, match="'single'"):
        paint_validation_set(_textures(tmp_path, "fine", 2, 8, 8) + _textures(tmp_path, "single", 1, 8, 8), tmp_path)


@pytest.mark.parametrize("function", [carve, lambda samples: paint_validation_set(samples, "unused")])
@pytest.mark.parametrize(("split", "label"), [("test", 0), ("test", 1), ("train", 1)])
def test_anything_but_a_normal_training_image_is_refused_by_name(
    two_categories: list[Sample], function: Callable[[list[Sample]], object], split: str, label: int,
) -> None:
    stranger = Sample("/data/grid/test/good/007.png", "grid", split, label)
    with pytest.raises(DatasetError, match="/data/grid/test/good/007.png"):
        function([*two_categories, stranger])


def test_duplicates_and_bad_ratios_are_refused(two_categories: list[Sample]) -> None:
    with pytest.raises(DatasetError, match=two_categories[3].image):
        carve([*two_categories, two_categories[3]])
    for ratio in (0.0, 0.9, -0.1):
        with pytest.raises(OptionError, match="validation_ratio"):
            carve(two_categories, ratio)


def _check_exact(samples: list[Sample], sources: list[Sample]) -> list[float]:
    """Asserts every source kept normal and followed by its painted copy, exact masks, normals untouched; returns the
    painted masks' area shares."""
    ordered = sorted(sources, key=lambda source: (source.category, source.image))
    assert [sample.image for sample in samples[::2]] == [source.image for source in ordered]
    assert [sample.label for sample in samples] == [0, 1] * len(sources)
    assert [sample.category for sample in samples[1::2]] == [source.category for source in ordered]
    assert {sample.split for sample in samples} == {"test"}
    areas = []
    for normal, sample in zip(samples[::2], samples[1::2], strict=True):
        assert normal.mask is None
        source = normal.image
        assert Path(sample.image).stem.split("_", 1)[1] == Path(source).stem, (source, sample.image)  # its own copy
        before, after, mask = decode_rgb(source), decode_rgb(sample.image), load_mask(sample.mask)
        assert after.shape == before.shape and mask.shape == before.shape[:2]
        change = np.abs(after.astype(int) - before).max(axis=2)
        visible = change > CHANGE_TOLERANCE
        assert visible.any() and not change[~mask].any(), sample.image  # outside the mask: the source, bit for bit
        assert np.array_equal(mask, visible | (ndimage.binary_fill_holes(visible) & mask)), sample.image
        areas.append(float(mask.mean()))
    assert validate(samples).skipped == []
    return areas


def test_painting_is_exact_on_tall_non_square_images(tmp_path: Path) -> None:
    """KolektorSDD-like 250 x 620 grey JPEGs and RGB PNGs: sizes kept, grey stays grey, masks exact."""
    grey = _textures(tmp_path / "train", "commutator", 16, 620, 250, ".jpg", grey=True)
    rgb = _textures(tmp_path / "train", "sheet", 5, 620, 250)
    samples = paint_validation_set(grey + rgb, tmp_path / "validation")
    _check_exact(samples, grey + rgb)
    for sample in samples:
        if sample.label and sample.category == "commutator":
            assert Image.open(sample.image).mode == "L"
    kinds = Counter(sample.defect for sample in samples if sample.label and sample.category == "commutator")
    assert kinds == {"cutpaste": 4, "noise": 4, "scratch": 4, "brightness": 4}  # the colour change became brightness


@pytest.fixture(scope="module")
def painted_nuts(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Sample], list[Sample], Path]:
    root = tmp_path_factory.mktemp("nuts")
    sources = _synthetic(root / "train", "nut", 78, 96)
    return paint_validation_set(sources, root / "validation", seed=0), sources, root / "validation"


def test_every_image_is_painted_once_with_an_exact_mask_of_every_kind_and_size(
    painted_nuts: tuple[list[Sample], list[Sample], Path],
) -> None:
    samples, sources, _ = painted_nuts
    areas = _check_exact(samples, sources)
    kinds = Counter(sample.defect for sample in samples if sample.label)
    assert set(kinds) == set(DEFECT_SHARES) and sum(kinds.values()) == 78
    assert all(abs(kinds[kind] - share * 78) < 1 for kind, share in DEFECT_SHARES.items()), kinds
    assert min(areas) < 10 * max(AREA_FRACTION[0], 4 / 96**2) and max(areas) > AREA_FRACTION[1] / 4
    assert np.log10(max(areas) / min(areas)) > 2.5  # spans small to large, not one size


def test_painting_is_reproducible_and_the_seed_matters(
    tmp_path: Path, painted_nuts: tuple[list[Sample], list[Sample], Path],
) -> None:
    first, sources, folder = painted_nuts
    again = paint_validation_set(sources, tmp_path / "again", seed=0)
    assert _files(tmp_path / "again") == _files(folder)
    assert [sample.defect for sample in again] == [sample.defect for sample in first]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["seed"] == 0 and [entry["defect"] for entry in manifest["images"]] == [s.defect for s in first]
    other = paint_validation_set(sources, tmp_path / "other", seed=1)
    assert [sample.defect for sample in other] != [sample.defect for sample in first]
    same_kind = [(a, b) for a, b in zip(first, other, strict=True) if a.label and b.label and a.defect == b.defect]
    assert same_kind and all(Path(a.image).read_bytes() != Path(b.image).read_bytes() for a, b in same_kind)


def test_patches_come_from_another_image_of_the_category_whatever_its_size(tmp_path: Path) -> None:
    sizes = [(24, 20), (96, 80), (30, 120)] * 4
    sources = [Sample(str(_write_texture(tmp_path / "mixed" / f"{index:03d}.png", *size, index)), "mixed", "train", 0)
               for index, size in enumerate(sizes)]
    sources += _textures(tmp_path, "other", 8)
    samples = paint_validation_set(sources, tmp_path / "validation", seed=4)
    _check_exact(samples, sources)
    entries = json.loads((tmp_path / "validation" / MANIFEST).read_text())["images"]
    pasted = [entry for entry in entries if entry["defect"] == "cutpaste"]
    assert pasted and all(entry["donor"] != entry["source"] for entry in pasted)
    assert all(Path(entry["donor"]).parent == Path(entry["source"]).parent for entry in pasted)


def test_flat_images_still_get_a_visible_defect(tmp_path: Path) -> None:
    """Identical uniform images: a pasted patch or a change of black changes nothing, so the draw is redone."""
    sources = []
    for index in range(12):
        path = tmp_path / "train" / "blank" / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (70, 50), (0, 0, 0)).save(path)
        sources.append(Sample(str(path), "blank", "train", 0))
    samples = paint_validation_set(sources, tmp_path / "validation", seed=2)
    _check_exact(samples, sources)
    assert "cutpaste" not in {sample.defect for sample in samples}  # identical donors: fell back to a noise blob
    assert sum(sample.label for sample in samples) == 12
