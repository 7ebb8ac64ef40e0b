"""The validation split: normal training images held out to choose settings, each also scored with a painted defect.

Choosing settings (`reconray tune`, RLR checkpoint selection, defaults) must never look at the test split, or the
reported test metrics would be tuned on. This module is the one place that split is made; it opens only training
images and refuses any sample of another split.

Carving (`carve`), per category of normal training images:
    calibration  exactly the images `calibration_split` holds out for `fit_model`'s threshold, so a trial's
                 threshold comes from the images `fit_model` would use.
    validation   `validation_ratio` of the category's images (at least two, so that a ranking exists), taken
                 from the rest in the order of a sha1 of each image's path relative to the category's common folder.
                 Where every image of a category lies in one folder (MVTec AD, plain folders) that key is the file
                 name, the very key `calibration_split` hashes. Where names repeat across folders (KolektorSDD's
                 `kos01/Part0.jpg`, `kos02/Part0.jpg`, ...) the name alone would put every copy of one part
                 position into the slice, so the folder stays in the key; the path is relative so the split is
                 the same on every machine and mount point.
    fit          the rest.
The input is put in path order before `calibration_split` sees it: it breaks ties between equal file names by input
order, and path order is what `discover` yields for folder layouts and for CSVs listed in path order (MTD, KSDD).
The calibration share is not a parameter: another share would no longer be the images `fit_model` holds out.

Painting (`paint_validation_set`), per category: every validation image is scored twice, as the normal image it is
(referenced in place) and as a copy with one painted defect. Pairs double both classes of the objective over painting
half the images and keeping the other half normal (the split this replaced), at no cost in fit images, and each painted
image differs from a normal one of the split by its defect alone; with a few dozen validation images per category, the
objective's noise decided among near-tied settings (benchmarks/RESULTS.md, "Hyperparameter sweeps"). Kinds and their
shares are `DEFECT_SHARES`, sizes are drawn log-uniformly over `AREA_FRACTION`. A painted image keeps its source's size;
it is written as PNG (lossless, so the mask stays exact), grey-scale when the source is grey, so a grey camera's defect
stays grey. The mask is exact by construction: the pixels where some channel changed by more than `CHANGE_TOLERANCE`,
plus the holes they enclose in the painted region's core (a pasted patch or a texture blob has pixels that happen to
match the source; a person would mark the whole region, as MVTec AD's masks do). Every change outside the mask is
undone, so there the image equals its source bit for bit. A draw that changes too little (a colour shift on a black
region, a patch pasted onto a look-alike) is redrawn, so no mask is empty. Every image's draw comes from its own
generator keyed by the seed and its path, so the files are byte-identical for the same inputs and seed.
`validation.json` in `out_dir` records the seed, the constants, and per image its kind, mask share, source and donor
(written files relative to `out_dir`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from reconray.methods.base import AnomalyMethod
from reconray.methods.errors import DatasetError, OptionError
from reconray.methods.metrics import compute_metrics, mean_metrics
from reconray.methods.scoring import content_mask, score_features
from reconray.pipelines.datasets import NORMAL, Sample, decode_rgb
from reconray.pipelines.ingest import level_tensors
from reconray.pipelines.storage import is_uri, joined, staged_output

logger = logging.getLogger(__name__)

CALIBRATION_RATIO = 0.1
"""Share of each category's normal training images held out of the fit to calibrate the threshold."""
MAX_CALIBRATION_IMAGES = 250
"""Most images a category holds out for its threshold. A 0.99 quantile of n normal scores leaves a false-alarm rate
of 1% give or take sqrt(0.01 * 0.99 / n): 0.6 points at 250, 0.3 only at 1,000. More images than this buy little
certainty while each one is scored against the whole bank, whose search grows with the data, so without a cap
calibration grows faster than the fit (N^1.5); the images beyond it are fitted instead."""
VALIDATION_RATIO = 0.2
"""Share of each category's normal training images held out for validation: with calibration's 10%, 70% is fitted."""
DEFECT_SHARES: dict[str, float] = {
    "cutpaste": 0.25,
    "noise": 0.25,
    "scratch": 0.25,
    "color": 0.125,
    "brightness": 0.125,
}
"""Share of painted images per defect kind. Which defects a line will show is unknown, so each of the four families
(foreign structure pasted from another part, texture blobs, scratches and thin lines, colour or brightness changes)
gets a quarter and no family dominates the objective; colour and brightness split their quarter. A grey source gets
a brightness change instead of a colour change (a grey camera cannot see hue)."""
AREA_FRACTION = (1e-4, 0.25)
"""Defect area as a share of the image, drawn log-uniformly (as many defects per decade of size, so neither tiny nor
large ones dominate). 1e-4 of the image is a few pixels at the backbone's input (6.5 at 256 x 256); a quarter of the
image is as large as MVTec AD's large defects. A scratch takes its length from it (twice the side of that area)."""
MIN_DEFECT_PIXELS = 4
"""Fewest changed pixels a painted defect may have (the area floor on small images, and the redraw test)."""
CHANGE_TOLERANCE = 4
"""A pixel is defect when some channel changed by more than this (of 255): below it a change is invisible, within
sensor noise, and asking a method to find it would only add noise to the objective."""
ACCEPTED_SHARE = 0.25
"""A draw is kept when at least this share of the pixels it touched changed beyond the tolerance, else redrawn."""
MAX_ATTEMPTS = 64
"""Draws tried per kind before falling back to a noise blob, which changes any image."""
MANIFEST = "validation.json"

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_SCRATCH_SUPERSAMPLING = 4

