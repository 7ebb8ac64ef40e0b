"""Synthetic dataset: MVTec layout, byte-for-byte determinism, exact masks, idempotent reuse, every defect kind."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reconray.pipelines.synthetic import (
    DEFAULT_CATEGORIES,
    DEFECT_KINDS,
    SyntheticConfig,
    make_synthetic_dataset,
    render_sample,
)

SMALL = SyntheticConfig(image_size=64, n_train=3, n_test_good=2, n_test_defect=len(DEFECT_KINDS) + 1)


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_defaults_cover_textures_objects_and_defect_kinds() -> None:
    config = SyntheticConfig()
    assert len(DEFAULT_CATEGORIES) >= 4 and config.categories == DEFAULT_CATEGORIES
    assert {"fabric", "wood"} <= set(DEFAULT_CATEGORIES) and {"nut", "pill"} <= set(DEFAULT_CATEGORIES)
    assert len(DEFECT_KINDS) >= 3 and config.image_size == 256


def test_layout_and_counts(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "data", SMALL)
    assert sorted(p.name for p in root.iterdir()) == sorted([*DEFAULT_CATEGORIES, "synthetic.json"])
    for category in DEFAULT_CATEGORIES:
        folder = root / category
        assert sorted(p.name for p in (folder / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        assert sorted(p.name for p in (folder / "test" / "good").iterdir()) == ["000.png", "001.png"]
        assert sorted(p.name for p in (folder / "test").iterdir()) == sorted(["good", *DEFECT_KINDS])
        assert sorted(p.name for p in (folder / "ground_truth").iterdir()) == sorted(DEFECT_KINDS)
        counts = {kind: len(list((folder / "test" / kind).iterdir())) for kind in DEFECT_KINDS}
        assert sum(counts.values()) == SMALL.n_test_defect and set(counts.values()) == {1, 2}
        for kind in DEFECT_KINDS:
            images = sorted(p.stem for p in (folder / "test" / kind).iterdir())
            masks = sorted(p.name for p in (folder / "ground_truth" / kind).iterdir())
            assert masks == [f"{stem}_mask.png" for stem in images]
    manifest = json.loads((root / "synthetic.json").read_text())
    assert manifest["config"]["n_train"] == 3 and manifest["config"]["categories"] == list(DEFAULT_CATEGORIES)


def test_generation_is_byte_identical(tmp_path: Path) -> None:
    config = SyntheticConfig(image_size=64, n_train=2, n_test_good=1, n_test_defect=len(DEFECT_KINDS))
    first = _files(make_synthetic_dataset(tmp_path / "a", config))
    second = _files(make_synthetic_dataset(tmp_path / "b", config))
    assert first == second and len(first) == len(DEFAULT_CATEGORIES) * (3 + 2 * len(DEFECT_KINDS)) + 1
    other_seed = _files(make_synthetic_dataset(tmp_path / "c", replace(config, seed=1)))
    assert other_seed.keys() == first.keys()
    assert all(other_seed[name] != first[name] for name in first if name.endswith(".png") and "_mask" not in name)


def test_masks_are_binary_sized_like_images_and_only_for_defects(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "data", SMALL)
    for image_path in sorted(root.glob("*/test/*/*.png")):
        image = _png(image_path)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        kind = image_path.parent.name
        mask_path = image_path.parents[2] / "ground_truth" / kind / f"{image_path.stem}_mask.png"
        if kind == "good":
            assert not mask_path.exists()
            continue
        mask = _png(mask_path)
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}, f"{mask_path} is not binary or empty"


@pytest.mark.parametrize("category", DEFAULT_CATEGORIES)
def test_mask_marks_exactly_the_pixels_the_defect_changed(tmp_path: Path, category: str) -> None:
    root = make_synthetic_dataset(tmp_path / "data", replace(SMALL, categories=(category,)))
    for kind in DEFECT_KINDS:
        sample = render_sample(category, "test", kind, 0, SMALL)
        assert np.array_equal(_png(root / category / "test" / kind / "000.png"), sample.image)
        assert np.array_equal(_png(root / category / "ground_truth" / kind / "000_mask.png"), sample.mask)
        inside = sample.mask > 0
        changed = np.any(sample.image != sample.clean, axis=-1)
        assert inside.sum() >= 4 and np.array_equal(changed, inside), f"{category}/{kind}: mask is not exact"
        nominal_elsewhere = render_sample(category, "test", kind, 1, SMALL).clean
        assert not np.array_equal(nominal_elsewhere, sample.clean), "nominal renderings should vary"
    good = render_sample(category, "test", "good", 0, SMALL)
    assert good.mask is None and np.array_equal(good.image, good.clean)


def test_normal_images_vary_but_stay_close(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "data", SMALL)
    for category in DEFAULT_CATEGORIES:
        images = [_png(path).astype(np.float64) for path in sorted((root / category / "train" / "good").iterdir())]
        differences = [np.abs(images[0] - other).mean() for other in images[1:]]
        assert all(0 < difference < 60 for difference in differences), (category, differences)


def test_existing_dataset_is_reused_and_a_new_config_regenerates(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "data", SMALL)
    marker = root / "fabric" / "train" / "good" / "000.png"
    marker.write_bytes(b"left alone")
    assert make_synthetic_dataset(root, SMALL) == root
    assert marker.read_bytes() == b"left alone", "a complete dataset with the same config must not be rewritten"

    fewer = replace(SMALL, n_train=1, categories=("nut",))
    make_synthetic_dataset(root, fewer)
    assert sorted(p.name for p in root.iterdir()) == ["nut", "synthetic.json"]
    assert [p.name for p in (root / "nut" / "train" / "good").iterdir()] == ["000.png"]

    (root / "synthetic.json").write_text("{truncated")
    make_synthetic_dataset(root, fewer)
    assert json.loads((root / "synthetic.json").read_text())["config"]["n_train"] == 1


def test_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.png").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="holds no synthetic.json"):
        make_synthetic_dataset(tmp_path / "photos", SMALL)
    assert (tmp_path / "photos" / "holiday.png").read_bytes() == b"keep me"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image_size": 16}, "image_size=16 is out of range"),
        ({"n_train": 0}, "n_train=0 is out of range"),
        ({"n_test_defect": -1}, "n_test_defect=-1 is out of range"),
        ({"categories": ("fabric", "carpet")}, "must be a non-empty list of distinct names"),
        ({"categories": ("nut", "nut")}, "must be a non-empty list of distinct names"),
    ],
)
def test_config_rejects_bad_values(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**options)


def test_render_sample_rejects_unknown_labels() -> None:
    with pytest.raises(ValueError, match="label='scratch' must be 'good'"):
        render_sample("nut", "train", "scratch", 0, SMALL)
    with pytest.raises(ValueError, match="unknown category 'carpet'"):
        render_sample("carpet", "test", "good", 0, SMALL)
