"""What a user sees: heatmap figures, mask contours, ROC plots in report.md, and which images `predict` scores.

Figures and plots are checked pixel by pixel against the arrays they are built from; evaluate and predict run on the
session's Ray with the conftest model and synthetic dataset.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reconray.methods.errors import DatasetError
from reconray.pipelines import evaluate
from reconray.pipelines.datasets import decode_rgb, load_mask
from reconray.pipelines.evaluate import evaluate_model, expand_images, predict_images
from reconray.pipelines.report import (
    CONTOUR_COLOUR,
    CURVE_COLOURS,
    FIGURE_GAP,
    FIGURE_MIN_PANEL,
    ROC_SIZE,
    comparison_report,
    heatmap_scale,
    mask_contour,
    render_figure,
    render_overlay,
    roc_plot,
)

SIDE = 64
ZOOM = FIGURE_MIN_PANEL // SIDE
PANEL = SIDE * ZOOM


@pytest.fixture(scope="module")
def defective(synthetic_root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real defective synthetic image, its ground-truth mask and a map that is high on the defect."""
    rgb = decode_rgb(synthetic_root / "nut" / "test" / "hole" / "000.png")
    mask = load_mask(synthetic_root / "nut" / "ground_truth" / "hole" / "000_mask.png")
    anomaly_map = np.random.default_rng(0).random((SIDE, SIDE)).astype(np.float32) + 2.0 * mask
    return rgb, mask, anomaly_map


def _panels(figure: Image.Image, count: int) -> list[np.ndarray]:
    """The `count` panels of a figure, at map resolution (every ZOOM-th pixel of the enlarged panel)."""
    pixels = np.asarray(figure)
    top = figure.height - FIGURE_GAP - PANEL
    lefts = [FIGURE_GAP + index * (PANEL + FIGURE_GAP) for index in range(count)]
    return [pixels[top:top + PANEL:ZOOM, left:left + PANEL:ZOOM] for left in lefts]


def _header(figure: Image.Image) -> np.ndarray:
    return np.asarray(figure)[: figure.height - FIGURE_GAP - PANEL]


@pytest.mark.parametrize("with_mask", [False, True])
def test_figure_panels_with_and_without_mask(defective, with_mask: bool) -> None:
    rgb, mask, anomaly_map = defective
    figure = render_figure(rgb, anomaly_map, 2.5, 1.0, mask=mask if with_mask else None, label=1)
    count = 3 if with_mask else 2
    assert figure.width == count * (PANEL + FIGURE_GAP) + FIGURE_GAP
    assert figure.height > PANEL + FIGURE_GAP + 30  # a header band of several text lines above the panels
    panels = _panels(figure, count)
    overlay = np.asarray(render_overlay(rgb, anomaly_map, *heatmap_scale(1.0, anomaly_map)))
    np.testing.assert_array_equal(panels[0], rgb)
    np.testing.assert_array_equal(panels[-1], overlay)
    # Enlarged by a whole factor with nearest neighbour: each map pixel is a ZOOM x ZOOM block.
    top = figure.height - FIGURE_GAP - PANEL
    first = np.asarray(figure)[top:top + PANEL, FIGURE_GAP:FIGURE_GAP + PANEL]
    np.testing.assert_array_equal(first, np.repeat(np.repeat(rgb, ZOOM, 0), ZOOM, 1))
    if with_mask:
        changed = np.any(panels[1] != rgb, axis=2)
        np.testing.assert_array_equal(changed, mask_contour(mask) & np.any(rgb != CONTOUR_COLOUR, axis=2))
        assert np.all(panels[1][mask_contour(mask)] == CONTOUR_COLOUR)


def test_figure_resizes_the_input_to_the_map(defective) -> None:
    rgb, _, anomaly_map = defective
    large = np.asarray(Image.fromarray(rgb).resize((200, 150)))
    figure = render_figure(large, anomaly_map, 0.5, None)
    assert figure.width == 2 * (PANEL + FIGURE_GAP) + FIGURE_GAP
    assert _panels(figure, 2)[0].shape == (SIDE, SIDE, 3)


def _reddish(pixels: np.ndarray) -> int:
    return int(np.sum((pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)))


def _greenish(pixels: np.ndarray) -> int:
    return int(np.sum((pixels[..., 1] > 90) & (pixels[..., 0] < 60) & (pixels[..., 2] < 60)))


