"""Load test of `reconray serve` on loopback: throughput and p50/p99 latency against in-process scoring of one model.

Usage:
    python benchmarks/serve_load.py [--model DIR --images PNG...] [--out runs/bench-serve] [--concurrency 1,8,32]
                                    [--batch-sizes 1,8] [--requests 240] [--max-seconds 60] [--replica-cpus N]

Without `--model`, a patchcore model (10% coreset) is fitted with `fit_model` on the synthetic "nut" category at
256 px and its test images are the payloads. The same Ray process then
1. scores the payloads in-process (decode + preprocess + `Scorer`, on as many torch threads as a replica gets), at
   each batch size: the ceiling one replica could reach with no HTTP at all;
2. for each `max_batch_size`, deploys the application (one replica holding `--replica-cpus`) and drives it with an
   asyncio + httpx load generator at each concurrency: at most `--requests` requests and `--max-seconds` per level,
   after a warm-up; payloads are PNG files sent round robin. Right before each level it scores in-process again at
   the best batch size of step 1 (`--reference-seconds`), and the level's ratio is to that paired reference, so a
   change in the machine's load between levels does not pass for a serving cost.
Client, proxy and replica share the machine, as on a single-box deployment. On Linux it also reports the CPU time
all of this run's processes (driver with the load generator, Ray, proxy, replica) spent per request, which, unlike
throughput, hardly depends on what else the machine is running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import ray
import torch
from ray import serve

from reconray.methods.artifact import load_artifact
from reconray.pipelines.console import console_session
from reconray.pipelines.datasets import decode_rgb
from reconray.pipelines.fit import fit_model
from reconray.pipelines.ingest import preprocess
from reconray.pipelines.serve import APP_NAME, build_app
from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset

WARMUP_REQUESTS = 8

# Under "reconray", so that `console_session` shows these lines next to the library's own.
logger = logging.getLogger("reconray.benchmarks.serve_load")


def _fit_default(out: Path) -> tuple[Path, list[Path]]:
    data = make_synthetic_dataset(out / "data", SyntheticConfig(image_size=256, categories=("nut",)))
    fitted = fit_model(data, "patchcore", out / "model", image_size=256, options={"coreset_ratio": 0.1})
    return fitted.model_dir, sorted((data / "nut" / "test").glob("*/*.png"))


def _process_tree_cpu_s() -> float | None:
    """CPU seconds used so far by this process and all its descendants alive now (Linux /proc; None elsewhere)."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    parents, times = {}, {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(pid, 0.0) for pid in tree)


def in_process(model_dir: Path, payloads: list[bytes], batch_size: int, threads: int, max_seconds: float) -> dict:
    """Decode + preprocess + `Scorer` in this process, batched like a replica at full load: images/s, CPU ms/image."""
    torch.set_num_threads(threads)
    artifact = load_artifact(model_dir)
    scorer = artifact.scorer("cuda" if torch.cuda.is_available() else "cpu")
    scorer(torch.stack([preprocess(decode_rgb(payloads[0]), artifact.spec)]))
    done, started, cpu_started = 0, time.perf_counter(), time.process_time()
    while done < len(payloads) and time.perf_counter() - started < max_seconds:
        chunk = payloads[done : done + batch_size]
        scorer(torch.stack([preprocess(decode_rgb(payload), artifact.spec) for payload in chunk]))
        done += len(chunk)
    return {"throughput": done / (time.perf_counter() - started),
            "cpu_ms": 1000.0 * (time.process_time() - cpu_started) / done}


