"""Jobs on a real two-node cluster with every input and output in S3: what distribution costs, what a lost node costs.

Usage:
    python benchmarks/cluster_faults.py --out runs/bench-cluster [--size 128] [--train 48]

Starts a loopback S3 server (moto's) and clusters of `cluster/local-cluster.sh`, uploads a synthetic dataset (two
categories) and submits `reconray` jobs with the Ray Jobs API, the way `ray job submit --working-dir .` does:
1. one node with 2 CPUs vs two nodes with 1 CPU each: the wall time of `fit --method sgfr` and `evaluate`;
2. the worker node stopped in the middle of the sgfr fit (its feature actor busy): outcome, wall time, and metrics
   against the undisturbed two-node run;
3. an rlr fit with two Ray Train workers, one per node (1 CPU each), checkpoints every epoch in the bucket: the worker
   node is stopped after the second checkpoint and started again 5 s later (what a cluster autoscaler does);
   `FailureConfig` restarts the worker group from the last checkpoint: outcome, epochs, wall time and the evaluated
   model's metrics against an undisturbed run.
Each job's log and a summary.json are written under --out; the result table (markdown) goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local-cluster.sh"
BUCKET = "bench"
RLR_EPOCHS = 8
RLR_OPTIONS = ["--set", f"epochs={RLR_EPOCHS}", "--set", "d_model=32", "--set", "layers=1", "--set", "heads=4",
               "--set", "select=last", "--set", "recipe=reference"]

logger = logging.getLogger("reconray.benchmarks.cluster_faults")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    """A `local-cluster.sh` cluster on free ports, with this process's environment (the S3 settings included)."""

    def __init__(self, worker_cpus: int, head_cpus: int) -> None:
        self.dashboard_port = free_port()
        self.env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {
            "CLUSTER_DIR": tempfile.mkdtemp(prefix="rc-", dir="/tmp"), "RAY_PORT": str(free_port()),
            "DASHBOARD_PORT": str(self.dashboard_port), "HEAD_CPUS": str(head_cpus),
            "WORKER_CPUS": str(worker_cpus), "RAY_AUTH_MODE": "disabled",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def control(self, command: str) -> None:
        subprocess.run(["bash", str(SCRIPT), command], env=self.env, check=True, capture_output=True, timeout=300)

    def __enter__(self) -> Cluster:
        self.control("start")
        os.environ["RAY_AUTH_MODE"] = "disabled"
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(f"http://127.0.0.1:{self.dashboard_port}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.control("stop")

    def submit(self, *command: str) -> str:
        runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text()) | {"working_dir": str(REPO)}
        return self.client.submit_job(entrypoint=" ".join(["reconray", *command]), runtime_env=runtime_env)

    def wait(self, job: str, log: Path, timeout_s: float = 1800) -> tuple[str, float]:
        """Waits for `job` to end; returns its final status and the seconds waited, and writes its log."""
        from ray.job_submission import JobStatus

        started = time.perf_counter()
        while (status := self.client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                  JobStatus.STOPPED):
            if time.perf_counter() - started > timeout_s:
                self.client.stop_job(job)
            time.sleep(0.5)
        log.write_text(self.client.get_job_logs(job))
        return str(status), time.perf_counter() - started

    def run(self, name: str, out: Path, *command: str) -> dict[str, Any]:
        status, wall_s = self.wait(self.submit(*command), out / f"{name}.log")
        logger.info("%s: %s in %.1f s", name, status, wall_s)
        return {"status": status, "wall_s": round(wall_s, 1)}


def _s3() -> Any:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def _metrics(uri: str) -> dict[str, float]:
    metrics = json.loads(_s3().cat_file(f"{uri}/metrics.json"))
    return {name: round(metrics["mean"][name], 4) for name in ("image_auroc", "pixel_auroc", "aupro")}


def _evaluated(cluster: Cluster, name: str, out: Path, data: str, model: str) -> dict[str, Any]:
    """The evaluate job of `model` (its status and wall time) and the mean metrics it wrote to the bucket."""
    record = {"evaluate": cluster.run(f"{name}-evaluate", out, "evaluate", "--model", model, "--data", data, "--out",
                                      f"s3://{BUCKET}/{name}/evaluation")}
    return record | {"metrics": _metrics(f"s3://{BUCKET}/{name}/evaluation")}


def _fit_evaluate(cluster: Cluster, name: str, out: Path, data: str, size: int) -> dict[str, Any]:
    model = f"s3://{BUCKET}/{name}/model"
    record = {"fit": cluster.run(f"{name}-fit", out, "fit", "--data", data, "--method", "sgfr", "--image-size",
                                 str(size), "--out", model)}
    return record | _evaluated(cluster, name, out, data, model)


def _checkpoints(work: str) -> int:
    return len(_s3().glob(f"{work.removeprefix('s3://')}/train/rlr-*/checkpoint_*/"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from reconray.pipelines.synthetic import SyntheticConfig, make_synthetic_dataset

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    os.environ |= {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary: dict[str, Any] = {"cpu": cpu_model(), "size": args.size, "train_per_category": args.train}
    try:
        time.sleep(2)
        root = make_synthetic_dataset(out / "synthetic", SyntheticConfig(
            image_size=args.size, n_train=args.train, n_test_good=8, n_test_defect=8, categories=("fabric", "nut")))
        _s3().mkdir(BUCKET)
        _s3().put(f"{root}/", f"{BUCKET}/data/", recursive=True)
        data = f"s3://{BUCKET}/data"
        if args.only_rlr:
            with Cluster(worker_cpus=1, head_cpus=1) as two:
                summary["rlr"] = _rlr_runs(two, out, data, args.size)
            return summary
        with Cluster(worker_cpus=0, head_cpus=2) as one:
            summary["one_node"] = _fit_evaluate(one, "one-node", out, data, args.size)
        with Cluster(worker_cpus=1, head_cpus=1) as two:
            summary["two_nodes"] = _fit_evaluate(two, "two-nodes", out, data, args.size)
            summary["bank_fault"] = _bank_fault(two, out, data, args.size, summary["two_nodes"]["fit"]["wall_s"])
            summary["rlr"] = _rlr_runs(two, out, data, args.size)
    finally:
        server.terminate()
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _bank_fault(cluster: Cluster, out: Path, data: str, size: int, undisturbed_s: float) -> dict[str, Any]:
    """Stops the worker node a third of the way into the sgfr fit, then evaluates what the fit wrote."""
    model = f"s3://{BUCKET}/bank-fault/model"
    job = cluster.submit("fit", "--data", data, "--method", "sgfr", "--image-size", str(size), "--out", model)
    time.sleep(undisturbed_s / 3)
    cluster.control("stop-worker")
    stopped_at = time.perf_counter()
    status, _ = cluster.wait(job, out / "bank-fault-fit.log")
    record: dict[str, Any] = {"fit": {"status": status, "after_stop_s": round(time.perf_counter() - stopped_at, 1),
                                      "stopped_after_s": round(undisturbed_s / 3, 1)}}
    cluster.control("start-worker")
    if status == "SUCCEEDED":
        record |= _evaluated(cluster, "bank-fault", out, data, model)
    return record


def _rlr_runs(cluster: Cluster, out: Path, data: str, size: int) -> dict[str, Any]:
    """An undisturbed 2-worker rlr fit, then one whose worker node is stopped after two checkpoints and restarted."""
    fit = ["fit", "--data", data, "--method", "rlr", *RLR_OPTIONS, "--image-size", str(size), "--num-workers", "2",
           "--cpus-per-worker", "1", "--checkpoint-every", "1", "--max-failures", "2"]
    record: dict[str, Any] = {"undisturbed": cluster.run("rlr-fit", out, *fit, "--out", f"s3://{BUCKET}/rlr/model")}
    record["undisturbed"] |= _evaluated(cluster, "rlr", out, data, f"s3://{BUCKET}/rlr/model")
    model = f"s3://{BUCKET}/rlr-fault/model"
    job = cluster.submit(*fit, "--out", model)
    started = time.perf_counter()
    while _checkpoints(f"{model}-work") < 2 and time.perf_counter() - started < 900:
        time.sleep(1)
    cluster.control("stop-worker")
    stopped_at = time.perf_counter() - started
    time.sleep(5)
    cluster.control("start-worker")
    status, _ = cluster.wait(job, out / "rlr-fault-fit.log")
    record["fault"] = {"status": status, "wall_s": round(time.perf_counter() - started, 1),
                       "stopped_after_s": round(stopped_at, 1), "checkpoints": _checkpoints(f"{model}-work")}
    if status == "SUCCEEDED":
        config = json.loads(_s3().cat_file(f"{model}/config.json"))
        record["fault"]["epoch"] = config["method_info"].get("epoch")
        record["fault"]["restored"] = record["fault"]["checkpoints"] > RLR_EPOCHS  # epochs rerun from a checkpoint
        record["fault"] |= _evaluated(cluster, "rlr-fault", out, data, model)
    return record


def cpu_model() -> str:
    """The CPU model and count, for RESULTS.md (figures differ between machines)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return f"unknown x{os.cpu_count()}"


def table(summary: dict[str, Any]) -> str:
    one, two, fault, rlr = summary["one_node"], summary["two_nodes"], summary["bank_fault"], summary["rlr"]
    lines = [
        "| job | one node, 2 CPUs | two nodes, 1 CPU each |", "|---|---|---|",
        f"| fit sgfr | {one['fit']['wall_s']} s | {two['fit']['wall_s']} s |",
        f"| evaluate | {one['evaluate']['wall_s']} s | {two['evaluate']['wall_s']} s |",
        f"| mean image / pixel AUROC | {one['metrics']['image_auroc']} / {one['metrics']['pixel_auroc']} | "
        f"{two['metrics']['image_auroc']} / {two['metrics']['pixel_auroc']} |",
        "", "| fault injected | stage | outcome | time lost | metrics vs undisturbed |", "|---|---|---|---|---|",
    ]
    bank_lost = fault["fit"]["stopped_after_s"] + fault["fit"]["after_stop_s"] - two["fit"]["wall_s"]
    same = fault.get("metrics") == two["metrics"]
    lines.append(f"| worker node stopped at {fault['fit']['stopped_after_s']} s | sgfr fit (features) | "
                 f"{fault['fit']['status']} | {bank_lost:+.1f} s | {'equal' if same else fault.get('metrics')} |")
    rlr_fault = rlr["fault"]
    lines.append(f"| worker node stopped at {rlr_fault['stopped_after_s']} s, back 5 s later | rlr 2-worker training | "
                 f"{rlr_fault['status']}, epoch {rlr_fault.get('epoch')} | "
                 f"{rlr_fault['wall_s'] - rlr['undisturbed']['wall_s']:+.1f} s | "
                 f"{rlr_fault.get('metrics')} vs {rlr['undisturbed'].get('metrics')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128, help="synthetic image side")
    parser.add_argument("--train", type=int, default=48, help="normal training images per category")
    parser.add_argument("--only-rlr", action="store_true", help="the rlr runs alone (summary.json, no table)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = run(args)
    if not args.only_rlr:
        print(table(summary))  # noqa: T201  the table is this script's output


if __name__ == "__main__":
    main()
