"""Serve's autoscaling on a real two-node cluster, observed: replicas added under sustained load and removed after it,
and a replica on the worker node killed under load.

Usage:
    python benchmarks/serve_autoscale.py --out runs/bench-serve-autoscale [--concurrency 8] [--load-s 75]

Starts a loopback S3 server (moto) and `cluster/local-cluster.sh` (head and worker, 1 CPU each), fits patchcore on
the synthetic "nut" category (128 px) as a job whose model goes to the bucket, then deploys `build_app` from
`s3://` on the cluster (replicas of 0.5 CPU, 1 to 3 of them, target 2 ongoing requests, upscale delay 5 s, downscale
delay 20 s; the HTTP proxy on the head only, since both nodes share this machine's ports). Phases: 10 s idle, then
`--load-s` of `--concurrency` clients posting PNGs in a loop, with one replica on the worker node killed 40 s into
the load, then 60 s idle. The replica count is sampled every second (`serve.status()`). Written under --out:
timeline.json (every request and every sample), replicas.png and throughput.png; the per-phase table (markdown) goes
to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from cluster_faults import cpu_model, free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local-cluster.sh"
KILL_AFTER_S = 40.0

logger = logging.getLogger("reconray.benchmarks.serve_autoscale")


def _replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(count for deployment in status.deployments.values()
               for state, count in deployment.replica_states.items() if str(state).endswith("RUNNING"))


def _kill_worker_replica(dashboard: str) -> str | None:
    """Kills one running replica on the worker node; returns its actor name."""
    import ray
    from ray.util.state import list_actors, list_nodes

    worker = {node.node_id for node in list_nodes(address=dashboard, detail=True) if "node_worker" in
              node.resources_total}
    for actor in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True, limit=1000):
        if actor.class_name.startswith("ServeReplica:") and actor.node_id in worker:
            ray.kill(ray.get_actor(actor.name, namespace="serve"), no_restart=True)
            return actor.name
    return None


async def _load(url: str, payload: bytes, concurrency: int, seconds: float, events: list) -> None:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60.0) as client:
        async def client_loop() -> None:
            while time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    response = await client.post(url, content=payload, headers={"Content-Type": "image/png"})
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                events.append({"t": started, "latency_s": time.monotonic() - started, "status": status})

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    s3_port, ray_port, dashboard_port, http_port = (free_port() for _ in range(4))
    os.environ |= {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "RAY_AUTH_MODE": "disabled"}
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {
        "CLUSTER_DIR": tempfile.mkdtemp(prefix="rc-", dir="/tmp"), "RAY_PORT": str(ray_port),
        "DASHBOARD_PORT": str(dashboard_port), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        import s3fs

        root = make_synthetic_dataset(out / "synthetic", SyntheticConfig(image_size=128, categories=("nut",)))
        storage = s3fs.S3FileSystem(skip_instance_cache=True)
        storage.mkdir("serve")
        storage.put(f"{root}/", "serve/data/", recursive=True)
        subprocess.run(["bash", str(SCRIPT), "start"], env=env, check=True, capture_output=True, timeout=300)
        try:
            subprocess.run([sys.executable, "-m", "reconray.pipelines.cli", "fit", "--data", "s3://serve/data",
                            "--method", "patchcore", "--image-size", "128", "--out", "s3://serve/model"],
                           env=env | {"RAY_ADDRESS": f"127.0.0.1:{ray_port}"}, check=True, capture_output=True)
            payload = sorted((Path(root) / "nut" / "test").glob("*/*.png"))[0].read_bytes()
            return _observe(args, out, env, ray_port, dashboard_port, http_port, payload)
        finally:
            subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=300)
    finally:
        server.terminate()


def _observe(args: argparse.Namespace, out: Path, env: dict[str, str], ray_port: int, dashboard_port: int,
             http_port: int, payload: bytes) -> dict[str, Any]:
    import ray
    from ray import serve

    from reconray.pipelines.serve import APP_NAME, build_app

    ray.init(address=f"127.0.0.1:{ray_port}", runtime_env={"env_vars": {key: env[key] for key in env
                                                                        if key.startswith("AWS_")}})
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(build_app({"model_dir": "s3://serve/model", "num_cpus": "0.5", "min_replicas": "1",
                         "max_replicas": "3", "target_ongoing_requests": "2", "upscale_delay_s": "5",
                         "downscale_delay_s": "20"}), name=APP_NAME)
    samples: list[dict[str, Any]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append({"t": time.monotonic(), "replicas": _replicas(APP_NAME)})
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    events: list[dict[str, Any]] = []
    begin = time.monotonic()
    sampler.start()
    time.sleep(10)
    load_start = time.monotonic()

    def kill() -> None:
        time.sleep(KILL_AFTER_S)
        killed.append({"t": time.monotonic(), "actor": _kill_worker_replica(f"http://127.0.0.1:{dashboard_port}")})

    killed: list[dict[str, Any]] = []
    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    asyncio.run(_load(f"http://127.0.0.1:{http_port}/v1/score", payload, args.concurrency, args.load_s, events))
    load_end = time.monotonic()
    killer.join()
    time.sleep(60)
    stop.set()
    sampler.join()
    serve.shutdown()
    ray.shutdown()
    timeline = {"begin": begin, "load": [load_start, load_end], "killed": killed, "samples": samples,
                "requests": events, "cpu": cpu_model()}
    (out / "timeline.json").write_text(json.dumps(timeline))
    _plots(timeline, out)
    return timeline


def _plots(timeline: dict[str, Any], out: Path) -> None:
    from reconray.pipelines.report import scatter_plot

    begin = timeline["begin"]
    xs = [round(sample["t"] - begin, 1) for sample in timeline["samples"]]
    scatter_plot("running replicas over time (load from {:.0f} s to {:.0f} s)".format(
        *(t - begin for t in timeline["load"])), "seconds", "replicas", xs,
        [sample["replicas"] for sample in timeline["samples"]]).save(out / "replicas.png")
    seconds = np.array([event["t"] - begin for event in timeline["requests"]])
    bins = np.arange(0, max(xs) + 1)
    counts, _ = np.histogram(seconds, bins=bins)
    scatter_plot("requests answered per second", "seconds", "requests/s", bins[:-1].tolist(),
                 counts.astype(float).tolist()).save(out / "throughput.png")


def table(timeline: dict[str, Any]) -> str:
    """Per phase of the load: requests, throughput, p50/p99 latency, non-2xx answers, replicas seen."""
    load_start, load_end = timeline["load"]
    kill_t = timeline["killed"][0]["t"] if timeline["killed"] else load_end
    phases = [("load, before the kill", load_start, kill_t), ("load, after the kill", kill_t, load_end)]
    lines = ["| phase | requests | throughput | p50 | p99 | non-2xx | replicas (min-max) |",
             "|---|---|---|---|---|---|---|"]
    for name, start, end in phases:
        chosen = [event for event in timeline["requests"] if start <= event["t"] < end]
        latencies = np.array([event["latency_s"] for event in chosen]) * 1000
        bad = sum(event["status"] != 200 for event in chosen)
        replicas = [sample["replicas"] for sample in timeline["samples"] if start <= sample["t"] < end]
        lines.append(f"| {name} | {len(chosen)} | {len(chosen) / max(end - start, 1e-9):.1f}/s | "
                     f"{np.percentile(latencies, 50):.0f} ms | {np.percentile(latencies, 99):.0f} ms | {bad} | "
                     f"{min(replicas, default=0)}-{max(replicas, default=0)} |")
    after = [sample["replicas"] for sample in timeline["samples"] if sample["t"] >= load_end]
    lines.append(f"| idle after the load (60 s) | 0 | - | - | - | - | {max(after, default=0)} → "
                 f"{after[-1] if after else 0} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--load-s", type=float, default=75.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(table(run(args)))  # noqa: T201  the table is this script's output


if __name__ == "__main__":
    main()
