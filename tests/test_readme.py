"""The README's two commands are the ones users and CI run: CI must run the README's test command verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_run_and_test_commands() -> None:
    run_command, test_command = _readme_commands()[:2]
    assert run_command.endswith("reconray run")
    assert "pytest" in test_command and '".[test]"' in test_command


def test_ci_runs_the_readme_test_command() -> None:
    assert _readme_commands()[1] in (ROOT / ".ci" / "run").read_text().splitlines()
