"""Datasets: discovery of the four layouts, `categories` subsets, the validation pass and image/mask decoding."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reconray.pipelines.datasets import (
    NORMAL,
    DatasetError,
    Sample,
    decode_rgb,
    discover,
    layout_of,
    load_mask,
    split_samples,
    validate,
)


def _by_split(samples: list[Sample]) -> dict[tuple[str, str], list[Sample]]:
    grouped: dict[tuple[str, str], list[Sample]] = {}
    for sample in samples:
        grouped.setdefault((sample.category, sample.split), []).append(sample)
    return grouped


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return path


# --- discovery -----------------------------------------------------------------------------------------------------


def test_mvtec_root_splits_labels_and_masks(files) -> None:
    root = files.mvtec("mvtec", categories=("bottle", "grid"), train=3, good=2, defects=("crack", "hole"))
    samples = discover(root)
    assert layout_of(root) == "mvtec"
    grouped = _by_split(samples)
    assert sorted(grouped) == [("bottle", "test"), ("bottle", "train"), ("grid", "test"), ("grid", "train")]
    train = grouped[("bottle", "train")]
    assert len(train) == 3 and all(s.label == 0 and s.mask is None and s.defect == NORMAL for s in train)
    test = grouped[("bottle", "test")]
    normal = [s for s in test if s.label == 0]
    anomalous = sorted((s for s in test if s.label == 1), key=lambda s: s.defect)
    assert len(normal) == 2 and all(s.mask is None for s in normal)
    assert [s.defect for s in anomalous] == ["crack", "hole"]
    for sample in anomalous:
        assert sample.mask == str(root / "bottle" / "ground_truth" / sample.defect / "000_mask.png")
        assert sample.image == str(root / "bottle" / "test" / sample.defect / "000.png")


def test_mvtec_category_folder(files) -> None:
    root = files.mvtec("mvtec", categories=("bottle", "grid"))
    assert layout_of(root / "grid") == "mvtec_category"
    samples = discover(root / "grid")
    assert {s.category for s in samples} == {"grid"}
    assert sorted((s.split, s.label) for s in samples) == [("test", 0), ("test", 1), ("train", 0), ("train", 0)]


def test_mvtec_mask_without_suffix_is_found(files) -> None:
    root = files.mvtec("mvtec", categories=("bottle",))
    mask = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    mask.rename(mask.with_name("000.png"))
    anomalous = [s for s in discover(root) if s.label == 1]
    assert [s.mask for s in anomalous] == [str(mask.with_name("000.png"))]


def test_categories_subset_and_unknown_category(files) -> None:
    root = files.mvtec("mvtec", categories=("bottle", "grid", "screw"))
    assert {s.category for s in discover(root, ["screw", "bottle"])} == {"bottle", "screw"}
    with pytest.raises(DatasetError, match=r"categories \['cable'\] not found; available: \['bottle', 'grid', 'scr"):
        discover(root, ["cable", "grid"])


def test_mvtec3d_root_uses_rgb_and_gt_only(files) -> None:
    root = files.mvtec3d("mvtec3d", categories=("bagel", "cookie"))
    assert layout_of(root) == "mvtec3d"
    samples = discover(root)
    assert {s.category for s in samples} == {"bagel", "cookie"}
    bagel = [s for s in samples if s.category == "bagel"]
    assert all(Path(s.image).parent.name == "rgb" and "validation" not in s.image for s in bagel)
    assert sorted((s.split, s.label, s.defect) for s in bagel) == [
        ("test", 0, NORMAL), ("test", 1, "hole"), ("train", 0, NORMAL)
    ]
    (defective,) = [s for s in bagel if s.label == 1]
    assert defective.mask == str(root / "bagel" / "test" / "hole" / "gt" / "000.png")
    assert layout_of(root / "cookie") == "mvtec3d_category"
    assert {s.category for s in discover(root / "cookie")} == {"cookie"}


def test_csv_relative_and_absolute_paths(files, tmp_path: Path) -> None:
    files.image("data/good/a.png")
    files.image("data/crack/b.png")
    files.mask("data/crack/b_mask.png")
    absolute = files.image("elsewhere/c.png")
    table = _write_csv(tmp_path / "data" / "split.csv", [
        {"object": "tile", "split": "train", "label": "normal", "image": "good/a.png", "mask": ""},
        {"object": "tile", "split": "test", "label": "anomaly", "image": "crack/b.png", "mask": "crack/b_mask.png"},
        {"object": "rod", "split": "test", "label": "normal", "image": str(absolute), "mask": ""},
    ])
    assert layout_of(table) == "csv"
    train, anomalous, normal = discover(table)
    assert train == Sample(str(tmp_path / "data" / "good" / "a.png"), "tile", "train", 0)
    assert anomalous == Sample(str(tmp_path / "data" / "crack" / "b.png"), "tile", "test", 1, "crack",
                               str(tmp_path / "data" / "crack" / "b_mask.png"))
    assert normal == Sample(str(absolute), "rod", "test", 0)
    assert [s.category for s in discover(table, ["rod"])] == ["rod"]


def test_csv_bad_rows_and_columns_are_named(tmp_path: Path) -> None:
    table = _write_csv(tmp_path / "split.csv", [
        {"object": "tile", "split": "train", "label": "normal", "image": "a.png", "mask": ""},
        {"object": "tile", "split": "val", "label": "normal", "image": "b.png", "mask": ""},
    ])
    with pytest.raises(DatasetError, match=r"split\.csv:3: split must be train/test .* got 'val'/'normal'"):
        discover(table)
    headless = tmp_path / "headless.csv"
    headless.write_text("object,image\ntile,a.png\n")
    with pytest.raises(DatasetError, match=r"headless\.csv: missing columns \['label', 'split'\]"):
        discover(headless)


def test_plain_folder_is_all_normal_training(files) -> None:
    for index in range(3):
        files.image(f"parts/{index}.jpg", seed=index)
    (files.root / "parts" / "notes.txt").write_text("not an image")
    samples = discover(files.root / "parts")
    assert layout_of(files.root / "parts") == "folder"
    assert [Path(s.image).name for s in samples] == ["0.jpg", "1.jpg", "2.jpg"]
    assert all((s.category, s.split, s.label, s.mask) == ("parts", "train", 0, None) for s in samples)


@pytest.mark.parametrize("content", ["nothing", "text", "nested"])
def test_unknown_layout_names_the_folder(files, content: str) -> None:
    folder = files.root / "odd"
    folder.mkdir()
    if content == "text":
        (folder / "readme.txt").write_text("hello")
    if content == "nested":
        files.image("odd/deeper/still/a.png")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(folder))}: unknown layout"):
        discover(folder)


def test_missing_path_and_non_csv_file(files) -> None:
    with pytest.raises(DatasetError, match="no such file or folder"):
        discover(files.root / "absent")
    image = files.image("single.png")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(image))}: a data file must be a VisA-style split \.csv"):
        discover(image)


def test_empty_split_names_the_categories(files) -> None:
    root = files.mvtec("mvtec", categories=("bottle", "grid"), train=1)
    for image in (root / "grid" / "train" / "good").iterdir():
        image.unlink()
    samples = discover(root)
    with pytest.raises(DatasetError, match=r"empty train split for categories \['grid'\]"):
        split_samples(samples, "train")
    assert len(split_samples(samples, "test")) == 4
    folder_samples = [Sample(f"{index}.png", "parts", "train", 0) for index in range(2)]
    with pytest.raises(DatasetError, match=r"empty test split for categories \['parts'\]"):
        split_samples(folder_samples, "test")


# --- validation ----------------------------------------------------------------------------------------------------


def test_validate_accepts_a_clean_dataset(files) -> None:
    samples = discover(files.mvtec("mvtec"))
    result = validate(samples)
    assert result.samples == samples and result.skipped == []


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_named_or_skipped(files, suffix: str) -> None:
    good = files.image(f"parts/good{suffix}")
    bad = files.truncated(f"parts/bad{suffix}")
    samples = discover(files.root / "parts")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(bad))}: unreadable image"):
        validate(samples)
    result = validate(samples, on_bad_image="skip")
    assert [s.image for s in result.samples] == [str(good)]
    assert [entry["image"] for entry in result.skipped] == [str(bad)]
    assert result.skipped[0]["problem"].startswith("unreadable image")


def test_not_an_image_is_unreadable(files) -> None:
    bad = files.root / "parts" / "b.png"
    files.image("parts/a.png")
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(bad))}: unreadable image"):
        validate(discover(files.root / "parts"))


def test_defective_image_without_mask_is_refused_even_when_skipping(files) -> None:
    root = files.mvtec("mvtec", categories=("bottle",))
    mask = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    mask.unlink()
    for mode in ("error", "skip"):
        with pytest.raises(DatasetError, match=rf"{re.escape(str(mask))}: defective test image has no mask file"):
            validate(discover(root), on_bad_image=mode)


def test_defective_csv_row_without_mask_names_the_image(files, tmp_path: Path) -> None:
    image = files.image("crack/a.png")
    table = _write_csv(tmp_path / "split.csv", [
        {"object": "tile", "split": "test", "label": "anomaly", "image": "crack/a.png", "mask": ""},
    ])
    with pytest.raises(DatasetError, match=rf"{re.escape(str(image))}: defective test image has no mask file"):
        validate(discover(table))


def test_mask_size_mismatch_names_the_mask_and_both_sizes(files) -> None:
    root = files.mvtec("mvtec", categories=("bottle",))
    mask = files.mask(root / "bottle" / "ground_truth" / "crack" / "000_mask.png", size=(30, 24))
    message = rf"{re.escape(str(mask))}: mask size \(30, 24\) differs from image size \(32, 24\)"
    with pytest.raises(DatasetError, match=message):
        validate(discover(root), on_bad_image="skip")


def test_validate_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="on_bad_image must be 'error' or 'skip', got 'ignore'"):
        validate([], on_bad_image="ignore")


# --- decoding ------------------------------------------------------------------------------------------------------


def _saved(tmp_path: Path, image: Image.Image, name: str) -> Path:
    path = tmp_path / name
    image.save(path)
    return path


def test_grayscale_is_replicated(tmp_path: Path) -> None:
    gray = np.array([[0, 77], [200, 255]], dtype=np.uint8)
    rgb = decode_rgb(_saved(tmp_path, Image.fromarray(gray), "gray.png"))
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, np.repeat(gray[..., None], 3, axis=2))


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128]], [[10, 250, 90, 0], [255, 255, 255, 64]]], np.uint8)
    rgb = decode_rgb(_saved(tmp_path, Image.fromarray(rgba), "rgba.png"))
    assert rgb.tolist() == [[[200, 100, 50], [100, 50, 25]], [[0, 0, 0], [64, 64, 64]]]


def test_gray_alpha_is_composited_on_black(tmp_path: Path) -> None:
    la = Image.fromarray(np.array([[[100, 255], [100, 128]]], dtype=np.uint8))
    assert decode_rgb(_saved(tmp_path, la, "la.png")).tolist() == [[[100] * 3, [50] * 3]]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_is_scaled_not_clipped(tmp_path: Path, suffix: str) -> None:
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    path = _saved(tmp_path, Image.fromarray(values), f"deep{suffix}")
    assert Image.open(path).mode.startswith("I;16")
    rgb = decode_rgb(path)
    assert rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_image_in_unit_range_is_scaled(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert decode_rgb(_saved(tmp_path, Image.fromarray(values), "float.tif"))[0, :, 1].tolist() == [0, 128, 255]


def test_palette_colours_are_expanded(tmp_path: Path) -> None:
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 128, 0, 10, 20, 30] + [0] * 759)
    palette.putdata([0, 1, 2])
    assert decode_rgb(_saved(tmp_path, palette, "palette.png")).tolist() == [[[255, 0, 0], [0, 128, 0], [10, 20, 30]]]
    palette.info["transparency"] = 1
    assert decode_rgb(_saved(tmp_path, palette, "transparent.png")).tolist() == [[[255, 0, 0], [0, 0, 0], [10, 20, 30]]]


def test_rgb_jpeg_and_bilevel(tmp_path: Path) -> None:
    pixels = np.full((8, 8, 3), (200, 40, 90), dtype=np.uint8)
    decoded = decode_rgb(_saved(tmp_path, Image.fromarray(pixels), "photo.jpg"))
    assert decoded.shape == (8, 8, 3) and np.abs(decoded.astype(int) - pixels).max() <= 3
    bilevel = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    assert decode_rgb(_saved(tmp_path, bilevel, "bilevel.png")).tolist() == [[[0] * 3, [255] * 3]]


@pytest.mark.parametrize(
    "pixels",
    [
        np.array([[0, 255, 0, 255]], np.uint8),
        np.array([[0, 1, 0, 1]], np.uint8),
        np.array([[0, 65535, 0, 40000]], np.uint16),
        np.array([[0, 200, 100, 140]], np.uint8),
        np.array([[[0, 0, 0], [255, 0, 0], [0, 0, 0], [255, 255, 255]]], np.uint8),
    ],
    ids=["0-255", "0-1", "16-bit", "soft-edge", "colour"],
)
def test_masks_are_binarized(tmp_path: Path, pixels: np.ndarray) -> None:
    mask = load_mask(_saved(tmp_path, Image.fromarray(pixels), "mask.png"))
    assert mask.dtype == bool and mask.shape == (1, 4)
    assert mask.tolist() == [[False, True, False, True]]