Box = tuple[slice, slice]
Shape = Callable[[np.random.Generator, int, int, float], tuple[Box, np.ndarray]]
"""Draws where a defect goes: (rng, height, width, area) -> the pixel box and the opacity map in it."""
Target = Callable[[np.random.Generator, np.ndarray, np.ndarray | None], np.ndarray]
"""What the pixels of a crop become where the opacity is 1: (rng, crop, donor image or None) -> float crop."""


def calibration_split(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Holds out `CALIBRATION_RATIO` of each category's images (at least one when it has two or more, at most
    `MAX_CALIBRATION_IMAGES`).

    The choice is by a hash of the file name, not by order, so it is stable across runs and machines and not
    biased by how files were numbered.
    """
    fit, held_out = [], []
    for category in sorted({sample.category for sample in samples}):
        members = sorted(
            (sample for sample in samples if sample.category == category),
            key=lambda sample: hashlib.sha1(Path(sample.image).name.encode()).hexdigest(),
        )
        count = min(MAX_CALIBRATION_IMAGES, max(1, round(len(members) * CALIBRATION_RATIO))) if len(members) >= 2 else 0
        held_out += members[:count]
        fit += members[count:]
    return fit, held_out



@dataclasses.dataclass(frozen=True)
class Carving:
    """Disjoint slices of the normal training images, each in category then path order.

    Attributes:
        fit: what a trial fits on.
        calibration: what calibrates the threshold (exactly `fit.calibration_split`'s held-out images).
        validation: what settings are chosen on, as is and with a defect painted on each (`paint_validation_set`).
    """

    fit: list[Sample]
    calibration: list[Sample]
    validation: list[Sample]


def carve(samples: Sequence[Sample], validation_ratio: float = VALIDATION_RATIO) -> Carving:
    """Splits normal training images into fit, calibration and validation slices, per category, by stable hashes.

    Args:
        samples: normal training images of one or more categories; anything else raises `DatasetError` naming it.
        validation_ratio: share of each category's images to validate on (at least two are taken).

    Raises:
        DatasetError: a sample that is not a normal training image, a duplicate, or a category too small to leave at
            least one fit, one calibration and two validation images (the message names it).
    """
    if not 0 < validation_ratio < 1 - CALIBRATION_RATIO:
        raise OptionError(f"validation_ratio={validation_ratio} is out of range (0 to {1 - CALIBRATION_RATIO:g}, "
                          f"exclusive: {CALIBRATION_RATIO:g} of the images calibrate the threshold)")
    ordered = _normal_training(samples)
    rest, calibration = calibration_split(ordered)
    keys = _stable_keys(ordered)
    fit, validation = [], []
    for category, members in _by_category(rest).items():
        total = sum(sample.category == category for sample in ordered)
        held_out = total - len(members)
        count = max(2, round(total * validation_ratio))
        if held_out < 1 or len(members) - count < 1:
            raise DatasetError(
                f"category {category!r}: {total} normal training images are too few to hold out {held_out} for "
                f"calibration and {count} for validation and fit the rest; it needs at least one fit, one "
                "calibration and two validation images"
            )
        members = sorted(members, key=lambda sample: _digest(keys[sample]))
        validation += sorted(members[:count], key=lambda sample: sample.image)
        fit += sorted(members[count:], key=lambda sample: sample.image)
    logger.info("carved %d normal training images: %d fit, %d calibration, %d validation", len(ordered), len(fit),
                len(calibration), len(validation))
    return Carving(fit, calibration, validation)


def paint_validation_set(validation: Sequence[Sample], out_dir: str | Path, seed: int = 0) -> list[Sample]:
    """Paints one defect on a copy of every validation image and writes the copies with their masks.

    Writes `<out_dir>/<category>/<kind>/<nnn>_<stem>.png`, its mask `<out_dir>/<category>/ground_truth/<kind>/
    <nnn>_<stem>_mask.png` (0/255) and `<out_dir>/validation.json`; normal images are not copied.

    Args:
        validation: normal training images, usually `carve(...).validation`.
        out_dir: folder to write into; created if missing. Files already there are left alone: the returned samples
            and `validation.json` say which files are this set.
        seed: which defect each image gets; the same inputs and seed give byte-identical files.

    Raises:
        DatasetError: a sample that is not a normal training image, or a category with fewer than two images (one
            normal image against its own painted copy is no ranking to choose settings on).

    Returns:
        Samples in category then path order, each normal image followed by its painted copy, with split "test":
        what `datasets.validate` checks masks for and what the scoring code reads as ground truth (label 1, the
        defect kind and the mask for a painted image; label 0 and the source image for a normal one). None of them
        is an image of the test split.
    """
    out_dir = Path(out_dir)
    painted: list[Sample] = []
    entries: list[dict] = []
    for category, members in _by_category(_normal_training(validation)).items():
        if len(members) < 2:
            raise DatasetError(f"category {category!r}: {len(members)} validation image; at least two are needed to "
                               "rank painted images above normal ones")
        rng = np.random.default_rng([seed, _digest(category)])
        kinds = _quota(rng, len(members))
        keys = _stable_keys(members)
        for index, sample in enumerate(members):
            painted.append(Sample(sample.image, category, "test", 0))
            entries.append({"image": sample.image, "category": category, "label": 0, "defect": NORMAL,
                            "source": sample.image})
            sample_rng = np.random.default_rng([seed, _digest(category), _digest(keys[sample])])
            donor = members[(index + 1 + int(sample_rng.integers(len(members) - 1))) % len(members)]
            source = decode_rgb(sample.image)
            grey = bool(np.all(source == source[..., :1]))
            kind = "brightness" if grey and kinds[index] == "color" else kinds[index]
            result = _paint(source, kind, sample_rng, decode_rgb(donor.image) if kind == "cutpaste" else None, grey)
            if result is None:
                raise DatasetError(f"{sample.image}: no defect changed it visibly in {MAX_ATTEMPTS} draws of "
                                   f"{kind!r} and of 'noise'; is the image blank?")
            image, mask, kind = result
            name = f"{index:03d}_{Path(sample.image).stem}"
            image_path = out_dir / category / kind / f"{name}.png"
            mask_path = out_dir / category / "ground_truth" / kind / f"{name}_mask.png"
            _write_png(image_path, np.ascontiguousarray(image[..., 0]) if grey else image)
            _write_png(mask_path, mask.astype(np.uint8) * 255)
            painted.append(Sample(str(image_path), category, "test", 1, kind, str(mask_path)))
            entries.append({"image": image_path.relative_to(out_dir).as_posix(), "category": category, "label": 1,
                            "defect": kind, "mask": mask_path.relative_to(out_dir).as_posix(), "source": sample.image,
                            "donor": donor.image if kind == "cutpaste" else None,
                            "area_fraction": round(float(mask.mean()), 7)})
    manifest = {"generator": __name__, "seed": seed, "defect_shares": DEFECT_SHARES,
                "area_fraction": list(AREA_FRACTION), "change_tolerance": CHANGE_TOLERANCE, "images": entries}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info("painted a copy of each of %d validation images into %s (seed %d)", len(entries) // 2, out_dir, seed)
    return painted


# ---- carving --------------------------------------------------------------------------------------------------


VALIDATION_METRICS = ("mean_auroc", "image_auroc", "pixel_auroc", "aupro", "pixel_ap")
"""What `validation_metrics` reports; `mean_auroc` (the mean of image and pixel AUROC) is the default objective."""


def paint_validation_split(validation: Sequence[Sample], target: str | Path, seed: int = 0) -> list[Sample]:
    """`paint_validation_set` into `target`, a folder or a URI, with the split's `split.csv` beside the images.

    For a URI the images are painted in a local staging folder and uploaded, and the samples returned name the
    uploaded objects: the workers of every node read them from there.
    """
    if not is_uri(target):
        painted = paint_validation_set(validation, target, seed=seed)
        write_split_csv(painted, Path(target) / "split.csv")
        return painted
    with staged_output(str(target)) as local:
        painted = paint_validation_set(validation, local, seed=seed)
        write_split_csv(painted, local / "split.csv")
    return [_moved(sample, local, str(target)) for sample in painted]


def _moved(sample: Sample, local: Path, uri: str) -> Sample:
    """`sample` with its files under the folder `local` named where they were uploaded to, under `uri`."""
    def moved(location: str | None) -> str | None:
        inside = location is not None and Path(location).is_relative_to(local)
        return joined(uri, Path(location).relative_to(local).as_posix()) if inside else location

    return dataclasses.replace(sample, image=moved(sample.image), mask=moved(sample.mask))


def validation_metrics(method: AnomalyMethod, batches: Sequence[dict[str, np.ndarray]], image_size: int) -> dict:
    """Scores feature batches of the painted validation split and returns `VALIDATION_METRICS`, means over categories.

    The batches carry the `level_<n>` feature columns plus `category`, `label`, `content` and `gt_mask`; scoring
    goes through
    `methods.scoring.score_features`, the path every entry point uses, so a tune trial and RLR's checkpoint selection
    measure exactly what `reconray evaluate` on the validation split would.
    """
    size = (image_size, image_size)
    per_category: dict[str, dict[str, list]] = {}
    for batch in batches:
        scores, maps, _ = score_features(method, level_tensors(batch), size, content=batch["content"])
        for row, category in enumerate(batch["category"]):
            entry = per_category.setdefault(str(category), {"labels": [], "scores": [], "masks": [], "maps": [],
                                                            "content": []})
            entry["labels"].append(int(batch["label"][row]))
            entry["scores"].append(float(scores[row]))
            entry["masks"].append(np.asarray(batch["gt_mask"][row], dtype=bool))
            entry["maps"].append(maps[row].numpy())
            entry["content"].append(batch["content"][row])
    metrics = mean_metrics({category: compute_metrics(np.array(entry["labels"]), np.array(entry["scores"]),
                                                       np.stack(entry["masks"]), np.stack(entry["maps"]),
                                                       content_mask(np.stack(entry["content"]), size).numpy())
                            for category, entry in per_category.items()})
    image_auroc, pixel_auroc = metrics["image_auroc"], metrics["pixel_auroc"]
    mean = None if image_auroc is None or pixel_auroc is None else (image_auroc + pixel_auroc) / 2
    return {"mean_auroc": mean, **{name: metrics[name] for name in VALIDATION_METRICS[1:]}}


def _normal_training(samples: Sequence[Sample]) -> list[Sample]:
    """The samples in category then path order; refuses anything but distinct normal training images."""
    if not samples:
        raise DatasetError("no normal training images given for the validation split")
    seen: set[tuple[str, str]] = set()
    for sample in samples:
        if sample.split != "train" or sample.label != 0:
            raise DatasetError(f"{sample.image}: a {sample.split} image labelled {sample.label}; the validation split "
                               "is carved from normal training images only and never reads the test split")
        if (sample.category, sample.image) in seen:
            raise DatasetError(f"{sample.image}: given twice for category {sample.category!r}")
        seen.add((sample.category, sample.image))
    return sorted(samples, key=lambda sample: (sample.category, sample.image))


def _by_category(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    """Samples grouped by category, categories sorted, each group in input order."""
    groups: dict[str, list[Sample]] = {}
    for sample in sorted(samples, key=lambda sample: sample.category):
        groups.setdefault(sample.category, []).append(sample)
    return groups


def _stable_keys(samples: Sequence[Sample]) -> dict[Sample, str]:
    """Each image's path relative to the folder its category's images share: the same on every machine and mount."""
    keys = {}
    for members in _by_category(samples).values():
        paths = [os.path.abspath(sample.image) for sample in members]
        root = os.path.commonpath([os.path.dirname(path) for path in paths])
        keys |= {sample: Path(os.path.relpath(path, root)).as_posix()
                 for sample, path in zip(members, paths, strict=True)}
    return keys


def _digest(text: str) -> int:
    """A stable integer for `text` (sha1, the hash `calibration_split` orders by)."""
    return int(hashlib.sha1(text.encode()).hexdigest(), 16)


# ---- painting -------------------------------------------------------------------------------------------------


def _quota(rng: np.random.Generator, count: int) -> list[str]:
    """`count` kinds in `DEFECT_SHARES` proportions (largest remainders, ties at random), in random order."""
    exact = np.array(list(DEFECT_SHARES.values())) * count
    counts = np.floor(exact).astype(int)
    by_remainder = np.lexsort((rng.random(len(exact)), -(exact - counts)))
    counts[by_remainder[: count - counts.sum()]] += 1
    kinds = [kind for kind, n in zip(DEFECT_SHARES, counts, strict=True) for _ in range(n)]
    return [kinds[i] for i in rng.permutation(count)]


def _paint(
    source: np.ndarray, kind: str, rng: np.random.Generator, donor: np.ndarray | None, grey: bool
) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Paints one visible defect of `kind` on `source`; returns the image, its exact mask and the kind painted.

    When `MAX_ATTEMPTS` draws of `kind` change too little (a flat image, a donor identical to the source), a noise
    blob is painted instead; None when that fails too. A `grey` source stays grey.
    """
    height, width = source.shape[:2]
    if donor is not None and donor.shape != source.shape:
        donor = np.asarray(Image.fromarray(donor).resize((width, height), Image.Resampling.BILINEAR))
    low, high = (math.log(max(MIN_DEFECT_PIXELS, fraction * height * width)) for fraction in AREA_FRACTION)
    for tried in dict.fromkeys((kind, "noise")):
        shape, target = _KINDS[tried]
        for _ in range(MAX_ATTEMPTS):
            box, alpha = shape(rng, height, width, math.exp(rng.uniform(low, high)))
            crop = source[box].astype(np.float32)
            blended = crop + alpha[..., None] * (target(rng, crop, donor) - crop)
            if grey:
                blended = np.repeat(blended @ _LUMA[:, None], 3, axis=2)
            quantized = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
            changed = np.abs(quantized.astype(np.int16) - source[box]).max(axis=2) > CHANGE_TOLERANCE
            if changed.sum() >= max(MIN_DEFECT_PIXELS, ACCEPTED_SHARE * np.count_nonzero(alpha)):
                region = changed | (ndimage.binary_fill_holes(changed) & (alpha >= 0.5))
                image, mask = source.copy(), np.zeros((height, width), dtype=bool)
                image[box] = np.where(region[..., None], quantized, source[box])
                mask[box] = region
                return image, mask, tried
    return None


def _blob(soft: float) -> Shape:
    """A shape maker for irregular elliptical blobs whose opacity falls to 0 over `soft` of the radius."""

    def shape(rng: np.random.Generator, height: int, width: int, area: float) -> tuple[Box, np.ndarray]:
        aspect = rng.uniform(0.3, 1.0)
        major = math.sqrt(area / (math.pi * aspect))
        centre_y, centre_x = rng.uniform(0, height), rng.uniform(0, width)
        box = _box(centre_y - 1.5 * major, centre_y + 1.5 * major, centre_x - 1.5 * major, centre_x + 1.5 * major,
                   height, width)
        y, x = (axis.astype(np.float32) + 0.5 for axis in np.mgrid[box])
        tilt = rng.uniform(0, math.pi)
        along = (x - centre_x) * math.cos(tilt) + (y - centre_y) * math.sin(tilt)
        across = (y - centre_y) * math.cos(tilt) - (x - centre_x) * math.sin(tilt)
        theta = np.arctan2(across, along)
        wobble = sum(rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * math.pi)) for k in range(2, 6))
        distance = np.hypot(along / major, across / (aspect * major)) / (1 + wobble)
        return box, np.clip((1 - distance) / soft, 0, 1).astype(np.float32)

    return shape