async def drive(url: str, payloads: list[bytes], concurrency: int, requests: int, max_seconds: float) -> dict:
    """`concurrency` clients each posting the next payload as soon as their previous answer arrives."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:

        async def post(index: int) -> tuple[float, bool]:
            sent = time.perf_counter()
            response = await client.post(url, content=payloads[index % len(payloads)],
                                         headers={"Content-Type": "image/png"})
            return time.perf_counter() - sent, response.status_code == 200

        await asyncio.gather(*(post(index) for index in range(WARMUP_REQUESTS)))
        started, cpu_started = time.perf_counter(), _process_tree_cpu_s()

        async def worker() -> None:
            nonlocal issued, errors
            while issued < requests and time.perf_counter() - started < max_seconds:
                issued += 1
                latency, ok = await post(issued)
                latencies.append(latency)
                errors += not ok

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, cpu_finished = time.perf_counter() - started, _process_tree_cpu_s()
    milliseconds = 1000.0 * np.array(latencies)
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "throughput": (len(latencies) - errors) / elapsed,
        "p50_ms": float(np.percentile(milliseconds, 50)),
        "p99_ms": float(np.percentile(milliseconds, 99)),
        "cpu_ms": None if cpu_started is None else 1000.0 * (cpu_finished - cpu_started) / len(latencies),
    }


def _table(report: dict, batch_sizes: list[int], concurrencies: list[int]) -> list[str]:
    lines = [
        "| max_batch_size | concurrency | img/s | paired in-process img/s | ratio | p50 ms | p99 ms | CPU ms/img |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch_size in batch_sizes:
        alone = report["in_process"][batch_size]
        lines.append(f"| {batch_size} | in-process | {alone['throughput']:.2f} | | | | | {alone['cpu_ms']:.1f} |")
        for concurrency in concurrencies:
            row = report["serve"][f"batch {batch_size}, concurrency {concurrency}"]
            cpu = "n/a" if row["cpu_ms"] is None else f"{row['cpu_ms']:.1f}"
            lines.append(f"| {batch_size} | {concurrency} | {row['throughput']:.2f} | "
                         f"{row['reference']['throughput']:.2f} | {row['vs_in_process']:.2f} | {row['p50_ms']:.0f} | "
                         f"{row['p99_ms']:.0f} | {cpu} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="artifact to serve (default: fit patchcore on synthetic nut 256px)")
    parser.add_argument("--images", type=Path, nargs="*", help="payload images (required with --model)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-serve"))
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--requests", type=int, default=240, help="requests per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time bound per level")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs of the one replica (= torch threads)")
    parser.add_argument("--reference-seconds", type=float, default=8.0, help="paired in-process run before a level")
    parser.add_argument("--max-ongoing-requests", type=int, help="per replica (default: the deployment's)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if args.model and not args.images:
        parser.error("--images is required with --model")
    concurrencies = [int(value) for value in args.concurrency.split(",")]
    batch_sizes = [int(value) for value in args.batch_sizes.split(",")]
    with console_session(None):
        run(args, concurrencies, batch_sizes)


def run(args: argparse.Namespace, concurrencies: list[int], batch_sizes: list[int]) -> None:
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    model_dir, images = (args.model, args.images) if args.model else _fit_default(args.out)
    payloads = [path.read_bytes() for path in images]
    threads = max(1, round(args.replica_cpus))
    report: dict = {"command": " ".join(sys.argv), "model": str(model_dir), "images": len(payloads),
                    "replica_cpus": args.replica_cpus, "torch_threads": threads, "cpu_count": os.cpu_count(),
                    "load_average_start": os.getloadavg(), "in_process": {}, "serve": {}}

    for batch_size in batch_sizes:
        report["in_process"][batch_size] = in_process(model_dir, payloads * 4, batch_size, threads, args.max_seconds)
        logger.info("in-process batch %d: %s", batch_size, json.dumps(report["in_process"][batch_size]))
    best = max(batch_sizes, key=lambda size: report["in_process"][size]["throughput"])
    report["reference_batch_size"] = best

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}/v1/score"
    for batch_size in batch_sizes:
        settings = {"model_dir": str(model_dir), "min_replicas": 1, "max_replicas": 1, "num_cpus": args.replica_cpus,
                    "max_batch_size": batch_size, "max_ongoing_requests": args.max_ongoing_requests}
        serve.run(build_app({key: value for key, value in settings.items() if value is not None}), name=APP_NAME)
        for concurrency in concurrencies:
            reference = in_process(model_dir, payloads * 4, best, threads, args.reference_seconds)
            result = asyncio.run(drive(url, payloads, concurrency, args.requests, args.max_seconds))
            result |= {"reference": reference, "vs_in_process": result["throughput"] / reference["throughput"]}
            report["serve"][f"batch {batch_size}, concurrency {concurrency}"] = result
            logger.info("serve batch %d concurrency %d: %s", batch_size, concurrency, json.dumps(result))
        serve.delete(APP_NAME)
    serve.shutdown()

    report["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=2))
    print(f"\nmodel {model_dir}; {report['cpu_count']} CPUs; replica {args.replica_cpus} CPUs, {threads} torch "
          f"threads; load average {report['load_average_start'][0]:.1f} → {report['load_average_end'][0]:.1f}")
    print("\n".join(_table(report, batch_sizes, concurrencies)))


if __name__ == "__main__":
    main()
