"""Evaluate and predict: score images with a saved artifact in Ray Data, then metrics, heatmaps and reports.

Both go through `ingest.score_dataset`, whose actors run `methods.scoring.Scorer` (the one scoring path), so a score
here equals the score `reconray serve` returns for the same image.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reconray.methods.artifact import ArtifactConfig, read_config
from reconray.methods.errors import DatasetError, OptionError
from reconray.methods.metrics import compute_metrics, mean_metrics
from reconray.methods.scoring import content_mask, is_anomalous
from reconray.pipelines.console import stage
from reconray.pipelines.datasets import (
    IMAGE_SUFFIXES,
    Sample,
    Validation,
    decode_rgb,
    discover,
    images_in,
    split_samples,
    validate,
)
from reconray.pipelines.ingest import Resources, plan_resources, score_dataset
from reconray.pipelines.report import method_report, render_figure, safe_name, with_parent, write_json
from reconray.pipelines.runtime import ensure_ray
from reconray.pipelines.storage import (
    as_location,
    glob_locations,
    is_uri,
    joined,
    local_model,
    staged_output,
    storage_errors,
)

logger = logging.getLogger(__name__)

_GLOB_MAGIC = re.compile(r"[*?[]")

HEATMAPS_PER_END = 2
"""Heatmaps written per category: this many of the highest and of the lowest scored test images."""


@dataclasses.dataclass
class _CategoryScores:
    images: list[str] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)
    scores: list[float] = dataclasses.field(default_factory=list)
    maps: list[np.ndarray] = dataclasses.field(default_factory=list)
    masks: list[np.ndarray] = dataclasses.field(default_factory=list)
    has_mask: list[bool] = dataclasses.field(default_factory=list)
    content: list[np.ndarray] = dataclasses.field(default_factory=list)

    def entries(self) -> list[dict[str, Any]]:
        """One `{"image", "label", "score"}` per image: what ROC curves and later comparisons need."""
        return [{"image": image, "label": label, "score": score}
                for image, label, score in zip(self.images, self.labels, self.scores, strict=True)]


def evaluate_model(
    model_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    categories: Sequence[str] | None = None,
    on_bad_image: str = "error",
    resources: Resources | None = None,
) -> dict[str, Any]:
    """Scores the test split of `data`; writes `metrics.json`, `scores.json`, `report.md`, ROC plots and heatmap
    figures to `out_dir`.

    Returns the metrics of metrics.json plus `heatmaps` (per category, the figures' entries) and `scores` (per
    category, every image's `{"image", "label", "score"}`), which `comparison_report` takes to compare methods.
    """
    config = read_config(local_model(model_dir))
    test = split_samples(discover(data, categories), "test")
    validation = validate(test, on_bad_image)
    ensure_ray()
    resources = resources or plan_resources()
    with staged_output(out_dir) as local_out:
        metrics = _evaluate(config, str(model_dir), validation, resources, local_out)
    logger.info("evaluation of %s written to %s", config.method, out_dir)
    return metrics


def _evaluate(
    config: ArtifactConfig, model_dir: str, validation: Validation, resources: Resources, out_dir: Path
) -> dict[str, Any]:
    """`evaluate_model`'s scoring and writing, into a local folder."""
    per_category: dict[str, _CategoryScores] = defaultdict(_CategoryScores)
    extract_ms, score_ms = [], []
    scored = score_dataset(model_dir, validation.samples, resources, masks=True)
    with stage(f"evaluate {config.method}", total=len(validation.samples)) as advance:
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            _collect(batch, per_category)
            extract_ms += list(batch["extract_ms"])
            score_ms += list(batch["score_ms"])
            advance(len(batch["image"]))

    category_metrics, heatmaps, image_scores, decisions = {}, {}, {}, {}
    for category, scores in sorted(per_category.items()):
        maps = np.stack(scores.maps)
        category_metrics[category] = compute_metrics(np.array(scores.labels), np.array(scores.scores),
                                                     np.stack(scores.masks), maps,
                                                     content_mask(np.stack(scores.content), maps.shape[1:]).numpy())
        # a category the model was not fitted on (a cross-category check) is decided by the global threshold
        threshold = config.threshold_for(category if category in config.categories else None)
        decisions[category] = _decisions(scores, threshold)
        heatmaps[category] = _write_heatmaps(out_dir, category, scores, threshold)
        image_scores[category] = scores.entries()
    metrics = {
        "method": config.method,
        "backbone": config.spec.backbone,
        "features": {"levels": config.spec.levels, "image_size": config.spec.image_size,
                     "aggregation": config.spec.aggregation, "pool": config.spec.pool, "resize": config.spec.resize,
                     "tile": config.spec.tile},
        "categories": category_metrics,
        "mean": mean_metrics(category_metrics),
        "timing": {
            "extract_ms_per_image": float(np.mean(extract_ms)),
            "score_ms_per_image": float(np.mean(score_ms)),
            "fit_s": config.fit.fit_s,
            "fit_stages_s": config.fit.stages,
            "bank_vectors": config.bank_vectors,
            "bank_bytes": config.bank_bytes,
            "search": config.method_info.get("search"),
        },
        "threshold": config.threshold,
        "decisions": decisions,
        "skipped": validation.skipped,
        "skipped_in_fit": config.fit.skipped,
    }
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "scores.json", image_scores)
    skipped = validation.skipped + [{**entry, "problem": f"{entry['problem']} (skipped in fit)"}
                                    for entry in metrics["skipped_in_fit"]]
    (out_dir / "report.md").write_text(method_report(metrics, heatmaps, skipped, out_dir, image_scores))
    return metrics | {"heatmaps": heatmaps, "scores": image_scores}


