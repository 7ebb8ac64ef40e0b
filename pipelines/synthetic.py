"""Deterministic synthetic anomaly-detection dataset in MVTec AD layout, made without any download.

`reconray run` and the tests need labelled images with pixel-exact ground truth on machines with no internet. Each
sample is rendered from its own seeded generator: a nominal scene (woven fabric, wood grain, a hex nut, a capsule)
with the variation a real line shows (lighting gradient, small shifts and rotations, colour jitter, sensor noise),
then, for a defective sample, one defect painted on top (scratch, stain, hole or missing part, discolouration). The
mask is the set of pixels whose 8-bit value the defect changed, so it is exact by construction, and the clean
rendering of every defective sample can be reproduced to check that (see `render_sample`). Defect sizes and
contrasts are drawn from wide ranges, so some defects are small and faint and the data is not trivially separable.

Example:
    >>> root = make_synthetic_dataset("data/synthetic", SyntheticConfig(image_size=128))
    >>> sorted(p.name for p in (root / "nut" / "test").iterdir())
    ['color', 'good', 'hole', 'scratch', 'stain']
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

DEFAULT_CATEGORIES: tuple[str, ...] = ("fabric", "wood", "nut", "pill")
DEFECT_KINDS: tuple[str, ...] = ("scratch", "stain", "hole", "color")

_MANIFEST = "synthetic.json"
_INCOMPLETE = ".synthetic-incomplete"
_FORMAT_VERSION = 1
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What to generate; the same config always yields byte-identical files.

    Attributes:
        image_size: side of the square images in pixels.
        n_train: nominal training images per category.
        n_test_good: nominal test images per category.
        n_test_defect: defective test images per category, spread as evenly as possible over `DEFECT_KINDS`.
        seed: base seed; every sample derives its own generator from it.
        categories: categories to generate, any of `DEFAULT_CATEGORIES` (which holds every known one).
    """

    image_size: int = 256
    n_train: int = 32
    n_test_good: int = 10
    n_test_defect: int = 16
    seed: int = 0
    categories: tuple[str, ...] = DEFAULT_CATEGORIES

    def __post_init__(self) -> None:
        if not 32 <= self.image_size <= 4096:
            raise ValueError(f"image_size={self.image_size} is out of range (32 to 4096)")
        if self.n_train < 1:
            raise ValueError(f"n_train={self.n_train} is out of range (at least 1)")
        for field in ("n_test_good", "n_test_defect", "seed"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field}={getattr(self, field)} is out of range (at least 0)")
        object.__setattr__(self, "categories", tuple(self.categories))
        unknown = [name for name in self.categories if name not in DEFAULT_CATEGORIES]
        if unknown or not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(
                f"categories={self.categories!r} must be a non-empty list of distinct names from {DEFAULT_CATEGORIES}"
            )


@dataclasses.dataclass(frozen=True)
class SyntheticSample:
    """One rendered sample: the image as written, its defect-free rendering and its ground-truth mask.

    Attributes:
        image: `(H, W, 3)` uint8, what the dataset holds.
        clean: `(H, W, 3)` uint8, the same sample without its defect (equal to `image` for a good sample).
        mask: `(H, W)` uint8 with 255 exactly where `image` differs from `clean`; None for a good sample.
    """

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray | None


@dataclasses.dataclass
class _Scene:
    """A nominal rendering plus what the defect painters need to know about it.

    Attributes:
        image: `(H, W, 3)` float image in [0, 1] (before quantization).
        backdrop: what a hole or a missing part reveals, same shape as `image`.
        coverage: `(H, W)` in [0, 1], how much of each pixel is product surface (1 everywhere on a texture).
        surface_sites: where surface defects (scratch, stain, colour) may be centred.
        hole_sites: where a hole or missing part may be centred (the outline of an object).
    """

    image: np.ndarray
    backdrop: np.ndarray
    coverage: np.ndarray
    surface_sites: np.ndarray
    hole_sites: np.ndarray


