"""Sample discovery for every supported on-disk layout, and the validation pass that runs before any heavy work.

Layouts (detected from the path):
    MVTec AD root        <root>/<category>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}
    MVTec AD category    the same, one category folder
    VisA-style CSV       object,split,label,image,mask (label "normal"/"anomaly", paths relative to the CSV)
    MVTec 3D-AD          <root>/<category>/{train/good/rgb, test/<defect>/{rgb,gt}} (RGB only; validation/ unused)
    plain folder         images directly in the folder: all normal training images (fit only)

Validation opens every image (and mask) once, so a bad file is reported by name before minutes of feature
extraction, and either stops the run (`on_bad_image="error"`) or is skipped and listed (`"skip"`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from reconray.methods.errors import DatasetError, OptionError
from reconray.pipelines.console import stage
from reconray.pipelines.storage import as_location, is_uri, open_binary, storage_errors

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
NORMAL = "good"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image of a dataset: where it is, which category and split it belongs to, and its ground truth."""

    image: str
    category: str
    split: str  # "train" or "test"
    label: int  # 0 normal, 1 anomalous
    defect: str = NORMAL
    mask: str | None = None


def discover(data: str | Path, categories: Sequence[str] | None = None) -> list[Sample]:
    """Finds every sample under `data`, whatever its layout; `categories` keeps a subset (all when None).

    `data` is a local path or a URI (`s3://bucket/prefix`): a bucket prefix is browsed exactly like a folder.
    """
    path = as_location(data)
    with storage_errors(data, DatasetError):
        if not path.exists():
            raise (FileNotFoundError(str(data)) if is_uri(data) else DatasetError(f"{path}: no such file or folder"))
        samples = _discover_layout(path)
    found = sorted({sample.category for sample in samples})
    if categories:
        missing = sorted(set(categories) - set(found))
        if missing:
            raise DatasetError(f"{path}: categories {missing} not found; available: {found}")
        samples = [sample for sample in samples if sample.category in set(categories)]
    return samples


def layout_of(path: Path) -> str:
    """Names the layout of `path`: mvtec, mvtec_category, mvtec3d, mvtec3d_category, csv or folder."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise DatasetError(f"{path}: a data file must be a VisA-style split .csv")
    if (path / "train").is_dir():
        return "mvtec3d_category" if (path / "train" / NORMAL / "rgb").is_dir() else "mvtec_category"
    category_dirs = [child for child in _subdirs(path) if (child / "train").is_dir()]
    if category_dirs:
        return "mvtec3d" if any((child / "train" / NORMAL / "rgb").is_dir() for child in category_dirs) else "mvtec"
    if images_in(path):
        return "folder"
    raise DatasetError(
        f"{path}: unknown layout; expected an MVTec AD / MVTec 3D-AD root or category folder, a VisA-style split "
        "CSV, or a folder of images"
    )


def _discover_layout(path: Path) -> list[Sample]:
    layout = layout_of(path)
    if layout == "csv":
        return _from_csv(path)
    if layout == "folder":
        return [Sample(str(image), path.name, "train", 0) for image in images_in(path)]
    rgb = layout.startswith("mvtec3d")
    if layout.endswith("category"):
        return _from_mvtec_category(path, rgb)
    return [
        sample
        for category in _subdirs(path)
        if (category / "train").is_dir()
        for sample in _from_mvtec_category(category, rgb)
    ]


def _from_mvtec_category(folder: Path, rgb: bool) -> list[Sample]:
    """MVTec AD (`rgb=False`) or MVTec 3D-AD (`rgb=True`) category folder."""
    category = folder.name
    leaf = "rgb" if rgb else ""
    samples = [Sample(str(image), category, "train", 0) for image in images_in(folder / "train" / NORMAL / leaf)]
    for defect_dir in _subdirs(folder / "test"):
        defect = defect_dir.name
        for image in images_in(defect_dir / leaf):
            if defect == NORMAL:
                samples.append(Sample(str(image), category, "test", 0))
                continue
            mask = (defect_dir / "gt" / image.name) if rgb else _mvtec_mask(folder, defect, image)
            samples.append(Sample(str(image), category, "test", 1, defect, str(mask)))
    return samples


def _mvtec_mask(folder: Path, defect: str, image: Path) -> Path:
    mask_dir = folder / "ground_truth" / defect
    for candidate in (mask_dir / f"{image.stem}_mask.png", mask_dir / f"{image.stem}.png"):
        if candidate.exists():
            return candidate
    return mask_dir / f"{image.stem}_mask.png"


def _from_csv(path: Path) -> list[Sample]:
    root = path.parent
    samples = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"object", "split", "label", "image"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{path}: missing columns {sorted(missing)}; expected object,split,label,image,mask")
        for line, row in enumerate(reader, start=2):
            split, label = row["split"].strip().lower(), row["label"].strip().lower()
            if split not in ("train", "test") or label not in ("normal", "anomaly"):
                raise DatasetError(
                    f"{path}:{line}: split must be train/test and label normal/anomaly, got {split!r}/{label!r}"
                )
            anomalous = int(label == "anomaly")
            mask = (row.get("mask") or "").strip()
            image = row["image"].strip()
            samples.append(
                Sample(
                    _csv_location(root, image),
                    row["object"].strip(),
                    split,
                    anomalous,
                    _csv_defect(image) if anomalous else NORMAL,
                    _csv_location(root, mask) if mask and anomalous else None,
                )
            )
    return samples


def _csv_location(root: Path, entry: str) -> str:
    """A CSV entry's file: a URI or an absolute path as written, else relative to the CSV's folder."""
    return entry if is_uri(entry) or Path(entry).is_absolute() else str(root / entry)


def _csv_defect(entry: str) -> str:
    """Defect name of a CSV row: the image's top folder under the CSV's folder (VisA, MTD name defects so), or for an
    absolute path or URI the folder it is in."""
    if is_uri(entry) or Path(entry).is_absolute():
        return PurePosixPath(entry).parent.name
    return PurePosixPath(entry).parts[0]


def _subdirs(folder: Path) -> list[Path]:
    return sorted(child for child in folder.iterdir() if child.is_dir()) if folder.is_dir() else []


def images_in(folder: Path) -> list[Path]:
    """The image files directly in `folder` (by suffix), sorted; none when it is not a folder."""
    if not folder.is_dir():
        return []
    return sorted(child for child in folder.iterdir() if child.suffix.lower() in IMAGE_SUFFIXES and child.is_file())


def split_samples(samples: Iterable[Sample], split: str) -> list[Sample]:
    """Keeps one split and refuses an empty one, naming the categories that have none."""
    samples = list(samples)
    chosen = [sample for sample in samples if sample.split == split]
    categories = sorted({sample.category for sample in samples})
    empty = sorted(set(categories) - {sample.category for sample in chosen})
    if not chosen or empty:
        raise DatasetError(f"empty {split} split for categories {empty or categories}: no {split} images found")
    return chosen


@dataclasses.dataclass
class Validation:
    """The usable samples and the bad ones skipped, each with the reason."""

    samples: list[Sample]
    skipped: list[dict[str, str]]


def validate(samples: Sequence[Sample], on_bad_image: str = "error", workers: int = 8) -> Validation:
    """Opens every image and mask once and checks it is usable, before any expensive work.

    Args:
        samples: samples to check.
        on_bad_image: "error" raises `DatasetError` naming the first bad file; "skip" drops bad images and lists
            them. A defective image without a usable mask always raises: its ground truth would be wrong.
        workers: threads decoding in parallel (Pillow releases the GIL while decoding).
    """
    if on_bad_image not in ("error", "skip"):
        raise OptionError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    problems = []
    with ThreadPoolExecutor(workers) as pool, stage("validate images", total=len(samples)) as advance:
        for problem in pool.map(_problem_of, samples):
            problems.append(problem)
            advance(1)
    kept, skipped = [], []
    for sample, problem in zip(samples, problems, strict=True):
        if problem is None:
            kept.append(sample)
            continue
        path, reason, mask_problem = problem
        if on_bad_image == "error" or mask_problem:
            raise DatasetError(f"{path}: {reason}")
        skipped.append({"image": path, "problem": reason})
    return Validation(kept, skipped)


def _problem_of(sample: Sample) -> tuple[str, str, bool] | None:
    """Returns (file, problem, is_mask_problem) for a bad sample, None for a good one."""
    try:
        size = decode_rgb(sample.image).shape[:2]
    except (OSError, ValueError) as error:
        return sample.image, f"unreadable image ({error})", False
    if sample.label == 1 and sample.split == "test":
        if sample.mask is None or not as_location(sample.mask).exists():
            return sample.mask or sample.image, "defective test image has no mask file", True
        try:
            mask_size = load_mask(sample.mask).shape
        except (OSError, ValueError) as error:
            return sample.mask, f"unreadable mask ({error})", True
        if mask_size != size:
            return sample.mask, f"mask size {mask_size[::-1]} differs from image size {size[::-1]} (W x H)", True
    return None


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels a side than the caller accepts; raised before any pixel decodes."""