def _stroke(rng: np.random.Generator, height: int, width: int, area: float) -> tuple[Box, np.ndarray]:
    """A thin line, straight to curly, twice as long as the side of `area`, drawn supersampled (anti-aliased)."""
    length = min(2 * math.sqrt(area), math.hypot(height, width))
    thickness = math.exp(rng.uniform(0, math.log(max(1.5, 0.012 * min(height, width)))))
    steps = 16
    heading = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, rng.uniform(0, 0.3), steps))
    start = np.array([rng.uniform(0, width), rng.uniform(0, height)])
    points = np.vstack([start, start + np.cumsum(np.stack([np.cos(heading), np.sin(heading)], 1), 0) * length / steps])
    box = _box(points[:, 1].min() - thickness, points[:, 1].max() + thickness, points[:, 0].min() - thickness,
               points[:, 0].max() + thickness, height, width)
    rows, cols = box
    scale = _SCRATCH_SUPERSAMPLING
    size = ((cols.stop - cols.start) * scale, (rows.stop - rows.start) * scale)
    canvas = Image.new("L", size, 0)
    origin = np.array([cols.start, rows.start])
    ImageDraw.Draw(canvas).line([tuple(p) for p in (points - origin) * scale], fill=255,
                                width=max(1, round(thickness * scale)), joint="curve")
    line = canvas.resize((size[0] // scale, size[1] // scale), Image.Resampling.BOX)
    return box, np.asarray(line, dtype=np.float32) / 255


def _box(top: float, bottom: float, left: float, right: float, height: int, width: int) -> Box:
    """The pixel rows and columns covering a float rectangle, clipped to the image (never empty)."""
    first_row, first_col = min(max(0, math.floor(top)), height - 1), min(max(0, math.floor(left)), width - 1)
    rows = slice(first_row, max(first_row + 1, min(height, math.ceil(bottom))))
    return rows, slice(first_col, max(first_col + 1, min(width, math.ceil(right))))


def _cutpaste(rng: np.random.Generator, crop: np.ndarray, donor: np.ndarray | None) -> np.ndarray:
    """A patch of another normal image of the category, from anywhere in it, maybe flipped: foreign structure."""
    height, width = crop.shape[:2]
    top = int(rng.integers(donor.shape[0] - height + 1))
    left = int(rng.integers(donor.shape[1] - width + 1))
    patch = donor[top : top + height, left : left + width].astype(np.float32)
    return patch[:: rng.choice([-1, 1]), :: rng.choice([-1, 1])]


def _noise(rng: np.random.Generator, crop: np.ndarray, donor: np.ndarray | None) -> np.ndarray:
    """A texture blob: random base colour plus smooth noise at a random grain, from single pixels to the blob."""
    height, width = crop.shape[:2]
    cell = math.exp(rng.uniform(0, math.log(max(1.5, min(height, width) / 2))))
    coarse = rng.standard_normal((math.ceil(height / cell) + 1, math.ceil(width / cell) + 1), dtype=np.float32)
    grain = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC))
    texture = rng.uniform(0, 255, 3).astype(np.float32) + rng.uniform(10, 60) * grain[..., None]
    return crop + rng.uniform(0.5, 1.0) * (texture - crop)