def make_synthetic_dataset(root: str | Path, config: SyntheticConfig = SyntheticConfig()) -> Path:
    """Write the dataset under `root` in MVTec AD layout, or reuse it when `root` already holds this config.

    Layout: `<category>/train/good/000.png`, `<category>/test/good/000.png`, `<category>/test/<defect>/000.png`
    and `<category>/ground_truth/<defect>/000_mask.png` (uint8, 0 or 255). `synthetic.json` is written last, so
    its presence with the same config means a complete dataset and a second call returns at once.

    Args:
        root: folder to write into; created if missing. It must be empty or a previous synthetic dataset, so that
            regenerating never deletes anything this module did not write.
        config: what to generate.

    Returns:
        `root` as a Path.
    """
    root = Path(root)
    manifest = {
        "generator": "reconray.pipelines.synthetic",
        "version": _FORMAT_VERSION,
        "config": dataclasses.asdict(config) | {"categories": list(config.categories)},
    }
    if _read_manifest(root / _MANIFEST) == manifest:
        return root
    _claim(root)
    for category in config.categories:
        _write_category(root / category, category, config)
    (root / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (root / _INCOMPLETE).unlink()
    return root


def render_sample(
    category: str, split: str, label: str, index: int, config: SyntheticConfig = SyntheticConfig()
) -> SyntheticSample:
    """Render one sample exactly as `make_synthetic_dataset` writes it, together with its defect-free version.

    Args:
        category: one of the known categories.
        split: "train" or "test".
        label: "good" or one of `DEFECT_KINDS` (train samples are always "good").
        index: sample number within its folder, from 0.
        config: image size and seed (the counts do not matter here).

    Returns:
        The sample; its mask marks every pixel the defect changed and no other.
    """
    if category not in DEFAULT_CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose one of {DEFAULT_CATEGORIES}")
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    if label not in ("good", *DEFECT_KINDS) or (split == "train" and label != "good"):
        raise ValueError(f"label={label!r} must be 'good' or, on the test split, one of {DEFECT_KINDS}")
    if index < 0:
        raise ValueError(f"index={index} is out of range (at least 0)")
    stream = 0 if split == "train" else 1 if label == "good" else 2 + DEFECT_KINDS.index(label)
    key = [config.seed, DEFAULT_CATEGORIES.index(category), stream, index]
    scene = _RENDERERS[category](np.random.default_rng(key), config.image_size)
    clean = _to_uint8(scene.image)
    if label == "good":
        return SyntheticSample(image=clean, clean=clean, mask=None)
    defect_rng = np.random.default_rng([*key, 1])
    min_pixels = max(4, config.image_size**2 // 5000)
    for _ in range(32):
        image = _to_uint8(_DEFECT_PAINTERS[label](scene, defect_rng))
        changed = np.any(image != clean, axis=-1)
        if changed.sum() >= min_pixels:
            return SyntheticSample(image=image, clean=clean, mask=changed.astype(np.uint8) * 255)
    raise RuntimeError(f"could not place a visible {label!r} defect on {category} sample {index} (seed {config.seed})")


def _read_manifest(path: Path) -> dict | None:
    """The manifest at `path`, or None when it is missing or unreadable (an interrupted or foreign write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _claim(root: Path) -> None:
    """Make `root` ready for a fresh generation, deleting only category folders of an earlier synthetic dataset."""
    root.mkdir(parents=True, exist_ok=True)
    owned = (root / _MANIFEST).exists() or (root / _INCOMPLETE).exists()
    if not owned and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and holds no {_MANIFEST}; pass an empty or new folder for the synthetic dataset"
        )
    (root / _INCOMPLETE).touch()
    (root / _MANIFEST).unlink(missing_ok=True)
    for name in DEFAULT_CATEGORIES:
        if (root / name).is_dir():
            shutil.rmtree(root / name)


def _write_category(folder: Path, category: str, config: SyntheticConfig) -> None:
    """Write every image and mask of one category."""
    jobs = [("train", "good", i) for i in range(config.n_train)]
    jobs += [("test", "good", i) for i in range(config.n_test_good)]
    for kind, count in zip(DEFECT_KINDS, _spread(config.n_test_defect, len(DEFECT_KINDS)), strict=True):
        jobs += [("test", kind, i) for i in range(count)]
    for split, label, index in jobs:
        sample = render_sample(category, split, label, index, config)
        _write_png(folder / split / label / f"{index:03d}.png", sample.image)
        if sample.mask is not None:
            _write_png(folder / "ground_truth" / label / f"{index:03d}_mask.png", sample.mask)


def _spread(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` counts that differ by at most one, larger counts first."""
    return [total // parts + (part < total % parts) for part in range(parts)]


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


# ---- nominal scenes -------------------------------------------------------------------------------------------


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates `(x, y)`, each `(size, size)` float32."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    return axis[None, :].repeat(size, 0), axis[:, None].repeat(size, 1)


def _noise(rng: np.random.Generator, size: int, cells: tuple[int, int], octaves: int = 1) -> np.ndarray:
    """Smooth fractal value noise of roughly unit amplitude; `cells` = (rows, columns) of the coarsest octave.

    The coarse grid is upsampled with Pillow's bicubic filter: single-threaded C, fast on a busy shared CPU, where
    multi-threaded BLAS or spline zooms cost several times more.
    """
    total = np.zeros((size, size), dtype=np.float32)
    for octave in range(octaves):
        rows, cols = (max(2, c * 2**octave) for c in cells)
        coarse = Image.fromarray(rng.standard_normal((rows, cols), dtype=np.float32), mode="F")
        total += np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC)) * np.float32(0.5**octave)
    return total


def _jitter_colour(rng: np.random.Generator, rgb: tuple[float, float, float], spread: float) -> np.ndarray:
    return np.clip(np.array(rgb, dtype=np.float32) + rng.uniform(-spread, spread, 3).astype(np.float32), 0, 1)


def _finish(rng: np.random.Generator, size: int, image: np.ndarray, backdrop: np.ndarray) -> tuple[np.ndarray, ...]:
    """Apply the camera: lighting gradient, per-channel gain and sensor noise, alike to the scene and its backdrop."""
    x, y = _coords(size)
    angle, slope = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 0.06))
    light = 1 + slope * ((x / size - 0.5) * np.cos(angle) + (y / size - 0.5) * np.sin(angle))
    gain = light[..., None] * (1 + rng.normal(0, 0.02, 3)).astype(np.float32)
    grain = rng.standard_normal((size, size, 3), dtype=np.float32) * float(rng.uniform(0.004, 0.012))
    return image * gain + grain, backdrop * gain + grain


