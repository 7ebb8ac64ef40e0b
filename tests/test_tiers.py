"""The unit/integration tiers of conftest.py: `-m unit` must select exactly the tests that run without Ray.

Generated test files are collected in-process with the repo's own conftest module as a plugin (no Ray: collecting
runs no fixture); the one run that must start Ray does so in a child process and is itself an integration test.
"""

import inspect
from pathlib import Path

import conftest
import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
CHILDREN = ("subprocess", "Popen", "NotebookClient")
"""What in a test's body starts a child process."""

GENERATED = """
import pytest

@pytest.fixture
def cluster(ray_session):
    return ray_session

def test_plain():
    pass

def test_session(ray_session):
    pass

def test_through_fixture(cluster):
    pass

@pytest.mark.integration
def test_marked():
    pass
"""


@pytest.fixture
def generated(pytester: pytest.Pytester) -> pytest.Pytester:
    """A directory with the repo's pytest settings (strict markers, the two tiers registered) and no conftest."""
    pytester.makepyprojecttoml((ROOT / "pyproject.toml").read_text())
    return pytester


def _selected(pytester: pytest.Pytester, *args: str) -> list[str]:
    result = pytester.runpytest("--collect-only", "-q", *args, plugins=[conftest])
    return [line.split("::")[1] for line in result.outlines if "::" in line]


def test_ray_session_users_are_integration_and_the_rest_unit(generated: pytest.Pytester) -> None:
    """Through `-m`, so the tiers must be assigned before pytest deselects."""
    generated.makepyfile(test_generated=GENERATED)
    assert _selected(generated, "-m", "unit", "test_generated.py") == ["test_plain"]
    assert _selected(generated, "-m", "integration", "test_generated.py") == [
        "test_session", "test_through_fixture", "test_marked"]


def test_contradicting_or_unknown_tiers_are_collection_errors(generated: pytest.Pytester) -> None:
    """A contradiction or a typo stops the run instead of leaving a test in the wrong tier, or in none."""
    generated.makepyfile(test_typo="""
        import pytest

        @pytest.mark.intergration
        def test_typo():
            pass
    """, test_generated="""
        import pytest

        @pytest.mark.unit
        @pytest.mark.integration
        def test_both():
            pass

        @pytest.mark.unit
        def test_unit_with_ray(ray_session):
            pass
    """)
    result = generated.runpytest("--collect-only", "-q", plugins=[conftest])
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*ERROR collecting test_generated.py*",
                                 "test_generated.py::test_both: marked both unit and integration",
                                 "test_generated.py::test_unit_with_ray: marked unit but uses ray_session",
                                 "*ERROR collecting test_typo.py*",
                                 "*'intergration' not found in `markers` configuration option*"])


def test_every_test_of_the_suite_has_exactly_one_tier(pytester: pytest.Pytester) -> None:
    """Collects the real suite again, in-process (its modules are already imported), with its own settings.

    A test whose body starts a child process (`reconray`, `ray start`, a notebook kernel) must be integration: the
    conftest cannot see Ray in another process.
    """
    recorder = pytester.inline_run("--collect-only", str(ROOT / "tests"))
    assert [report.nodeid for report in recorder.getfailedcollections()] == []
    items = [call.item for call in recorder.getcalls("pytest_itemcollected")]
    assert items
    tiers = {item.nodeid: {mark.name for mark in item.iter_markers() if mark.name in conftest.TIERS} for item in items}
    assert {nodeid: names for nodeid, names in tiers.items() if len(names) != 1} == {}
    children = [item.nodeid for item in items if any(word in inspect.getsource(item.function) for word in CHILDREN)]
    assert children
    assert [nodeid for nodeid in children if tiers[nodeid] != {"integration"}] == []


@pytest.mark.integration  # starts Ray in a child pytest
def test_a_unit_test_that_starts_ray_fails(generated: pytest.Pytester) -> None:
    """Only the test that started Ray is blamed: the unit test after it finds Ray already up and passes."""
    generated.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    generated.makepyfile(test_generated="""
        import ray

        def test_starts_ray():
            ray.init(address="local", num_cpus=1, include_dashboard=False)

        def test_plain():
            pass
    """)
    result = generated.runpytest_subprocess("-p", "no:cacheprovider", "test_generated.py")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["test_generated.py::test_starts_ray is a unit test but started Ray*"])
