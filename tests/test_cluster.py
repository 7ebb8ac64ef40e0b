"""A real two-node Ray cluster (cluster/local-cluster.sh: two `ray start`s, each node its own temp and working dir),
jobs submitted with `ray job submit`, every input and output in a bucket of the loopback S3 server."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
from conftest import free_port, upload_tree

pytestmark = pytest.mark.integration  # its own cluster, in processes of its own; the session's Ray is left alone

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "local-cluster.sh"
BIN = Path(sys.executable).parent


@dataclasses.dataclass
class Cluster:
    dashboard: str
    env: dict[str, str]


def _readme_session() -> list[str]:
    """The command lines of the README's "Run on a cluster" session."""
    section = (REPO / "README.md").read_text().split("## Run on a cluster\n", 1)[1]
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


@pytest.fixture
def cluster(s3_server: str) -> Iterator[Cluster]:
    """The environment of a two-node cluster on free ports; whatever the test started is torn down at the end."""
    port, dashboard = free_port(), free_port()
    nodes = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths under it must fit in 107 bytes
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {
        "CLUSTER_DIR": nodes, "RAY_PORT": str(port), "DASHBOARD_PORT": str(dashboard),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    try:
        yield Cluster(f"http://127.0.0.1:{dashboard}", env)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, timeout=120, capture_output=True)
        shutil.rmtree(nodes, ignore_errors=True)


def _nodes_of_actors(cluster: Cluster, class_name: str) -> set[str]:
    """The node names (head, worker) of every actor of `class_name` the cluster ran, from Ray's State API."""
    from ray.util.state import list_actors, list_nodes

    names = {node.node_id: next(key.removeprefix("node_") for key in node.resources_total if key.startswith("node_"))
             for node in list_nodes(address=cluster.dashboard, detail=True)}
    actors = list_actors(address=cluster.dashboard, filters=[("class_name", "=", class_name)], detail=True,
                         limit=1000, raise_on_missing_output=False)
    return {names[actor.node_id] for actor in actors if actor.node_id}  # never placed: no node


def test_the_readme_cluster_session_runs_every_command_from_a_bucket_on_both_nodes(
    cluster: Cluster, synthetic_root: Path, bucket: str, tmp_path: Path
) -> None:
    """The README's commands, bucket, ports and image substituted: start, submit an sgfr fit and its evaluation, a
    two-worker rlr fit and a two-trial sweep, serve the sgfr model as a job and score an image over HTTP, watch,
    fetch, stop."""
    upload_tree(synthetic_root, f"{bucket}/data")
    name = bucket.removeprefix("s3://")
    image = sorted((synthetic_root / "nut" / "test").glob("*/*.png"))[-1]
    http_port = str(free_port())
    commands = [line.replace("http://127.0.0.1:8266", cluster.dashboard).replace("s3://factory", bucket)
                .replace("'factory/", f"'{name}/").replace("'runs/sgfr'", repr(str(tmp_path / "fetched")))
                .replace("8000", http_port).replace("@part.png", f"@{image}")
                for line in _readme_session()]
    assert commands[-1] == "cluster/local-cluster.sh stop"
    for command in commands[:-1]:
        done = subprocess.run(command, shell=True, cwd=REPO, env=cluster.env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        if command.startswith("ray job submit") and "--no-wait" not in command:
            assert "succeeded" in done.stdout + done.stderr, done.stdout[-4000:]
        if "--num-workers 2" in command:  # its workers hold every CPU: the features are read before training starts
            assert "reading them into the object store first" in done.stdout + done.stderr, done.stdout[-4000:]
        if "/v1/score" in command:  # the served model is the one the fit job wrote to the bucket
            answer = json.loads(done.stdout)
            assert answer["model"]["method"] == "sgfr" and answer["score"] > 0, answer
        if command.endswith("status"):
            assert "node_head" in done.stdout and "node_worker" in done.stdout, done.stdout

    storage = s3fs.S3FileSystem(skip_instance_cache=True)
    assert json.loads(storage.cat_file(f"{bucket}/models/sgfr/config.json"))["categories"] == ["nut", "wood"]
    metrics = json.loads((tmp_path / "fetched" / "metrics.json").read_text())
    assert sorted(metrics["categories"]) == ["nut", "wood"]  # scores equal local ones: tests/test_storage.py
    assert all(values["n_images"] == 8 and 0 <= values["pixel_auroc"] <= 1 for values in metrics["categories"].values())
    assert (tmp_path / "fetched" / "report.md").is_file() and list((tmp_path / "fetched" / "heatmaps").rglob("*.png"))
    assert _nodes_of_actors(cluster, "MapWorker(MapBatches(_FeatureActor))") == {"head", "worker"}  # the fit's
    assert _nodes_of_actors(cluster, "RayTrainWorker") == {"head", "worker"}  # rlr's two workers, one per node
    assert _nodes_of_actors(cluster, "ImplicitFunc") == {"head", "worker"}  # the sweep's two trials, one per node
    assert json.loads(storage.cat_file(f"{bucket}/models/rlr/config.json"))["method"] == "rlr"
    trials = list(csv.DictReader(io.StringIO(storage.cat_file(f"{bucket}/sweeps/patchcore/results.csv").decode())))
    assert [row["status"] for row in trials] == ["ok", "ok"]
    assert storage.exists(f"{bucket}/sweeps/patchcore/best/config.json")
    stopped = subprocess.run(commands[-1], shell=True, cwd=REPO, env=cluster.env, capture_output=True, timeout=120)
    assert stopped.returncode == 0 and not subprocess.run(["pgrep", "-f", cluster.env["CLUSTER_DIR"]]).returncode == 0