def decode_rgb(source: bytes | str | Path, max_side: int | None = None) -> np.ndarray:
    """Decodes any Pillow-readable image, given as a file path or as its encoded bytes, to `(H, W, 3)` uint8 RGB.

    Grayscale is replicated, palette images are expanded, alpha is composited onto black (a transparent pixel is
    background, whatever colour it stores), and 16-bit or 32-bit integer images are scaled by their bit depth rather
    than clipped at 255 as `Image.convert("RGB")` would. Files and uploaded bytes share this one function, so a served
    image decodes to exactly the pixels `reconray predict` sees.

    Args:
        source: a path, or the encoded bytes of an upload.
        max_side: largest accepted width or height; checked from the header alone, so an oversized image is refused
            (`ImageTooLargeError`) before its pixels take any memory. None accepts any size.
    """
    with _opened_image(source) as image:
        if max_side is not None and max(image.size) > max_side:
            width, height = image.size
            raise ImageTooLargeError(f"image is {width}x{height} pixels; the limit is {max_side} pixels a side")
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            values = np.asarray(image, dtype=np.float64)
            scale = 65535.0 if image.mode != "I" or values.max() > 255 else 255.0
            gray = np.clip(values / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        if image.mode == "F":
            values = np.asarray(image, dtype=np.float64)
            scale = 1.0 if values.max() <= 1.0 else 255.0
            gray = np.clip(values / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        if image.mode == "P":
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
            return (rgba[..., :3] * (rgba[..., 3:] / 255.0) + 0.5).astype(np.uint8)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_mask(path: str | Path) -> np.ndarray:
    """Decodes a ground-truth mask to `(H, W)` bool: any channel above half of the mask's range is defect."""
    with _opened_image(path) as image:
        values = np.asarray(image) if image.mode in ("L", "1", "I;16", "I") else np.asarray(image.convert("RGB")).max(2)
    values = values.astype(np.float32)
    return values > (values.max() / 2 if values.max() > 1 else 0.5)


@contextlib.contextmanager
def _opened_image(source: bytes | str | Path) -> Iterator[Image.Image]:
    """Pillow's image of encoded bytes, a local file or an object behind a URI; the file is closed afterwards."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else open_binary(source)
    try:
        with Image.open(handle) as image:
            yield image
    finally:
        if not isinstance(handle, str):
            handle.close()