def _collect(batch: dict[str, np.ndarray], per_category: dict[str, _CategoryScores]) -> None:
    """Files one scored batch's rows under their categories."""
    for row in range(len(batch["image"])):
        scores = per_category[batch["category"][row]]
        scores.images.append(str(batch["image"][row]))
        scores.labels.append(int(batch["label"][row]))
        scores.scores.append(float(batch["image_score"][row]))
        scores.maps.append(batch["anomaly_map"][row])
        scores.masks.append(batch["gt_mask"][row].astype(bool))
        scores.has_mask.append(bool(batch["mask"][row]))
        scores.content.append(batch["content"][row])


def _decisions(scores: _CategoryScores, threshold: float | None) -> dict[str, Any]:
    """What the threshold in force for a category decides on its test images: false alarms among the normal ones,
    defects caught among the anomalous ones (counts None without a threshold)."""
    verdicts = [is_anomalous(score, threshold) for score in scores.scores]
    normal = [verdict for verdict, label in zip(verdicts, scores.labels, strict=True) if not label]
    anomalous = [verdict for verdict, label in zip(verdicts, scores.labels, strict=True) if label]
    known = threshold is not None
    return {"threshold": threshold, "false_alarms": sum(normal) if known else None, "normal": len(normal),
            "caught": sum(anomalous) if known else None, "anomalous": len(anomalous)}


def _write_heatmaps(out_dir: Path, category: str, scores: _CategoryScores, threshold: float | None) -> list[dict]:
    """Figures of the `HEATMAPS_PER_END` highest and lowest scored images, each with its mask and true label."""
    order = np.argsort(scores.scores)
    picks = list(order[::-1][:HEATMAPS_PER_END]) + [i for i in order[:HEATMAPS_PER_END] if i not in
                                                    order[::-1][:HEATMAPS_PER_END]]
    entries = []
    for rank, index in enumerate(picks):
        relative = Path("heatmaps") / safe_name(category) / f"{rank:02d}_{Path(scores.images[index]).stem}.png"
        height, width = scores.content[index]
        render_figure(
            decode_rgb(scores.images[index]), scores.maps[index][:height, :width], scores.scores[index], threshold,
            mask=scores.masks[index][:height, :width] if scores.has_mask[index] else None, label=scores.labels[index],
        ).save(with_parent(out_dir / relative))
        label = "anomalous" if scores.labels[index] else "normal"
        entries.append({"path": relative.as_posix(), "score": scores.scores[index], "label": label,
                        "image": scores.images[index]})
    return entries