def _scratch(rng: np.random.Generator, crop: np.ndarray, donor: np.ndarray | None) -> np.ndarray:
    """A dark or bright mark (the shape is the stroke)."""
    value = rng.uniform(0, 60) if rng.random() < 0.5 else rng.uniform(190, 255)
    return crop + rng.uniform(0.5, 1.0) * (value - crop)


def _color(rng: np.random.Generator, crop: np.ndarray, donor: np.ndarray | None) -> np.ndarray:
    """A discolouration: brightness kept, hue pulled towards a random tint."""
    hue = rng.uniform(0, 1)
    tint = np.clip(np.abs(((hue + np.array([0, 2 / 3, 1 / 3])) % 1) * 6 - 3) - 1, 0, 1).astype(np.float32)
    tint = 1 + rng.uniform(0.4, 0.9) * (tint - 1)
    luma = crop @ _LUMA[:, None]
    return crop + rng.uniform(0.4, 1.0) * (luma * tint / float(tint @ _LUMA) - crop)


def _brightness(rng: np.random.Generator, crop: np.ndarray, donor: np.ndarray | None) -> np.ndarray:
    """A darker or brighter area (gain and offset, so black and white regions change too)."""
    gain = math.exp(rng.uniform(math.log(1.25), math.log(2.5)) * rng.choice([-1, 1]))
    return crop * gain + rng.uniform(-40, 40)


_KINDS: dict[str, tuple[Shape, Target]] = {
    "cutpaste": (_blob(soft=0.1), _cutpaste),
    "noise": (_blob(soft=0.3), _noise),
    "scratch": (_stroke, _scratch),
    "color": (_blob(soft=0.6), _color),
    "brightness": (_blob(soft=0.6), _brightness),
}
"""Per kind: where it paints (opacity map) and what the pixels become there (the target, blended by the opacity)."""


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def write_split_csv(samples: Sequence[Sample], path: str | Path) -> Path:
    """Writes `samples` as a VisA-style split CSV (`object,split,label,image,mask`), so that `reconray evaluate
    --data <csv>` scores exactly the validation split a sweep was scored on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        for sample in samples:
            writer.writerow([sample.category, sample.split, "anomaly" if sample.label else "normal",
                             _relative_to(sample.image, path.parent), _relative_to(sample.mask, path.parent)])
    return path


def _relative_to(file: str | None, folder: Path) -> str:
    """`file` relative to `folder` when it lies inside it (a portable CSV), else its absolute path or its URI."""
    if not file or is_uri(file):
        return file or ""
    resolved = Path(file).resolve()
    try:
        return resolved.relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(resolved)