def test_header_band_states_score_threshold_and_verdict(defective) -> None:
    rgb, _, anomaly_map = defective
    anomalous = _header(render_figure(rgb, anomaly_map, 2.5, 1.0))
    normal = _header(render_figure(rgb, anomaly_map, 0.5, 1.0))
    undecided = _header(render_figure(rgb, anomaly_map, 0.5, None))
    for band in (anomalous, normal, undecided):
        assert np.sum(np.any(band != 255, axis=2)) > 300  # text drawn, not a blank band
    assert anomalous.shape == normal.shape == undecided.shape
    assert np.any(anomalous != normal) and np.any(normal != undecided)
    # The verdict is coloured: red when anomalous, green when normal, neither without a threshold.
    assert _reddish(anomalous) > 20 and _greenish(anomalous) == 0
    assert _greenish(normal) > 20 and _reddish(normal) == 0
    assert _reddish(undecided) == _greenish(undecided) == 0
    # Evaluate knows the true label: one more line, red when the verdict is wrong (a false alarm here).
    with_label = _header(render_figure(rgb, anomaly_map, 2.5, 1.0, label=0))
    assert with_label.shape[0] > anomalous.shape[0]
    assert _reddish(with_label) > _reddish(anomalous)


def test_contour_lies_on_the_mask_boundary() -> None:
    mask = np.zeros((20, 24), dtype=bool)
    mask[3:9, 4:12] = True
    mask[12:, 18:] = True  # a region touching the image edge is closed along that edge
    yy, xx = np.mgrid[:20, :24]
    mask |= (yy - 13) ** 2 + (xx - 7) ** 2 <= 9
    padded = np.pad(mask, 1, constant_values=False)
    outside_neighbour = ~padded[:-2, 1:-1] | ~padded[2:, 1:-1] | ~padded[1:-1, :-2] | ~padded[1:-1, 2:]
    np.testing.assert_array_equal(mask_contour(mask), mask & outside_neighbour)
    assert mask_contour(mask)[19, 20] and mask_contour(mask)[15, 23] and not mask_contour(mask)[15, 20]
    thick = mask_contour(mask, width=2)
    assert np.all(thick[mask_contour(mask)]) and not np.any(thick & ~mask)
    assert thick.sum() > mask_contour(mask).sum()
    assert not mask_contour(np.zeros((5, 5), dtype=bool)).any()


def test_roc_plot_draws_one_curve_per_method() -> None:
    labels = np.array([0] * 10 + [1] * 10)
    rng = np.random.default_rng(0)
    plot = np.asarray(roc_plot("nut", {
        "perfect": (labels, labels + rng.random(20) * 0.5),
        "noisy": (labels, labels + rng.normal(size=20)),
        "one class": (np.zeros(4, dtype=int), rng.random(4)),
    }))
    assert plot.shape == (ROC_SIZE[1], ROC_SIZE[0], 3)

    def drawn(colour: tuple[int, ...]) -> int:
        return int(np.sum(np.all(plot == colour, axis=2)))

    # A curve is hundreds of pixels of its colour; the legend's sample line alone is about 60.
    assert drawn(CURVE_COLOURS[0]) > 400 and drawn(CURVE_COLOURS[1]) > 400
    assert 0 < drawn(CURVE_COLOURS[2]) < 100


def _made_up_results(methods: list[str], categories: list[str]) -> dict:
    values = {"image_auroc": 0.9, "n_images": 8, "n_anomalous": 4}
    return {method: {"mean": values, "categories": dict.fromkeys(categories, values), "timing": {}}
            for method in methods}


def test_comparison_report_plots_every_method_per_category(tmp_path: Path) -> None:
    methods, categories = ["patchcore", "sgfr"], ["nut", "wood chips"]
    rng = np.random.default_rng(1)
    scores = {method: {category: [{"image": f"{category}/{index}.png", "label": index % 2, "score": rng.random()}
                                  for index in range(10)] for category in categories} for method in methods}
    report = comparison_report(_made_up_results(methods, categories), {}, "side by side", tmp_path, scores)
    links = re.findall(r"!\[ROC [^]]+\]\(([^)]+)\)", report)
    assert links == ["plots/roc_nut.png", "plots/roc_wood_chips.png"]
    for link in links:
        with Image.open(tmp_path / link) as plot:
            assert plot.format == "PNG" and plot.size == ROC_SIZE
            pixels = np.asarray(plot.convert("RGB"))
        for colour in CURVE_COLOURS[: len(methods)]:
            assert np.sum(np.all(pixels == colour, axis=2)) > 100
    # The call of callers without per-image scores keeps working, without the ROC section.
    assert "ROC" not in comparison_report(_made_up_results(methods, categories), {}, "side by side")