HEATMAP_CHOICES = ("none", "anomalous", "all")
JSON_MAX_IMAGES = 1000
"""`reconray predict --format auto` writes predictions.json up to this many images, predictions.parquet beyond."""
_PARQUET_SCHEMA = pa.schema([("index", pa.int64()), ("image", pa.string()), ("score", pa.float64()),
                             ("is_anomalous", pa.bool_()), ("threshold", pa.float64()), ("heatmap", pa.string())])


def predict_images(
    model_dir: str | Path, images: Sequence[str | Path], out_dir: str | Path, threshold: float | None = None,
    resources: Resources | None = None, category: str | None = None, heatmaps: str | None = None,
    output: str = "json",
) -> list[dict[str, Any]] | ParquetPredictions:
    """Scores `images` and writes their predictions and heatmap figures to `out_dir`.

    `images` may name files, folders, glob patterns and CSV lists, local or URIs (see `expand_images`); every image is
    scored once. A missing path or a pattern without a match raises `DatasetError` before any Ray work. The verdicts
    use `threshold` if given, else the threshold calibrated for `category` (an `OptionError` when the model was not
    fitted on it), else the model's global one; a model extended with `--add-to` also scores the images with the
    part fitted on `category`. `heatmaps` writes a figure for every image ("all"), the anomalous ones or none.

    `output="json"` writes `predictions.json` in the order the images were named and returns the predictions
    (heatmaps default "all"). `"parquet"` appends each scored batch to `predictions.parquet` as it arrives (an
    `index` column keeps the order), so the driver holds one batch however many images there are, and returns a
    `ParquetPredictions` summary (heatmaps default "anomalous"). `"auto"` is Parquet beyond `JSON_MAX_IMAGES`.
    """
    if output not in ("json", "parquet", "auto"):
        raise OptionError(f"output must be json, parquet or auto, got {output!r}")
    paths = expand_images(images)
    parquet = output == "parquet" or (output == "auto" and len(paths) > JSON_MAX_IMAGES)
    heatmaps = heatmaps or ("anomalous" if parquet else "all")
    if heatmaps not in HEATMAP_CHOICES:
        raise OptionError(f"heatmaps must be one of {HEATMAP_CHOICES}, got {heatmaps!r}")
    calibrated = read_config(local_model(model_dir)).threshold_for(category)
    threshold = calibrated if threshold is None else threshold
    samples = validate([Sample(str(path), category or "", "test", 0) for path in paths]).samples
    ensure_ray()
    resources = resources or plan_resources()
    with staged_output(out_dir) as local_out:
        batches = _predictions(str(model_dir), samples, threshold, resources, heatmaps, local_out, out_dir)
        written = _write_parquet(batches, local_out, out_dir) if parquet else _write_json(batches, local_out)
    logger.info("%d predictions written to %s", written.count if parquet else len(written),
                joined(out_dir, "predictions.parquet" if parquet else "predictions.json"))
    return written


@dataclasses.dataclass(frozen=True)
class ParquetPredictions:
    """Where a Parquet predict run wrote its predictions, how many, and how many were anomalous."""

    path: str
    count: int
    anomalous: int


def _write_json(batches: Iterator[list[dict[str, Any]]], local_out: Path) -> list[dict[str, Any]]:
    predictions = sorted((prediction for rows in batches for prediction in rows), key=lambda row: row["index"])
    for prediction in predictions:
        del prediction["index"]
    write_json(local_out / "predictions.json", predictions)
    return predictions


def _write_parquet(batches: Iterator[list[dict[str, Any]]], local_out: Path, out_dir: str | Path) -> ParquetPredictions:
    count = anomalous = 0
    with pq.ParquetWriter(with_parent(local_out / "predictions.parquet"), _PARQUET_SCHEMA) as writer:
        for rows in batches:
            writer.write_table(pa.Table.from_pylist(rows, schema=_PARQUET_SCHEMA))
            count += len(rows)
            anomalous += sum(bool(row["is_anomalous"]) for row in rows)
    return ParquetPredictions(joined(out_dir, "predictions.parquet"), count, anomalous)


