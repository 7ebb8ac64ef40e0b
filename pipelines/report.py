"""Human-facing outputs: heatmap overlays, metrics.json and report.md (one method, or several side by side)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reconray.methods.metrics import METRIC_NAMES

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
    if rgb.shape[:2] != anomaly_map.shape:
        rgb = np.asarray(Image.fromarray(rgb).resize(anomaly_map.shape[::-1], Image.BILINEAR))
    scaled = (anomaly_map - low) / max(high - low, 1e-12)
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * colorize(scaled).astype(np.float32)
    return Image.fromarray((blended + 0.5).astype(np.uint8))


def heatmap_scale(threshold: float | None, anomaly_map: np.ndarray) -> tuple[float, float]:
    """Colour scale of a heatmap: centred on the threshold when there is one (so red means 'over threshold'),
    else the map's own range."""
    if threshold is not None and threshold > 0:
        return 0.5 * threshold, 1.5 * threshold
    return float(anomaly_map.min()), float(anomaly_map.max())


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default))


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
        f"- bank: {_cell(timing.get('bank_vectors'))} vectors, {_cell(timing.get('bank_bytes'))} bytes",
    ]


def method_report(metrics: dict[str, Any], heatmaps: dict[str, list[dict[str, Any]]], skipped: list[dict]) -> str:
    """report.md of one evaluated model: per-category table with a mean row, timing, heatmaps, skipped images."""
    rows = [(name, values) for name, values in metrics["categories"].items()] + [("**mean**", metrics["mean"])]
    lines = [f"# reconray evaluation: {metrics['method']} ({metrics['backbone']})", "", *metrics_table(rows), ""]
    lines += ["## Timing", "", *timing_lines(metrics["timing"]), ""]
    lines += heatmap_section(heatmaps)
    lines += skipped_section(skipped)
    return "\n".join(lines) + "\n"


def comparison_report(results: dict[str, dict[str, Any]], heatmaps: dict[str, dict[str, list]], title: str) -> str:
    """report.md comparing several methods on one dataset: mean table, per-category tables, timing, heatmaps."""
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
