"""Cluster configs parse, name reconray's real entry points, and the RayService builder accepts its args."""

from pathlib import Path

import yaml

from reconray.methods import METHODS
from reconray.pipelines.serve import ServeOptions

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_every_cluster_yaml_parses_and_pins_ray_2_60() -> None:
    for path in sorted(CLUSTER.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        assert spec, path
        text = path.read_text()
        if "rayVersion" in text:
            assert 'rayVersion: "2.60.0"' in text, path


def test_rayjob_entrypoint_uses_real_method_options() -> None:
    entrypoint = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]["entrypoint"]
    method = entrypoint.split("--method ")[1].split()[0]
    options = [part.split("=")[0] for part in entrypoint.split("--set ")[1:]]
    assert set(options) <= set(METHODS[method].defaults), options


def test_rayservice_args_are_valid_serve_options() -> None:
    service = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    application = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert application["import_path"] == "reconray.pipelines.serve:build_app"
    ServeOptions(**application["args"])