def _fabric(rng: np.random.Generator, size: int) -> _Scene:
    """Plain-weave cloth: over/under warp and weft threads, random phase and angle, wobbling threads."""
    x, y = _coords(size)
    angle = rng.uniform(-0.05, 0.05)
    period = size / rng.uniform(19, 22)
    u = (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 1) + 0.12 * _noise(rng, size, (5, 5))
    v = (y * np.cos(angle) - x * np.sin(angle)) / period + rng.uniform(0, 1) + 0.12 * _noise(rng, size, (5, 5))
    col, row = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - col, v - row
    warp_on_top = (col + row) % 2 == 0
    warp = np.sqrt(np.sin(np.pi * fu)) * (0.7 + 0.3 * np.sin(np.pi * fv))
    weft = np.sqrt(np.sin(np.pi * fv)) * (0.7 + 0.3 * np.sin(np.pi * fu))
    thread_gain = 1 + 0.06 * rng.standard_normal(64).astype(np.float32)
    warp_colour = _jitter_colour(rng, (0.80, 0.72, 0.58), 0.03)
    weft_colour = warp_colour * rng.uniform(0.9, 0.97)
    image = np.where(
        warp_on_top[..., None],
        (warp * thread_gain[col % 64])[..., None] * warp_colour,
        (weft * thread_gain[row % 64])[..., None] * weft_colour,
    )
    image = 0.08 + 0.92 * image * (1 + 0.04 * _noise(rng, size, (24, 24)))[..., None]
    backdrop = np.broadcast_to(_jitter_colour(rng, (0.10, 0.09, 0.08), 0.02), image.shape)
    return _texture_scene(rng, size, image, backdrop)


