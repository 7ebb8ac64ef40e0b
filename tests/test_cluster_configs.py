"""Cluster configs parse, name reconray's real entry points, and the RayService builder accepts its args."""

import re
import shlex
from pathlib import Path

import yaml

from reconray.methods import create_method
from reconray.pipelines.cli import _parser, parse_key_values
from reconray.pipelines.serve import ServeOptions

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_every_cluster_yaml_parses_and_pins_ray_2_60() -> None:
    for path in sorted(CLUSTER.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        assert spec, path
        text = path.read_text()
        if "rayVersion" in text:
            assert 'rayVersion: "2.60.0"' in text, path


def _reconray_commands() -> list[list[str]]:
    """The `reconray` command lines of cluster/: the RayJob entrypoint and the two-node script's default job."""
    entrypoint = shlex.split(yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]["entrypoint"])
    default_job = re.search(r"\|\| args=\(([^)]*)\)", (CLUSTER / "local_two_node.sh").read_text())
    assert entrypoint[0] == "reconray" and default_job, "cluster/ no longer holds the commands this test checks"
    return [entrypoint[1:], shlex.split(default_job[1])]


def test_every_reconray_command_in_cluster_configs_parses_with_the_real_cli() -> None:
    commands = _reconray_commands()
    assert any(command[0] == "fit" for command in commands), commands
    for command in commands:
        args = _parser().parse_args(command)  # argparse exits on an unknown flag or a bad value
        if args.command == "fit":
            create_method(args.method, **parse_key_values(args.options))  # --set values are real, valid options


def test_rayservice_args_are_valid_serve_options() -> None:
    service = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    application = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert application["import_path"] == "reconray.pipelines.serve:build_app"
    ServeOptions(**application["args"])
