"""Real data: patchcore on a subset of the Magnetic-tile defect (MTD) split, fitted and evaluated on a local Ray.

The subset keeps CI fast: 80 normal training rows (8 of them held out for the threshold) and 70 test rows, 30
normal and 8 of each of the five defect types, all picked evenly over the split's rows. MTD's normal tiles vary a
lot, so a 72-image bank scores well below the full-split floor (image AUROC 0.92, measured with all 736 training
rows) but far above chance: this subset measured image AUROC 0.754 and pixel AUROC 0.845, and the floors
below keep a margin of about 0.1 under that.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from reconray.pipelines.evaluate import evaluate_model
from reconray.pipelines.fit import fit_model

MTD_SPLIT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd" / "split.csv"
DEFECT_TYPES = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
N_TRAIN, N_NORMAL, N_PER_DEFECT = 80, 30, 8
IMAGE_AUROC_FLOOR, PIXEL_AUROC_FLOOR = 0.65, 0.75


def _evenly(rows: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    assert len(rows) >= count, f"{MTD_SPLIT} has {len(rows)} rows of a kind, {count} needed"
    return [rows[index] for index in np.linspace(0, len(rows) - 1, count).round().astype(int)]


@pytest.fixture(scope="module")
def mtd_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VisA-style CSV of the subset, with absolute paths so it can live outside the (read-only) data folder."""
    assert MTD_SPLIT.is_file(), f"the MTD split is missing: {MTD_SPLIT}"
    with MTD_SPLIT.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = [row for row in rows if row["split"] == "train"]
    normal = [row for row in rows if row["split"] == "test" and row["label"] == "normal"]
    chosen = _evenly(train, N_TRAIN) + _evenly(normal, N_NORMAL)
    for defect in DEFECT_TYPES:
        chosen += _evenly([row for row in rows if row["label"] == "anomaly" and row["image"].startswith(defect)],
                          N_PER_DEFECT)
    root = MTD_SPLIT.parent
    subset = tmp_path_factory.mktemp("mtd") / "subset.csv"
    with subset.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        for row in chosen:
            writer.writerow(row | {"image": str(root / row["image"]), "mask": str(root / row["mask"]) if row["mask"]
                                   else ""})
    return subset


def test_patchcore_on_mtd_is_well_above_chance(ray_session, mtd_subset: Path, tmp_path: Path) -> None:
    fitted = fit_model(mtd_subset, "patchcore", tmp_path / "model", image_size=256)
    assert (fitted.n_fit, fitted.n_calibration) == (N_TRAIN - N_TRAIN // 10, N_TRAIN // 10)
    metrics = evaluate_model(fitted.model_dir, mtd_subset, tmp_path / "evaluation")
    tiles = metrics["categories"]["magnetic_tile"]
    print(f"MTD subset: {tiles}")
    assert (tiles["n_images"], tiles["n_anomalous"]) == (N_NORMAL + N_PER_DEFECT * len(DEFECT_TYPES),
                                                         N_PER_DEFECT * len(DEFECT_TYPES))
    assert tiles["image_auroc"] > IMAGE_AUROC_FLOOR
    assert tiles["pixel_auroc"] > PIXEL_AUROC_FLOOR
    assert metrics["timing"]["bank_vectors"] == fitted.n_fit * 32 * 32