@pytest.fixture(scope="module")
def evaluation(ray_session, fitted_model: Path, synthetic_root: Path, tmp_path_factory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("evaluation")
    return out_dir, evaluate_model(fitted_model, synthetic_root, out_dir, categories=["nut", "wood"])


def test_evaluate_writes_scores_and_links_roc_plots(evaluation, synthetic_root: Path) -> None:
    out_dir, result = evaluation
    written = json.loads((out_dir / "scores.json").read_text())
    assert written == result["scores"] and sorted(written) == ["nut", "wood"]
    for category, entries in written.items():
        assert sorted(entry["image"] for entry in entries) == sorted(
            str(path) for path in (synthetic_root / category / "test").glob("*/*.png"))
        assert all(entry["label"] == int("/good/" not in entry["image"]) for entry in entries)
        assert [entry["score"] for entry in entries if entry["label"]]  # both classes present
    report = (out_dir / "report.md").read_text()
    assert "## ROC curves (image scores)" in report
    for category in written:
        assert f"![ROC {category}](plots/roc_{category}.png)" in report
        with Image.open(out_dir / "plots" / f"roc_{category}.png") as plot:
            assert plot.format == "PNG" and plot.size == ROC_SIZE


def test_evaluate_figures_show_the_mask_of_defective_images(evaluation, synthetic_root: Path) -> None:
    out_dir, result = evaluation
    for category, entries in result["heatmaps"].items():
        assert len(entries) == 4
        for entry in entries:
            with Image.open(out_dir / entry["path"]) as image:
                figure = image.convert("RGB")
            count = 3 if entry["label"] == "anomalous" else 2
            assert figure.width == count * (PANEL + FIGURE_GAP) + FIGURE_GAP
            if count == 3:
                mask_file = Path(entry["image"].replace("/test/", "/ground_truth/")).with_name(
                    Path(entry["image"]).stem + "_mask.png")
                outline = np.all(_panels(figure, 3)[1] == CONTOUR_COLOUR, axis=2)
                assert outline.any() and not np.any(outline & ~mask_contour(load_mask(mask_file))), category


def test_predict_scores_folders_and_globs_once(ray_session, fitted_model: Path, synthetic_root: Path,
                                               tmp_path: Path) -> None:
    test_dir = synthetic_root / "nut" / "test"
    good = sorted((test_dir / "good").glob("*.png"))
    firsts = sorted(test_dir.glob("*/000.png"))
    predictions = predict_images(fitted_model, [test_dir / "good", f"{test_dir}/*/000.png", good[1]], tmp_path)
    expected = good + [path for path in firsts if path not in good]
    assert len(expected) == 8
    assert [entry["image"] for entry in predictions] == [str(path.resolve()) for path in expected]
    assert json.loads((tmp_path / "predictions.json").read_text()) == predictions
    for index, entry in enumerate(predictions):
        assert entry["is_anomalous"] == (entry["score"] > entry["threshold"])
        assert Path(entry["heatmap"]).name == f"{index:04d}_{Path(entry['image']).stem}.png"
        with Image.open(entry["heatmap"]) as figure:
            assert figure.format == "PNG" and figure.width == 2 * (PANEL + FIGURE_GAP) + FIGURE_GAP


def test_expand_images_folders_globs_and_duplicates(files) -> None:
    first, second = files.image("parts/b.png"), files.image("parts/a.JPG")
    nested = files.image("parts/deep/c.png")
    (files.root / "parts" / "notes.txt").write_text("not an image")
    root = files.root / "parts"
    assert expand_images([root]) == [second, first]  # sorted, image suffixes only, not recursive
    assert expand_images([f"{root}/*"]) == [second, first]
    assert expand_images([f"{root}/**/*.png"]) == [first, nested]
    assert expand_images([first, root, f"{root}/*.png", nested]) == [first, second, nested]


@pytest.mark.parametrize("case", ["missing file", "empty glob", "empty folder", "nothing"])
def test_predict_refuses_what_names_no_image_before_any_ray_work(
    files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(evaluate, "ensure_ray", no_ray)
    monkeypatch.setattr(evaluate, "score_dataset", no_ray)
    good = files.image("parts/a.png")
    (files.root / "empty").mkdir()
    argument, message = {
        "missing file": (tmp_path / "parts" / "missing.png", f"{tmp_path / 'parts' / 'missing.png'}: no such file"),
        "empty glob": (f"{tmp_path}/parts/*.bmp", f"{tmp_path}/parts/*.bmp: pattern matches no image files"),
        "empty folder": (tmp_path / "empty", f"{tmp_path / 'empty'}: folder holds no image files"),
        "nothing": (None, "predict needs at least one image"),
    }[case]
    with pytest.raises(DatasetError, match=re.escape(message)):
        predict_images(tmp_path / "no model", [good, argument] if argument else [], tmp_path / "out")
