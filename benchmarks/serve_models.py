"""Several models behind one service: does Serve's multiplexed routing keep each model where its traffic goes?

Usage:
    python benchmarks/serve_models.py --out runs/bench-serve-models [--seconds 30] [--port 8000]

Fits six models on the synthetic set at 128 px (patchcore on each of its four categories, sgfr on two of them), then
on a local 2-CPU Ray serves them with `build_app(models=...)`: the router and a pool of two replicas of 0.5 CPU, each
keeping `max_models_per_replica` = 2 models, so the pool holds four models at once. Two phases of `--seconds` each,
one client per model posting its category's test images in a loop:
1. four models (as many as the pool's slots): with routing by multiplexed model id, each model loads once and stays
   where its traffic goes, so cold starts stay at about one per model whatever the number of requests;
2. six models (more than the slots): replicas must drop their least recently used model, and cold starts recur.
Per phase: requests, failures, cold starts (and when the last one came), p50/p99 latency of warm and of cold
requests. Written under --out:
serve_models.json; the table (markdown) goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import ray
from cluster_faults import cpu_model
from ray import serve

from reconray.pipelines.console import console_session
from reconray.pipelines.fit import fit_model
from reconray.pipelines.serve import APP_NAME, build_app
from reconray.pipelines.synthetic import DEFAULT_CATEGORIES, SyntheticConfig, make_synthetic_dataset

IMAGE_SIZE = 128
SLOTS_PER_REPLICA = 2
REPLICAS = 2

logger = logging.getLogger("reconray.benchmarks.serve_models")


def _fit_models(out: Path) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """Six artifacts, name → folder, and each one's payloads (its category's test images)."""
    data = make_synthetic_dataset(out / "data", SyntheticConfig(image_size=IMAGE_SIZE))
    setting = [("patchcore", category) for category in DEFAULT_CATEGORIES]
    setting += [("sgfr", category) for category in DEFAULT_CATEGORIES[:2]]
    models, payloads = {}, {}
    for method, category in setting:
        name = f"{category}-{method}"
        target = out / "models" / name
        if not (target / "config.json").is_file():
            fit_model(data, method, target, categories=[category], image_size=IMAGE_SIZE)
        models[name] = str(target)
        payloads[name] = [path.read_bytes() for path in sorted((data / category / "test").glob("*/*.png"))]
    return models, payloads


async def _drive(url: str, payloads: dict[str, list[bytes]], seconds: float) -> list[dict]:
    """One client per model, each posting its next payload as soon as the previous answer arrives."""
    records: list[dict] = []
    began = time.perf_counter()
    async with httpx.AsyncClient(timeout=120.0) as client:

        async def client_of(name: str) -> None:
            started, index = time.perf_counter(), 0
            while time.perf_counter() - started < seconds:
                sent = time.perf_counter()
                response = await client.post(f"{url}/{name}", content=payloads[name][index % len(payloads[name])],
                                             headers={"Content-Type": "image/png"})
                body = response.json() if response.status_code == 200 else {}
                records.append({"model": name, "status": response.status_code, "cold_start": body.get("cold_start"),
                                "latency_ms": 1000.0 * (time.perf_counter() - sent), "at_s": sent - began})
                index += 1

        await asyncio.gather(*(client_of(name) for name in payloads))
    return records


def _summary(records: list[dict], models: int) -> dict:
    def percentiles(values: list[float]) -> tuple[float | None, float | None]:
        return (float(np.percentile(values, 50)), float(np.percentile(values, 99))) if values else (None, None)

    ok = [record for record in records if record["status"] == 200]
    warm = [record["latency_ms"] for record in ok if not record["cold_start"]]
    cold = [record["latency_ms"] for record in ok if record["cold_start"]]
    return {"models": models, "slots": SLOTS_PER_REPLICA * REPLICAS, "requests": len(records),
            "failed": len(records) - len(ok), "cold_starts": len(cold),
            "last_cold_start_s": max((record["at_s"] for record in ok if record["cold_start"]), default=None),
            "cold_starts_per_model": {name: sum(bool(record["cold_start"]) for record in ok if record["model"] == name)
                                      for name in sorted({record["model"] for record in records})},
            "warm_p50_ms": percentiles(warm)[0], "warm_p99_ms": percentiles(warm)[1],
            "cold_p50_ms": percentiles(cold)[0], "cold_p99_ms": percentiles(cold)[1]}


def table(phases: dict[str, dict]) -> str:
    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.0f}"

    lines = ["| phase | models | slots | requests | failed | cold starts | last cold start (s into the phase) | "
             "warm p50 / p99 ms | cold p50 / p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for phase, row in phases.items():
        lines.append(f"| {phase} | {row['models']} | {row['slots']} | {row['requests']} | {row['failed']} | "
                     f"{row['cold_starts']} | {cell(row['last_cold_start_s'])} | {cell(row['warm_p50_ms'])} / "
                     f"{cell(row['warm_p99_ms'])} | {cell(row['cold_p50_ms'])} / {cell(row['cold_p99_ms'])} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    ray.init(num_cpus=2, include_dashboard=False)
    models, payloads = _fit_models(args.out)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}/v1/score"
    phases = {}
    for phase, served in (("as many models as slots", list(models)[:REPLICAS * SLOTS_PER_REPLICA]),
                          ("more models than slots", list(models))):
        serve.run(build_app({"models": {name: models[name] for name in served}, "num_cpus": 0.5,
                             "min_replicas": REPLICAS, "max_replicas": REPLICAS,
                             "max_models_per_replica": SLOTS_PER_REPLICA}), name=APP_NAME)
        records = asyncio.run(_drive(url, {name: payloads[name] for name in served}, args.seconds))
        phases[phase] = _summary(records, len(served))
        logger.info("%s: %s", phase, json.dumps(phases[phase]))
        serve.delete(APP_NAME)
    serve.shutdown()
    return {"command": " ".join(sys.argv), "cpu": cpu_model(), "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-serve-models"))
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with console_session(None):
        report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_models.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['cpu']}\n")
    print(table(report["phases"]))


if __name__ == "__main__":
    main()
