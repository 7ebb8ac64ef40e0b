"""Fit memory: workers hold one batch of images at a time, so their peak memory does not grow with the data set.

Usage:
    python benchmarks/fit_memory.py --out runs/bench-fit-memory [--method sgfr] [--images 64 256]

For each training-set size, a fresh local Ray (2 CPUs) runs the real `reconray.pipelines.fit.fit_model` on one synthetic
category (256 px) while a sampler thread reads, every 0.2 s, the private memory (`RssAnon` of /proc/<pid>/status:
the heap, Python objects and tensors, Linux only) of the driver and of every Ray worker process. Object-store pages
are shared memory (`RssShmem`) and left out: they are Ray Data's bounded, backpressured queue between operators, not
what a worker holds (a unique-set-size reading counts the plasma pages a task wrote its output block into, which
made decode tasks look as if they grew with the data set). If a worker kept the images it had decoded, or the driver
collected them, their peaks would grow by the raw set's size between the two runs (the second is 4x larger); the
table shows how far they move instead, next to the size of one raw batch (16 float32 images of 3 x 256 x 256 =
12.6 million bytes, printed as 12.0 MB: the table's MB are MiB) and of the raw set.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--method", default="sgfr")
    parser.add_argument("--images", type=int, nargs="+", default=[64, 256], help="training images per run")
    args = parser.parse_args()
    with console_session(None):
        run(args)


def run(args: argparse.Namespace) -> None:
    rows = []
    for count in args.images:
        data = make_synthetic_dataset(
            args.out / f"data-{count}",
            SyntheticConfig(image_size=IMAGE_SIZE, n_train=count, n_test_good=1, n_test_defect=1, categories=("wood",)),
        )
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            with PeakMemory() as memory:
                began = time.perf_counter()
                result = fit_model(data, args.method, args.out / f"model-{count}")
                seconds = time.perf_counter() - began
        finally:
            ray.shutdown()
        rows.append((count, result.n_fit, seconds, memory.peaks))
        logger.info("%d images: peak private bytes %s", count, memory.peaks)

    roles = sorted({role for *_, peaks in rows for role in peaks})
    print(f"\n| training images (fit) | raw set MB | fit s | {' | '.join(f'peak private MB: {r}' for r in roles)} |")
    print("|---|---|---|" + "---|" * len(roles))
    for count, n_fit, seconds, peaks in rows:
        cells = " | ".join(f"{peaks.get(role, 0) / 2**20:.0f}" for role in roles)
        print(f"| {count} ({n_fit}) | {n_fit * RAW_IMAGE_BYTES / 2**20:.0f} | {seconds:.1f} | {cells} |")
    print(f"\none raw batch (16 images): {16 * RAW_IMAGE_BYTES / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
