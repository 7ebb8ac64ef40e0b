"""Human-facing outputs: heatmap overlays and figures, ROC plots, metrics.json and report.md (one method, or several
side by side).

Every image is drawn with Pillow alone (no plotting library): a figure costs a few milliseconds, so `reconray predict`
can write one per image.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from reconray.methods.knn import SearchChoice
from reconray.methods.metrics import METRIC_NAMES
from reconray.methods.scoring import is_anomalous

logger = logging.getLogger(__name__)

ScoreEntries = Mapping[str, Sequence[Mapping[str, Any]]]
"""Per category, one `{"image", "label", "score"}` entry per test image: what `evaluate_model` writes to scores.json."""

FIGURE_MIN_PANEL = 128
"""Smallest panel side of a heatmap figure in pixels: smaller maps are enlarged by a whole factor (nearest
neighbour, so every map pixel stays a crisp block and the header text fits over the panels)."""
FIGURE_GAP = 6
"""Pixels of background around and between the panels of a figure."""
CONTOUR_COLOUR = (0, 255, 0)
"""The ground-truth outline: bright green, a colour that neither the inputs nor the heatmap ramp use much."""
_BACKGROUND = (255, 255, 255)
_TEXT = (30, 30, 30)
_VERDICTS = {True: ("ANOMALOUS", (200, 0, 0)), False: ("normal", (0, 130, 0)), None: ("no threshold", (110, 110, 110))}
CURVE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127))
"""Curve colours of the ROC plots, one per method in order (matplotlib's tab10)."""
ROC_SIZE = (440, 360)
"""Width and height of a ROC plot (and of a scatter plot) in pixels."""
CATEGORICAL_MAX = 4
"""A scatter plot's numbers with this many distinct values or fewer (a choice among a few) get one column each."""

_COLORMAP_ANCHORS = np.array(
    [[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]], dtype=np.float32
)
"""A jet-like ramp (dark blue → cyan → yellow → dark red): the convention of anomaly heatmaps in the literature."""


def colorize(values: np.ndarray) -> np.ndarray:
    """Maps values in [0, 1] `(H, W)` to `(H, W, 3)` uint8 colours."""
    position = np.clip(values, 0.0, 1.0) * (len(_COLORMAP_ANCHORS) - 1)
    lower = np.floor(position).astype(int).clip(0, len(_COLORMAP_ANCHORS) - 2)
    fraction = (position - lower)[..., None]
    colours = _COLORMAP_ANCHORS[lower] * (1 - fraction) + _COLORMAP_ANCHORS[lower + 1] * fraction
    return (colours * 255 + 0.5).astype(np.uint8)


def render_overlay(
    rgb: np.ndarray, anomaly_map: np.ndarray, low: float, high: float, alpha: float = 0.5
) -> Image.Image:
    """Blends the colour-coded anomaly map over the image (both `(S, S)`); `low`/`high` fix the colour scale."""
    rgb = _resized(rgb, anomaly_map.shape)
    scaled = (anomaly_map - low) / max(high - low, 1e-12)
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * colorize(scaled).astype(np.float32)
    return Image.fromarray((blended + 0.5).astype(np.uint8))


def heatmap_scale(threshold: float | None, anomaly_map: np.ndarray) -> tuple[float, float]:
    """Colour scale of a heatmap: centred on the threshold when there is one (so red means 'over threshold'),
    else the map's own range."""
    if threshold is not None and threshold > 0:
        return 0.5 * threshold, 1.5 * threshold
    return float(anomaly_map.min()), float(anomaly_map.max())


def _resized(rgb: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The image at the anomaly map's size (bilinear), so that panels and overlay line up pixel for pixel."""
    if rgb.shape[:2] == tuple(shape):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(shape[::-1], Image.BILINEAR))


def mask_contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary of a binary mask `(H, W)`: its pixels within `width` 4-neighbour steps of a pixel outside it or
    of the image edge.

    Drawn instead of a filled mask so the defect itself stays visible under its outline.
    """
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, iterations=width)


def render_figure(
    rgb: np.ndarray,
    anomaly_map: np.ndarray,
    score: float,
    threshold: float | None,
    mask: np.ndarray | None = None,
    label: int | None = None,
) -> Image.Image:
    """The heatmap PNG a person reads at a glance: panels input | input with the ground-truth contour | overlay.

    A header band above the panels states the score, the threshold and the verdict of `is_anomalous`, and, when the
    true `label` is known (evaluate), that label and whether the verdict got it right.

    Args:
        rgb: the input image `(H, W, 3)` uint8, any size (resized to the map's).
        anomaly_map: `(S, S)` per-pixel anomaly scores.
        score: the image score.
        threshold: the decision threshold; None when the model has none.
        mask: the ground-truth mask at the map's size; its panel is drawn only when given.
        label: the true label (1 anomalous, 0 normal), None when unknown (predict).
    """
    rgb = _resized(rgb, anomaly_map.shape)
    panels, captions = [rgb], ["input"]
    if mask is not None:
        outlined = rgb.copy()
        outlined[mask_contour(mask, width=max(1, max(anomaly_map.shape) // 128))] = CONTOUR_COLOUR
        panels.append(outlined)
        captions.append("ground truth")
    panels.append(np.asarray(render_overlay(rgb, anomaly_map, *heatmap_scale(threshold, anomaly_map))))
    captions.append("anomaly map")

    zoom = -(-FIGURE_MIN_PANEL // max(anomaly_map.shape))
    height, width = anomaly_map.shape[0] * zoom, anomaly_map.shape[1] * zoom
    font = _font(max(11, width // 14))
    line_height = _text_size(font, "Ag")[1] + 4
    lines = _header_lines(score, threshold, label)
    top = FIGURE_GAP + line_height * (len(lines) + 1)
    figure = Image.new("RGB", (len(panels) * (width + FIGURE_GAP) + FIGURE_GAP, top + height + FIGURE_GAP),
                       _BACKGROUND)
    draw = ImageDraw.Draw(figure)
    for row, (text, colour) in enumerate(lines):
        draw.text((FIGURE_GAP, FIGURE_GAP + row * line_height), text, fill=colour, font=font)
    for index, (panel, caption) in enumerate(zip(panels, captions, strict=True)):
        left = FIGURE_GAP + index * (width + FIGURE_GAP)
        draw.text((left + (width - _text_size(font, caption)[0]) // 2, top - line_height), caption, fill=_TEXT,
                  font=font)
        figure.paste(Image.fromarray(panel).resize((width, height), Image.NEAREST), (left, top))
    return figure


def _header_lines(score: float, threshold: float | None, label: int | None) -> list[tuple[str, tuple[int, ...]]]:
    """The header text, line by line with its colour: verdict, score and threshold, true label (when known)."""
    verdict = is_anomalous(score, threshold)
    lines = [_VERDICTS[verdict],
             (f"score {score:#.4g}   threshold {'none' if threshold is None else f'{threshold:#.4g}'}", _TEXT)]
    if label is not None:
        truth = "anomalous" if label else "normal"
        if verdict is None:
            lines.append((f"true: {truth}", _TEXT))
        elif verdict == bool(label):
            lines.append((f"true: {truth} (correct)", _VERDICTS[False][1]))
        else:
            lines.append((f"true: {truth} ({'false alarm' if verdict else 'missed'})", _VERDICTS[True][1]))
    return lines


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at `size`; its fixed-size bitmap font where Pillow < 10.1 or FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_size(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def roc_plot(title: str, curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Image.Image:
    """ROC curves of image scores on one pair of axes, one per entry `name → (labels, scores)`.

    The legend gives each curve's AUROC; an entry whose labels hold one class only has no curve and is listed as
    "n/a", so a degenerate category still shows which methods were there.
    """
    from sklearn.metrics import auc, roc_curve  # a second of import, paid only by the commands that plot

    plot = Image.new("RGB", ROC_SIZE, _BACKGROUND)
    draw = ImageDraw.Draw(plot)
    font = _font(12)
    ticks = [(tick, f"{tick:.1f}") for tick in np.linspace(0.0, 1.0, 6)]
    point = _axes(plot, title, "false positive rate", "true positive rate", ticks, ticks, (0.0, 1.0), (0.0, 1.0))
    left, top, right, bottom = _plot_box(ROC_SIZE)
    for start in np.arange(0.0, 1.0, 0.04):
        draw.line([point(start, start), point(start + 0.02, start + 0.02)], fill=(150, 150, 150))

    legend = []
    for index, (name, (labels, scores)) in enumerate(curves.items()):
        colour = CURVE_COLOURS[index % len(CURVE_COLOURS)]
        if len(np.unique(labels)) < 2:
            legend.append((f"{name}: n/a (one class)", colour))
            continue
        fpr, tpr, _ = roc_curve(labels, np.asarray(scores))
        draw.line([point(x, y) for x, y in zip(fpr, tpr, strict=True)], fill=colour, width=2)
        legend.append((f"{name}: AUROC {auc(fpr, tpr):.3f}", colour))
    line_height = _text_size(font, "Ag")[1] + 6
    for row, (text, colour) in enumerate(reversed(legend)):
        y = bottom - 10 - (row + 1) * line_height
        x = right - 10 - _text_size(font, text)[0]
        draw.line([(x - 24, y + line_height / 2), (x - 6, y + line_height / 2)], fill=colour, width=3)
        draw.text((x, y), text, fill=_TEXT, font=font)
    return plot


def scatter_plot(
    title: str, x_label: str, y_label: str, xs: Sequence[Any], ys: Sequence[float], groups: Sequence[int] | None = None
) -> Image.Image:
    """One point per (x, y) on a plot of `ROC_SIZE`: numbers on a linear axis, or a log axis when they are positive
    and span a factor of 10 or more; anything else (strings, booleans, numbers with at most `CATEGORICAL_MAX`
    distinct values) as categories in sorted order. `groups`
    colours each point by its index into `CURVE_COLOURS` (all the first colour when None)."""
    plot = Image.new("RGB", ROC_SIZE, _BACKGROUND)
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    if numbers and len(set(xs)) > CATEGORICAL_MAX:
        values = np.asarray(xs, dtype=np.float64)
        log = bool(values.min() > 0 and values.max() >= 10 * values.min())
        positions = np.log10(values) if log else values
        x_range = _padded(positions.min(), positions.max())
        x_ticks = [(tick, f"{10 ** tick:.2g}" if log else f"{tick:.3g}") for tick in np.linspace(*x_range, 5)]
    else:
        label = (lambda x: f"{x:.3g}") if numbers else str
        categories = [label(x) for x in sorted(set(xs), key=lambda x: x if numbers else str(x))]
        positions = np.array([categories.index(label(x)) for x in xs], dtype=np.float64)
        x_range = (-0.5, len(categories) - 0.5)
        x_ticks = list(enumerate(categories))
    y_range = _padded(min(ys), max(ys))
    y_ticks = [(tick, f"{tick:.3f}") for tick in np.linspace(*y_range, 5)]
    point = _axes(plot, title, x_label, y_label, x_ticks, y_ticks, x_range, y_range)
    draw = ImageDraw.Draw(plot)
    for x, y, group in zip(positions, ys, groups or [0] * len(ys), strict=True):
        centre_x, centre_y = point(float(x), float(y))
        colour = CURVE_COLOURS[group % len(CURVE_COLOURS)]
        draw.ellipse([centre_x - 4, centre_y - 4, centre_x + 4, centre_y + 4], fill=colour, outline=_TEXT)
    return plot


def plot_grid(plots: Sequence[Image.Image], columns: int = 2) -> Image.Image:
    """Plots of one size tiled in rows of `columns`."""
    width, height = plots[0].size
    rows = -(-len(plots) // columns)
    grid = Image.new("RGB", (width * min(columns, len(plots)), height * rows), _BACKGROUND)
    for index, plot in enumerate(plots):
        grid.paste(plot, ((index % columns) * width, (index // columns) * height))
    return grid


def _padded(low: float, high: float) -> tuple[float, float]:
    """An axis range around [low, high] with 5% room on each side (5% of the value, or 0.05, when they are equal)."""
    pad = (high - low) * 0.05 if high > low else max(abs(low) * 0.05, 0.05)
    return float(low - pad), float(high + pad)


def _plot_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    return 64, 30, size[0] - 14, size[1] - 44


def _axes(
    plot: Image.Image, title: str, x_label: str, y_label: str, x_ticks: Sequence[tuple[float, str]],
    y_ticks: Sequence[tuple[float, str]], x_range: tuple[float, float], y_range: tuple[float, float],
) -> Any:
    """Draws the frame, grid lines, tick labels, title and axis labels; returns the data → pixel mapping."""
    draw = ImageDraw.Draw(plot)
    font = _font(12)
    left, top, right, bottom = _plot_box(plot.size)

    def point(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_range[0]) / (x_range[1] - x_range[0]) * (right - left),
                bottom - (y - y_range[0]) / (y_range[1] - y_range[0]) * (bottom - top))

    for tick, text in x_ticks:
        x = point(tick, y_range[0])[0]
        draw.line([(x, top), (x, bottom)], fill=(225, 225, 225))
        width = _text_size(font, text)[0]
        draw.text((x - width / 2, bottom + 5), text, fill=_TEXT, font=font)
    for tick, text in y_ticks:
        y = point(x_range[0], tick)[1]
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        width, height = _text_size(font, text)
        draw.text((max(2, left - width - 6), y - height / 2 - 2), text, fill=_TEXT, font=font)
    draw.rectangle([left, top, right, bottom], outline=_TEXT)
    draw.text(((plot.width - _text_size(font, title)[0]) / 2, 8), title, fill=_TEXT, font=font)
    draw.text(((left + right - _text_size(font, x_label)[0]) / 2, plot.height - 20), x_label, fill=_TEXT, font=font)
    line_height = _text_size(font, "Ag")[1] + 6
    label_image = Image.new("RGB", (_text_size(font, y_label)[0] + 4, line_height), _BACKGROUND)
    ImageDraw.Draw(label_image).text((2, 0), y_label, fill=_TEXT, font=font)
    rotated = label_image.rotate(90, expand=True)
    plot.paste(rotated, (4, int((top + bottom - rotated.height) / 2)))
    return point


def roc_section(out_dir: Path, scores: Mapping[str, ScoreEntries]) -> list[str]:
    """Writes `plots/roc_<category>.png` under `out_dir`, every method's curve of a category in one plot, and returns
    the report.md lines that show them.

    Args:
        out_dir: the folder of report.md (the links are relative to it).
        scores: per method, its per-category score entries (see `ScoreEntries`).
    """
    categories = sorted({category for per_category in scores.values() for category in per_category})
    lines = ["## ROC curves (image scores)", ""]
    for category in categories:
        curves = {
            method: (np.array([entry["label"] for entry in per_category[category]]),
                     np.array([entry["score"] for entry in per_category[category]]))
            for method, per_category in scores.items() if category in per_category
        }
        relative = Path("plots") / f"roc_{safe_name(category)}.png"
        roc_plot(category, curves).save(with_parent(out_dir / relative))
        lines += [f"![ROC {category}]({relative.as_posix()})", ""]
    logger.info("wrote %d ROC plots under %s", len(categories), out_dir / "plots")
    return lines


def safe_name(name: str) -> str:
    """`name` as one file-name part that also works unquoted in a markdown link (categories come from folder names
    and CSV cells)."""
    return re.sub(r"[^\w.-]+", "_", name)


def with_parent(path: Path) -> Path:
    """Creates the folder of `path` and returns `path`, so a writer can be chained onto it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, payload: Any) -> None:
    with_parent(path).write_text(json.dumps(payload, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def metrics_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown table: a row per (label, metrics) with the five quality metrics and image counts."""
    header = ["", *METRIC_NAMES, "n_images", "n_anomalous"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, metrics in rows:
        cells = [label, *(_cell(metrics.get(name)) for name in header[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def timing_lines(timing: dict[str, Any]) -> list[str]:
    return [
        f"- backbone: {_cell(timing.get('extract_ms_per_image'), 1)} ms/image; method + map: "
        f"{_cell(timing.get('score_ms_per_image'), 1)} ms/image; fit: {_cell(timing.get('fit_s'), 1)} s",
        *([f"- whole fit by stage: {', '.join(f'{name} {seconds:.1f} s' for name, seconds in stages.items())}"]
          if (stages := timing.get("fit_stages_s")) else []),
        f"- bank: {_cell(timing.get('bank_vectors'))} vectors, {_cell(timing.get('bank_bytes'))} bytes",
        *([f"- search: {SearchChoice(**timing['search']).describe()}"] if timing.get("search") else []),
    ]


def threshold_section(decisions: dict[str, dict[str, Any]]) -> list[str]:
    """Per category, the threshold in force and what it decided on the test images."""
    if not decisions:
        return []
    lines = ["## Decisions at the threshold", "",
             "| category | threshold | false alarms (normal) | caught (anomalous) |", "|---|---|---|---|"]
    for category, entry in decisions.items():
        threshold = "none" if entry["threshold"] is None else f"{entry['threshold']:.4g}"
        lines.append(f"| {category} | {threshold} | {_cell(entry['false_alarms'])} / {entry['normal']}"
                     f" | {_cell(entry['caught'])} / {entry['anomalous']} |")
    return [*lines, ""]


def method_report(
    metrics: dict[str, Any],
    heatmaps: dict[str, list[dict[str, Any]]],
    skipped: list[dict],
    out_dir: Path,
    scores: ScoreEntries,
) -> str:
    """report.md of one evaluated model: per-category table with a mean row, timing, ROC plots (written under
    `out_dir`, the report's folder), heatmaps, skipped images."""
    rows = [(name, values) for name, values in metrics["categories"].items()] + [("**mean**", metrics["mean"])]
    lines = [f"# reconray evaluation: {metrics['method']} ({metrics['backbone']})", ""]
    if "features" in metrics:
        features = metrics["features"]
        placement = {"square": "squashed to a square", "keep-aspect": "aspect kept, padded to a square"}[
            features.get("resize", "square")]
        tiles = f", in {features['tile']} px tiles" if features.get("tile") else ""
        lines += [f"Features: levels {', '.join(map(str, features['levels']))} at {features['image_size']} px "
                  f"({placement}{tiles}), {features['pool']}x{features['pool']} local average, "
                  f"{features['aggregation']}.", ""]
    lines += [*metrics_table(rows), ""]
    lines += ["## Timing", "", *timing_lines(metrics["timing"]), ""]
    lines += threshold_section(metrics.get("decisions", {}))
    lines += roc_section(out_dir, {metrics["method"]: scores})
    lines += heatmap_section(heatmaps)
    lines += skipped_section(skipped)
    return "\n".join(lines) + "\n"


def comparison_report(
    results: dict[str, dict[str, Any]],
    heatmaps: dict[str, dict[str, list]],
    title: str,
    out_dir: Path | None = None,
    scores: Mapping[str, ScoreEntries] | None = None,
) -> str:
    """report.md comparing several methods on one dataset: mean table, per-category tables, timing, ROC plots,
    heatmaps.

    Args:
        results: per method, the metrics `evaluate_model` returned.
        heatmaps: per method, its heatmap entries with paths relative to `out_dir`.
        title: the report's heading.
        out_dir: the report's folder; the ROC plots go to its `plots/`.
        scores: per method, the `scores` `evaluate_model` returned. Without it (or `out_dir`) the report has no ROC
            section: callers that never kept per-image scores still get their tables.
    """
    lines = [f"# {title}", "", "## Mean over categories", ""]
    lines += metrics_table([(method, metrics["mean"]) for method, metrics in results.items()])
    categories = sorted({name for metrics in results.values() for name in metrics["categories"]})
    for category in categories:
        lines += ["", f"## {category}", ""]
        lines += metrics_table(
            [(method, metrics["categories"][category]) for method, metrics in results.items()
             if category in metrics["categories"]]
        )
    lines += ["", "## Timing", ""]
    for method, metrics in results.items():
        lines += [f"**{method}**", "", *timing_lines(metrics["timing"]), ""]
    if out_dir is not None and scores:
        lines += roc_section(Path(out_dir), scores)
    for method, method_heatmaps in heatmaps.items():
        lines += [f"## Heatmaps: {method}", ""] + heatmap_section(method_heatmaps, heading=False)
    return "\n".join(lines) + "\n"


def heatmap_section(heatmaps: dict[str, list[dict[str, Any]]], heading: bool = True) -> list[str]:
    lines = ["## Heatmaps (highest and lowest scored test images)", ""] if heading else []
    for category, entries in heatmaps.items():
        lines.append(f"**{category}**: " + " ".join(
            f"[{entry['label']} {entry['score']:.3f}]({entry['path']})" for entry in entries
        ))
        lines.append("")
        lines += [f"![{entry['label']} {entry['score']:.3f}]({entry['path']})" for entry in entries]
        lines.append("")
    return lines


def skipped_section(skipped: list[dict[str, str]]) -> list[str]:
    if not skipped:
        return []
    return ["## Skipped images", "", *(f"- `{entry['image']}`: {entry['problem']}" for entry in skipped), ""]
