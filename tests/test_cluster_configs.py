"""Cluster configs: the KubeRay manifests hold only fields of the KubeRay v1 API and run the image cluster/Dockerfile
builds, the cluster-launcher YAML passes Ray's own schema, and every `reconray` command line in them parses with the
real CLI (and its Serve arguments are valid `ServeOptions`)."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from reconray import __version__
from reconray.methods import create_method
from reconray.pipelines.cli import _parser, parse_key_values
from reconray.pipelines.serve import ServeOptions

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
MANIFESTS = ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml")
IMAGE = re.compile(rf"reconray:{re.escape(__version__.rsplit('.', 1)[0])}-(cpu|gpu)")

# The JSON fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/*_types.go, v1.1 to the current one) and the
# ones its CRDs require; a key outside these would be dropped or refused by the API server.
KUBERAY_V1 = {
    "RayClusterSpec": ({"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                        "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                        "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
                        "workerGroupSpecs"}, {"headGroupSpec"}),
    "HeadGroupSpec": ({"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                       "rayStartParams", "serviceType"}, {"template"}),
    "WorkerGroupSpec": ({"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                         "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy",
                         "numOfHosts"}, {"groupName", "template"}),
    "RayJobSpec": ({"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}, set()),
    "RayServiceSpec": ({"rayClusterDeletionDelaySeconds", "serviceUnhealthySecondThreshold",
                        "deploymentUnhealthySecondThreshold", "serveService", "upgradeStrategy", "serveConfigV2",
                        "rayClusterConfig", "excludeHeadPodFromServeSvc"}, {"rayClusterConfig"}),
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def _manifest(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _check(kind: str, spec: dict, where: str) -> None:
    fields, required = KUBERAY_V1[kind]
    assert set(spec) <= fields, f"{where}: not in KubeRay v1 {kind}: {sorted(set(spec) - fields)}"
    assert required <= set(spec), f"{where}: {kind} lacks {sorted(required - set(spec))}"


def _check_cluster(spec: dict, where: str) -> list[dict]:
    """Checks a RayClusterSpec and its groups; returns every container of its pods."""
    _check("RayClusterSpec", spec, where)
    assert spec["rayVersion"] == "2.60.0", where
    _check("HeadGroupSpec", spec["headGroupSpec"], f"{where}.headGroupSpec")
    groups = spec.get("workerGroupSpecs", [])
    for group in groups:
        _check("WorkerGroupSpec", group, f"{where}.workerGroupSpecs[{group['groupName']}]")
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 2**31), group
    return [container for group in [spec["headGroupSpec"], *groups] for container in group["template"]["spec"]
            ["containers"]]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifests_use_only_v1_fields_and_the_project_image(name: str) -> None:
    manifest = _manifest(name)
    assert manifest["apiVersion"] == "ray.io/v1" and set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
    kind, spec = manifest["kind"], manifest["spec"]
    if kind == "RayCluster":
        containers = _check_cluster(spec, name)
    elif kind == "RayJob":
        _check("RayJobSpec", spec, name)
        assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
        yaml.safe_load(spec["runtimeEnvYAML"])
        containers = _check_cluster(spec["rayClusterSpec"], f"{name}.rayClusterSpec")
    else:
        assert kind == "RayService", name
        _check("RayServiceSpec", spec, name)
        containers = _check_cluster(spec["rayClusterConfig"], f"{name}.rayClusterConfig")
    for container in containers:
        assert IMAGE.fullmatch(container["image"]), f"{name}: {container['image']} is not built by cluster/Dockerfile"
        assert {"secretRef": {"name": "reconray-storage"}} in container.get("envFrom", []), name
        assert not any(entry["name"].startswith("AWS_") for entry in container.get("env", [])), "credentials inline"
    assert "persistentVolumeClaim" not in (CLUSTER / name).read_text(), f"{name}: a shared volume, not object storage"


def test_the_launcher_config_passes_ray_s_schema_and_runs_the_project_image() -> None:
    config = yaml.safe_load((CLUSTER / "aws-launcher.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own cluster-launcher JSON schema, after `ray up`'s defaults
    assert config["available_node_types"][config["head_node_type"]]
    for image in (config["docker"]["head_image"], config["docker"]["worker_image"]):
        assert IMAGE.search(image), image
    assert "AWS_SECRET_ACCESS_KEY" not in (CLUSTER / "aws-launcher.yaml").read_text()


def test_the_dockerfile_builds_on_ray_2_60_from_the_project_alone() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-\$\{VARIANT\}$", text, re.MULTILINE)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.MULTILINE)  # the GPU variant: --build-arg VARIANT=gpu
    root = CLUSTER.parent
    for sources in re.findall(r"^COPY --chown=\S+ (.+) \S+$", text, re.MULTILINE):
        for source in sources.split():
            assert (root / source).exists(), f"cluster/Dockerfile copies {source}, which is not in the repository"
    installs = re.findall(r"pip install [^;&]*", text)
    assert installs and all(re.search(r'"\.\[[a-z,]+\]"', line) for line in installs), installs  # only reconray


def _reconray_commands() -> list[list[str]]:
    """The `reconray` command lines of cluster/: the RayJob entrypoint and the README's cluster commands."""
    entrypoint = shlex.split(_manifest("rayjob.yaml")["spec"]["entrypoint"])
    readme = (CLUSTER.parent / "README.md").read_text()
    submitted = [shlex.split(line.split(" -- ", 1)[1].rstrip("\\ ")) for line in readme.splitlines()
                 if line.startswith("ray job submit") and " -- reconray " in line]
    assert entrypoint[0] == "reconray" and submitted, "cluster/ and README no longer hold the commands this test checks"
    return [entrypoint[1:], *(command[1:] for command in submitted)]


def test_every_reconray_command_in_cluster_configs_parses_with_the_real_cli() -> None:
    commands = _reconray_commands()
    assert any(command[0] == "fit" for command in commands), commands
    for command in commands:
        args = _parser().parse_args(command)  # argparse exits on an unknown flag or a bad value
        if args.command == "fit":
            create_method(args.method, **parse_key_values(args.options))  # --set values are real, valid options


def test_rayservice_args_are_valid_serve_options() -> None:
    service = _manifest("rayservice.yaml")
    application = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert application["import_path"] == "reconray.pipelines.serve:build_app"
    assert application["args"]["model_dir"].startswith("s3://")
    ServeOptions(**application["args"])