def _predictions(
    model_dir: str, samples: list[Sample], threshold: float | None, resources: Resources, heatmaps: str,
    local_out: Path, out_dir: str | Path,
) -> Iterator[list[dict[str, Any]]]:
    """The predictions of each scored batch, with their input `index`; heatmap figures are written into `local_out`
    and named where they end up, `out_dir`."""
    position = {sample.image: index for index, sample in enumerate(samples)}
    scored = score_dataset(model_dir, samples, resources)
    with stage("predict", total=len(samples)) as advance:
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            rows = []
            for row in range(len(batch["image"])):
                image, score = str(batch["image"][row]), float(batch["image_score"][row])
                anomalous = is_anomalous(score, threshold)
                heatmap = None
                if heatmaps == "all" or (heatmaps == "anomalous" and anomalous):
                    height, width = batch["content"][row]
                    heatmap = f"heatmaps/{position[image]:04d}_{Path(image).stem}.png"
                    render_figure(decode_rgb(image), batch["anomaly_map"][row][:height, :width], score,
                                  threshold).save(with_parent(local_out / heatmap))
                rows.append({"index": position[image], "image": image, "score": score, "is_anomalous": anomalous,
                             "threshold": threshold, "heatmap": heatmap and joined(out_dir, heatmap)})
            advance(len(rows))
            yield rows


def expand_images(images: Sequence[str | Path]) -> list[Path]:
    """The image files that `reconray predict`'s arguments name, resolved, each once, in the order named.

    A file is taken as it is (validation reports it if it is not an image). A folder gives the image files directly
    in it (suffix in `IMAGE_SUFFIXES`, sorted), not those of its subfolders, so a dataset folder does not pull in its
    ground-truth masks; a pattern with `**` recurses on purpose. Any other argument with `*`, `?` or `[` is a glob
    pattern (`**` spans folders) and gives its matching image files, sorted. A `.csv` file is a list: its `image`
    column (or, without that header, its first column), paths relative to the CSV's folder. Each may be a URI.

    Raises:
        DatasetError: naming an argument that does not exist, a folder without images or a pattern that matches no
            image file; nothing is scored then.
    """
    if not images:
        raise DatasetError("predict needs at least one image, folder or pattern")
    found = [path for image in images for path in _images_named(str(image))]
    return list(dict.fromkeys(path.resolve() for path in found))


def _images_named(argument: str) -> list[Path]:
    """The image files of one predict argument (a file, a folder, a glob pattern or a CSV list); never empty."""
    path = as_location(argument) if is_uri(argument) else Path(argument).expanduser()
    with storage_errors(argument, DatasetError):
        return _images_at(argument, path)


def _images_at(argument: str, path: Any) -> list[Any]:
    suffixes = ", ".join(IMAGE_SUFFIXES)
    if path.is_dir():
        in_folder = images_in(path)
        if not in_folder:
            raise DatasetError(f"{path}: folder holds no image files (suffixes {suffixes})")
        return in_folder
    if path.suffix.lower() == ".csv" and path.is_file():
        return _images_listed(path)
    if path.exists():
        return [path]
    if not _GLOB_MAGIC.search(argument):
        raise DatasetError(f"{path}: no such file or folder")
    matches = glob_locations(str(path))
    matched = [match for match in matches if match.is_file() and match.suffix.lower() in IMAGE_SUFFIXES]
    if not matched:
        raise DatasetError(f"{argument}: pattern matches no image files (suffixes {suffixes})")
    return matched


def _images_listed(table: Any) -> list[Any]:
    """The images a CSV list names (its `image` column, else its first), relative to the CSV's folder."""
    with table.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row and row[0].strip()]
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    column = header.index("image") if "image" in header else 0
    named = [row[column].strip() for row in rows[1 if "image" in header else 0:] if len(row) > column]
    if not named:
        raise DatasetError(f"{table}: the CSV list names no images")
    return [as_location(name) if is_uri(name) or Path(name).is_absolute() else table.parent / name for name in named]
