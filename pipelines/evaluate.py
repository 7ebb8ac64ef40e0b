"""Evaluate and predict: score images with a saved artifact in Ray Data, then metrics, heatmaps and reports.

Both go through `ingest.score_dataset`, whose actors run `methods.scoring.Scorer` (the one scoring path), so a score
here equals the score `reconray serve` returns for the same image.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reconray.methods.artifact import read_config
from reconray.methods.metrics import compute_metrics, mean_metrics
from reconray.pipelines.datasets import Sample, discover, load_rgb, split_samples, validate
from reconray.pipelines.ingest import Resources, log_every, plan_resources, progress, score_dataset
from reconray.pipelines.report import heatmap_scale, method_report, render_overlay, write_json
from reconray.pipelines.runtime import ensure_ray

HEATMAPS_PER_END = 2
"""Heatmaps written per category: this many of the highest and of the lowest scored test images."""


@dataclasses.dataclass
class _CategoryScores:
    images: list[str] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)
    scores: list[float] = dataclasses.field(default_factory=list)
    maps: list[np.ndarray] = dataclasses.field(default_factory=list)
    masks: list[np.ndarray] = dataclasses.field(default_factory=list)


def evaluate_model(
    model_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    categories: Sequence[str] | None = None,
    on_bad_image: str = "error",
    resources: Resources | None = None,
) -> dict[str, Any]:
    """Scores the test split of `data`; writes `metrics.json`, `report.md` and heatmaps to `out_dir`."""
    config = read_config(model_dir)
    test = split_samples(discover(data, categories), "test")
    validation = validate(test, on_bad_image)
    ensure_ray()
    resources = resources or plan_resources()
    out_dir = Path(out_dir)
    per_category: dict[str, _CategoryScores] = defaultdict(_CategoryScores)
    extract_ms, score_ms, done = [], [], 0
    scored = score_dataset(str(model_dir), validation.samples, resources, masks=True)
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        for row in range(len(batch["image"])):
            scores = per_category[batch["category"][row]]
            scores.images.append(str(batch["image"][row]))
            scores.labels.append(int(batch["label"][row]))
            scores.scores.append(float(batch["image_score"][row]))
            scores.maps.append(batch["anomaly_map"][row])
            scores.masks.append(batch["gt_mask"][row].astype(bool))
        extract_ms += list(batch["extract_ms"])
        score_ms += list(batch["score_ms"])
        done += len(batch["image"])
        if done % log_every(len(validation.samples)) < len(batch["image"]) or done == len(validation.samples):
            progress(f"evaluate {config.method}", done, len(validation.samples))

    category_metrics, heatmaps = {}, {}
    for category, scores in sorted(per_category.items()):
        category_metrics[category] = compute_metrics(
            np.array(scores.labels), np.array(scores.scores), np.stack(scores.masks), np.stack(scores.maps)
        )
        heatmaps[category] = _write_heatmaps(out_dir, category, scores, config.threshold)
    metrics = {
        "method": config.method,
        "backbone": config.spec.backbone,
        "categories": category_metrics,
        "mean": mean_metrics(category_metrics),
        "timing": {
            "extract_ms_per_image": float(np.mean(extract_ms)),
            "score_ms_per_image": float(np.mean(score_ms)),
            "fit_s": config.fit.fit_s,
            "bank_vectors": config.bank_vectors,
            "bank_bytes": config.bank_bytes,
        },
        "threshold": config.threshold,
        "skipped": validation.skipped,
        "skipped_in_fit": config.fit.skipped,
    }
    write_json(out_dir / "metrics.json", metrics)
    skipped = validation.skipped + [{**entry, "problem": f"{entry['problem']} (skipped in fit)"}
                                    for entry in metrics["skipped_in_fit"]]
    (out_dir / "report.md").write_text(method_report(metrics, heatmaps, skipped))
    return metrics | {"heatmaps": heatmaps}


def _write_heatmaps(out_dir: Path, category: str, scores: _CategoryScores, threshold: float | None) -> list[dict]:
    order = np.argsort(scores.scores)
    picks = list(order[::-1][:HEATMAPS_PER_END]) + [i for i in order[:HEATMAPS_PER_END] if i not in
                                                    order[::-1][:HEATMAPS_PER_END]]
    entries = []
    for rank, index in enumerate(picks):
        relative = Path("heatmaps") / category / f"{rank:02d}_{Path(scores.images[index]).stem}.png"
        anomaly_map = scores.maps[index]
        render_overlay(load_rgb(scores.images[index]), anomaly_map, *heatmap_scale(threshold, anomaly_map)).save(
            _parent(out_dir / relative)
        )
        label = "anomalous" if scores.labels[index] else "normal"
        entries.append({"path": relative.as_posix(), "score": scores.scores[index], "label": label,
                        "image": scores.images[index]})
    return entries


def predict_images(
    model_dir: str | Path, images: Sequence[str | Path], out_dir: str | Path, threshold: float | None = None,
    resources: Resources | None = None,
) -> list[dict[str, Any]]:
    """Scores `images`, writes overlay PNGs and `predictions.json` to `out_dir`; returns the predictions."""
    if not images:
        raise ValueError("predict needs at least one image")
    config = read_config(model_dir)
    threshold = config.threshold if threshold is None else threshold
    samples = validate([Sample(str(Path(image).resolve()), "", "test", 0) for image in images]).samples
    ensure_ray()
    resources = resources or plan_resources()
    out_dir = Path(out_dir)
    by_image: dict[str, dict[str, Any]] = {}
    for batch in score_dataset(str(model_dir), samples, resources).iter_batches(batch_size=None,
                                                                               batch_format="numpy"):
        for row in range(len(batch["image"])):
            image, anomaly_map = str(batch["image"][row]), batch["anomaly_map"][row]
            score = float(batch["image_score"][row])
            heatmap = _parent(out_dir / "heatmaps" / f"{len(by_image):04d}_{Path(image).stem}.png")
            render_overlay(load_rgb(image), anomaly_map, *heatmap_scale(threshold, anomaly_map)).save(heatmap)
            by_image[image] = {
                "image": image,
                "score": score,
                "is_anomalous": None if threshold is None else bool(score > threshold),
                "threshold": threshold,
                "heatmap": str(heatmap),
            }
    predictions = [by_image[sample.image] for sample in samples]
    write_json(out_dir / "predictions.json", predictions)
    return predictions


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
