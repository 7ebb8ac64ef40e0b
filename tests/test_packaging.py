"""The distribution installs one importable name, `reconray`, and the command line reports its version."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import reconray
from reconray.pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration  # builds the wheel with pip in a subprocess
def test_the_wheel_holds_exactly_one_top_level_package(tmp_path: Path) -> None:
    """A generic top-level `methods` or `pipelines` would shadow, or be shadowed by, any other package of that name."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, timeout=600, cwd=tmp_path)
    (wheel,) = tmp_path.glob("reconray-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
        (metadata,) = {name.split("/")[0] for name in names} - top_level
        declared = archive.read(f"{metadata}/top_level.txt").decode().split()
    assert top_level == {"reconray"} and declared == ["reconray"]
    assert {"reconray/__init__.py", "reconray/methods/base.py", "reconray/pipelines/cli.py"} <= set(names)
    assert not [name for name in names if name.startswith(("reconray/tests", "reconray/benchmarks"))]
    assert metadata == f"reconray-{reconray.__version__}.dist-info"


def test_version_is_reported_by_the_command_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"reconray {reconray.__version__}"
