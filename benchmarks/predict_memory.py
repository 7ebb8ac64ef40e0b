"""Driver memory of `reconray predict` streaming Parquet: 1x vs 8x the images.

Usage:
    python benchmarks/predict_memory.py --out runs/bench-predict-memory [--images 250] [--size 64]

Fits a patchcore model on a small synthetic category, writes `--images` and 8x `--images` distinct test images
(noise-perturbed copies of the category's test images), and runs `reconray predict --format parquet --heatmaps none`
on each set in a fresh process, reading that process's peak resident memory (the driver's; Ray's workers are other
processes). Flat means the 8x run's peak is within noise of the 1x run's, not 8x larger. The table (markdown) goes
to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger("reconray.benchmarks.predict_memory")

_CHILD = """
import json, resource, sys, time
from reconray.pipelines.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "wall_s": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _images(source: list[Path], count: int, folder: Path, seed: int) -> Path:
    """`count` distinct PNGs (copies of `source` with a little noise) and a CSV list naming them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        pixels = np.asarray(Image.open(source[index % len(source)]).convert("RGB"), dtype=np.int16)
        noisy = np.clip(pixels + rng.integers(-3, 4, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{index:05d}.png")
        names.append(f"{index:05d}.png")
    listing = folder / "images.csv"
    listing.write_text("image\n" + "\n".join(names) + "\n")
    return listing


def run(args: argparse.Namespace) -> dict:
    from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset

    out = args.out.resolve()
    root = Path(make_synthetic_dataset(out / "synthetic", SyntheticConfig(
        image_size=args.size, n_train=20, n_test_good=8, n_test_defect=8, categories=("nut",))))
    model = out / "model"
    subprocess.run([sys.executable, "-m", "reconray.pipelines.cli", "fit", "--data", str(root), "--method", "patchcore",
                    "--image-size", str(args.size), "--out", str(model)], check=True, capture_output=True)
    source = sorted((root / "nut" / "test").glob("*/*.png"))
    summary = {"images": {}}
    for factor in (1, 8):
        count = args.images * factor
        listing = _images(source, count, out / f"images-{count}", seed=factor)
        command = [sys.executable, "-c", _CHILD, "predict", "--model", str(model), "--out", str(out / f"pred-{count}"),
                   "--format", "parquet", "--heatmaps", "none", str(listing)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        record = json.loads(done.stdout.strip().splitlines()[-1])
        record["process_s"] = time.perf_counter() - started
        summary["images"][count] = record
        logger.info("%d images: %s", count, record)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = run(args)
    rows = summary["images"]
    print("| images | driver peak RSS | predict wall time |\n|---|---|---|")  # noqa: T201
    for count, record in rows.items():
        print(f"| {count} | {record['peak_rss_mb']:.0f} MB | {record['wall_s']:.1f} s |")  # noqa: T201


if __name__ == "__main__":
    main()