def _wood(rng: np.random.Generator, size: int) -> _Scene:
    """Plank surface: growth rings around an off-image pith, distorted by turbulence, with fine fibre streaks."""
    x, y = _coords(size)
    pith_x, pith_y = -size * rng.uniform(2.5, 4.0), size * rng.uniform(0.0, 1.0)
    turbulence = size * 0.025 * _noise(rng, size, (4, 4), octaves=3)
    rings = (np.hypot(x - pith_x, y - pith_y) + turbulence) / (size / rng.uniform(9.5, 11)) + rng.uniform(0, 1)
    late_wood = (0.5 + 0.5 * np.cos(2 * np.pi * rings)) ** 3
    fibres = _noise(rng, size, (3, 48), octaves=2)
    darkness = np.clip(0.6 * late_wood + 0.12 * fibres + 0.1, 0, 1)[..., None]
    light, dark = _jitter_colour(rng, (0.80, 0.60, 0.38), 0.02), _jitter_colour(rng, (0.52, 0.32, 0.16), 0.02)
    image = light + (dark - light) * darkness
    backdrop = np.broadcast_to(_jitter_colour(rng, (0.16, 0.09, 0.05), 0.02), image.shape)
    return _texture_scene(rng, size, image, backdrop)


def _texture_scene(rng: np.random.Generator, size: int, image: np.ndarray, backdrop: np.ndarray) -> _Scene:
    image, backdrop = _finish(rng, size, image, backdrop)
    margin = max(1, size // 10)
    inner = np.zeros((size, size), dtype=bool)
    inner[margin:-margin, margin:-margin] = True
    return _Scene(image, backdrop, np.ones((size, size), np.float32), surface_sites=inner, hole_sites=inner)


def _nut(rng: np.random.Generator, size: int) -> _Scene:
    """Hex nut seen from above, centred: brushed face, chamfered corners, threaded bore, soft drop shadow."""
    x, y = _coords(size)
    px, py, turn = _pose(rng, size, x, y, spin=0.04)
    apothem = 0.33 * size * rng.uniform(0.98, 1.02)
    faces = [np.abs(px * np.cos(turn + k * np.pi / 3) + py * np.sin(turn + k * np.pi / 3)) for k in range(3)]
    edge_distance = np.maximum.reduce(faces) - apothem
    radius = np.hypot(px, py)
    bore = 0.42 * apothem
    coverage = np.clip(0.5 - edge_distance, 0, 1) * np.clip(radius - bore + 0.5, 0, 1)
    brushed = 1 + 0.05 * _noise(rng, size, (6, 40)) + 0.03 * _noise(rng, size, (32, 32))
    shade = np.where(radius > 1.05 * apothem, 0.8, 1.0)
    thread = np.where(radius < 1.25 * bore, 0.85 + 0.15 * np.cos(2 * np.pi * radius / (0.03 * size)), 1.0)
    metal = _jitter_colour(rng, (0.66, 0.66, 0.68), 0.03)
    face = (brushed * shade * thread)[..., None] * metal
    background = _jitter_colour(rng, (0.33, 0.37, 0.42), 0.03) * (1 + 0.03 * _noise(rng, size, (8, 8)))[..., None]
    return _object_scene(rng, size, face, background, coverage, edge_distance)


def _pill(rng: np.random.Generator, size: int) -> _Scene:
    """Two-colour capsule lying horizontally, centred: cylinder shading, highlight, seam and a printed mark."""
    x, y = _coords(size)
    px, py, _ = _pose(rng, size, x, y, spin=0.03)
    half_length, radius = 0.26 * size, 0.15 * size * rng.uniform(0.98, 1.02)
    edge_distance = np.hypot(np.maximum(np.abs(px) - half_length, 0), py) - radius
    coverage = np.clip(0.5 - edge_distance, 0, 1)
    across = np.clip(py / radius, -1, 1)
    shading = 0.62 + 0.38 * np.sqrt(1 - across**2) + 0.22 * np.exp(-(((across + 0.45) / 0.14) ** 2))
    seam = 1 - 0.15 * (np.abs(px) < 0.006 * size)
    cap, body = _jitter_colour(rng, (0.78, 0.26, 0.20), 0.04), _jitter_colour(rng, (0.92, 0.90, 0.82), 0.02)
    shell = np.where((px < 0)[..., None], cap, body)
    ring = np.abs(np.hypot(px - 0.55 * half_length, py) - 0.055 * size) < 0.011 * size
    bar = (np.abs(px - 0.55 * half_length) < 0.011 * size) & (np.abs(py) < 0.055 * size)
    print_ink = rng.uniform(0.45, 0.65)
    shell = shell * np.where((ring | bar)[..., None], print_ink, 1.0)
    face = shell * (shading * seam)[..., None] * (1 + 0.02 * _noise(rng, size, (24, 24)))[..., None]
    background = _jitter_colour(rng, (0.20, 0.25, 0.22), 0.03) * (1 + 0.04 * _noise(rng, size, (8, 8)))[..., None]
    return _object_scene(rng, size, face, background, coverage, edge_distance)


def _pose(
    rng: np.random.Generator, size: int, x: np.ndarray, y: np.ndarray, spin: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Object-frame coordinates for a centred object with a small random shift and rotation (consistent pose)."""
    centre_x, centre_y = size * (0.5 + rng.uniform(-0.02, 0.02, 2))
    turn = rng.normal(0, spin)
    dx, dy = x - centre_x, y - centre_y
    return dx * np.cos(turn) + dy * np.sin(turn), dy * np.cos(turn) - dx * np.sin(turn), turn


def _object_scene(
    rng: np.random.Generator,
    size: int,
    face: np.ndarray,
    background: np.ndarray,
    coverage: np.ndarray,
    edge_distance: np.ndarray,
) -> _Scene:
    """Composite an object over its background with a drop shadow; holes on an object are missing parts."""
    offset = size * 0.02
    shadow = ndimage.gaussian_filter(ndimage.shift(coverage, (offset, offset), order=1), sigma=size * 0.02)
    background = background * (1 - 0.4 * shadow)[..., None]
    image = background + (face - background) * coverage[..., None]
    image, backdrop = _finish(rng, size, image, background)
    surface = ndimage.binary_erosion(coverage > 0.99, iterations=max(1, size // 32))
    return _Scene(image, backdrop, coverage, surface_sites=surface, hole_sites=np.abs(edge_distance) < 0.02 * size)


_RENDERERS: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "fabric": _fabric,
    "wood": _wood,
    "nut": _nut,
    "pill": _pill,
}


# ---- defects --------------------------------------------------------------------------------------------------


def _site(rng: np.random.Generator, sites: np.ndarray) -> tuple[float, float]:
    """A random pixel centre `(x, y)` among the True pixels of `sites`."""
    flat = np.flatnonzero(sites)
    row, col = divmod(int(flat[rng.integers(len(flat))]), sites.shape[1])
    return col + 0.5, row + 0.5


def _blob(rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float, soft: float) -> np.ndarray:
    """Irregular elliptical blob: opacity 1 inside, falling to 0 over `soft` of the radius at a wavy outline."""
    x, y = _coords(size)
    dx, dy = x - centre[0], y - centre[1]
    tilt = rng.uniform(0, np.pi)
    along, across = dx * np.cos(tilt) + dy * np.sin(tilt), dy * np.cos(tilt) - dx * np.sin(tilt)
    aspect = rng.uniform(0.5, 1.0)
    distance = np.hypot(along, across / aspect) / radius
    theta = np.arctan2(across, along)
    wobble = sum(rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    return np.clip((1 - distance / (1 + wobble)) / soft, 0, 1).astype(np.float32)


def _cut(opacity: np.ndarray, threshold: float) -> np.ndarray:
    """Zero the faint fringe of an opacity map so every pixel the defect touches changes visibly."""
    return np.where(opacity >= threshold, opacity, 0).astype(np.float32)[..., None]


def _scratch(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """A thin bright or dark curved line, drawn supersampled for anti-aliased edges."""
    size, scale = scene.image.shape[0], 4
    steps = 12
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.15, steps))
    step = size * rng.uniform(0.1, 0.45) / steps
    start = np.array(_site(rng, scene.surface_sites))
    points = start + np.cumsum(np.stack([np.cos(heading), np.sin(heading)], axis=1) * step, axis=0)
    points = np.vstack([start, points]) * scale
    canvas = Image.new("L", (size * scale, size * scale), 0)
    width = max(1, round(size * rng.uniform(0.004, 0.012) * scale))
    ImageDraw.Draw(canvas).line([tuple(p) for p in points], fill=255, width=width, joint="curve")
    line = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255
    opacity = _cut(line * scene.coverage, 0.25) * rng.uniform(0.35, 0.85)
    target = 0.95 if rng.random() < 0.5 else 0.08
    return scene.image + opacity * (target - scene.image)


def _stain(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """A soft-edged darker, tinted blob, like oil or dirt; faint ones are easy to miss."""
    size = scene.image.shape[0]
    blob = _blob(rng, size, _site(rng, scene.surface_sites), size * rng.uniform(0.03, 0.1), soft=0.6)
    opacity = _cut(blob * scene.coverage, 0.15) * rng.uniform(0.35, 0.9)
    tint = _jitter_colour(rng, (0.55, 0.42, 0.25), 0.12)
    return scene.image * (1 - opacity * (1 - tint))


def _hole(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """A hole through a texture or a missing piece of an object's outline: the backdrop shows through."""
    size = scene.image.shape[0]
    blob = _blob(rng, size, _site(rng, scene.hole_sites), size * rng.uniform(0.02, 0.08), soft=0.15)
    opacity = _cut(blob, 0.2)
    return scene.image + opacity * (scene.backdrop - scene.image)


def _color(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """A local discolouration: brightness kept, hue pulled towards a random tint."""
    size = scene.image.shape[0]
    blob = _blob(rng, size, _site(rng, scene.surface_sites), size * rng.uniform(0.03, 0.1), soft=0.5)
    opacity = _cut(blob * scene.coverage, 0.15) * rng.uniform(0.3, 0.8)
    hue = rng.uniform(0, 1)
    tint = np.clip(np.abs(((hue + np.array([0, 2 / 3, 1 / 3])) % 1) * 6 - 3) - 1, 0, 1).astype(np.float32)
    tint = 1 + rng.uniform(0.4, 0.8) * (tint - 1)
    luma = (scene.image * _LUMA).sum(axis=-1, keepdims=True)
    return scene.image + opacity * (luma * tint / float(tint @ _LUMA) - scene.image)


_DEFECT_PAINTERS: dict[str, Callable[[_Scene, np.random.Generator], np.ndarray]] = {
    "scratch": _scratch,
    "stain": _stain,
    "hole": _hole,
    "color": _color,
}
