"""Fit scale: fit time grows linearly with the training images, and no process's memory grows with them but the
driver's candidates.

Usage:
    python benchmarks/fit_memory.py --out runs/bench-fit-memory [--methods sgfr patchcore] [--images 64 256]
    for n in 352 1408 5632; do for m in patchcore sgfr; do  # 16x: over 5 million patch vectors
        python benchmarks/fit_memory.py --out runs/bench-fit-scale --methods $m --images $n; done; done

For each training-set size (one synthetic category at 256 px, generated once and shared by the methods) and method,
a fresh local Ray (2 CPUs) runs the real `reconray.pipelines.fit.fit_model` while a sampler thread reads, every
0.2 s, the private memory (`RssAnon` of /proc/<pid>/status: the heap, Python objects and tensors, Linux only) of the
driver and of every Ray worker process. Object-store pages are shared memory (`RssShmem`) and left out: they are Ray
Data's bounded, backpressured queue between operators, not what a worker holds (a unique-set-size reading counts
the plasma pages a task wrote its output block into, which made decode tasks look as if they grew with the data
set). If a worker kept the images it had decoded, or the driver collected them, their peaks would grow by the raw
set's size between the runs; the table shows how far they move instead, next to the size of one raw batch (16
float32 images of 3 x 256 x 256 = 12.6 million bytes, printed as 12.0 MB: the table's MB are MiB) and of the raw
set. The fit's own stage times (the artifact's `fit.stages`) and its seconds per million patch vectors show whether
the cost is linear: the per-million figure stays flat if it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from pathlib import Path

import psutil
import ray

from reconray.pipelines.console import console_session
from reconray.pipelines.fit import fit_model
from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset

IMAGE_SIZE = 256
RAW_IMAGE_BYTES = 3 * IMAGE_SIZE * IMAGE_SIZE * 4  # one decoded, normalized float32 image
PATCHES_PER_IMAGE = (IMAGE_SIZE // 8) ** 2  # the default levels' finest grid (stride 8), square images: no padding

# Under "reconray", so that `console_session` shows these lines next to the library's own.
logger = logging.getLogger("reconray.benchmarks.fit_memory")


class PeakMemory:
    """Samples the private memory of this process and of its Ray worker descendants until stopped."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        driver = psutil.Process(os.getpid())
        while not self._stop.wait(self.interval_s):
            for process in [driver, *driver.children(recursive=True)]:
                try:
                    role = "driver" if process.pid == driver.pid else _role(process.name(), process.cmdline())
                    if role is not None:
                        self.peaks[role] = max(self.peaks.get(role, 0), _private_bytes(process.pid))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, FileNotFoundError):
                    continue


def _private_bytes(pid: int) -> int:
    """`RssAnon` of a process: its resident anonymous (non-shared, non-file) memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _role(name: str, cmdline: list[str]) -> str | None:
    """Ray worker processes name themselves `ray::<what they run>`; Ray's own daemons are left out."""
    title = " ".join(cmdline) if cmdline else name
    if not title.startswith("ray::"):
        return None
    if "FeatureActor" in title:
        return "feature actor (backbone)"
    if "IDLE" in title:
        return None
    if "decode" in title:
        return "decode tasks"
    if "condense" in title:
        return "condense tasks"
    return None  # Ray's own actors (stats, autoscaling coordinator, ...) and the threshold calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=["sgfr"])
    parser.add_argument("--images", type=int, nargs="+", default=[64, 256], help="training images per run")
    args = parser.parse_args()
    with console_session(None):
        run(args)


def run(args: argparse.Namespace) -> None:
    """Fits every (size, method); rows of earlier invocations with the same --out are kept (one process per fit
    keeps the driver's peak its own), and the table shows them all."""
    summary = args.out / "summary.json"
    rows = json.loads(summary.read_text()) if summary.exists() else []
    for count in args.images:
        data = args.out / f"data-{count}"
        if not (data / "wood").is_dir():
            make_synthetic_dataset(data, SyntheticConfig(image_size=IMAGE_SIZE, n_train=count, n_test_good=1,
                                                         n_test_defect=1, categories=("wood",)))
        for method in args.methods:
            ray.init(num_cpus=2, include_dashboard=False)
            try:
                with PeakMemory() as memory:
                    began = time.perf_counter()
                    result = fit_model(data, method, args.out / f"{method}-{count}")
                    seconds = time.perf_counter() - began
            finally:
                ray.shutdown()
            config = json.loads((Path(result.model_dir) / "config.json").read_text())
            vectors = result.n_fit * PATCHES_PER_IMAGE
            rows = [row for row in rows if (row["method"], row["images"]) != (method, count)]
            rows.append({"method": method, "images": count, "fit_images": result.n_fit, "vectors": vectors,
                         "fit_s": seconds, "stages": config["fit"]["stages"], "peaks": memory.peaks,
                         "bank": config["method_info"]})
            logger.info("%s, %d images: %.1f s, peak private bytes %s", method, count, seconds, memory.peaks)
            summary.write_text(json.dumps(rows, indent=1, default=str))
    print(table(sorted(rows, key=lambda row: (row["method"], row["images"]))))


def table(rows: list[dict]) -> str:
    roles = sorted({role for row in rows for role in row["peaks"]})
    stages = ("features_condense", "bank")
    lines = [f"| method | training images (fit) | patch vectors | raw set MB | fit s | s per M vectors | "
             f"{' | '.join(f'{stage} s' for stage in stages)} | {' | '.join(f'peak MB: {r}' for r in roles)} |",
             "|---|---|---|---|---|---|" + "---|" * (len(stages) + len(roles))]
    for row in rows:
        timed = " | ".join(f"{row['stages'].get(stage, 0.0):.1f}" for stage in stages)
        cells = " | ".join(f"{row['peaks'].get(role, 0) / 2**20:.0f}" for role in roles)
        lines.append(f"| {row['method']} | {row['images']} ({row['fit_images']}) | {row['vectors']:,} | "
                     f"{row['fit_images'] * RAW_IMAGE_BYTES / 2**20:.0f} | {row['fit_s']:.1f} | "
                     f"{row['fit_s'] / row['vectors'] * 1e6:.1f} | {timed} | {cells} |")
    lines.append(f"\none raw batch (16 images): {16 * RAW_IMAGE_BYTES / 2**20:.1f} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
