"""The README is executable documentation: its two opening commands are the ones users and CI run, and every
```bash and ```python block in it runs for real, in order, in one fresh folder, as Ray's doc_code snippets do.

A block that cannot run as it stands carries an HTML comment on the line right before its opening fence:
- `<!-- readme-test: skip: <reason> -->`: not run (the install block, which .ci/run runs; anything that truly cannot
  run here). The reason is required.
- `<!-- readme-test: background -->`: a long-running server (`reconray serve`, `serve run`). It is started in its
  own process group, the test waits until `/v1/health` answers, runs the following blocks of the same section (up to
  the next heading) against it, then stops it with SIGINT, as Ctrl-C would, and waits for it to exit.
Every other block must exit 0. Fenced blocks in other languages (yaml, text, ...) are not code to run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

RUN_LANGUAGES = ("bash", "python")
UNRUN_CODE_LANGUAGES = frozenset({"", "sh", "shell", "zsh", "console", "shell-session", "py", "python3", "pycon"})
"""Fence tags of code that would silently escape the test: such a block must be tagged bash or python instead."""
DIRECTIVES = ("skip", "background")
SERVER_HEALTH = "http://127.0.0.1:8000/v1/health"
SERVER_PORT = 8000
BLOCK_TIMEOUT_S = 300
SERVER_START_TIMEOUT_S = 180
SERVER_STOP_TIMEOUT_S = 60
OUTPUT_SHOWN = 12_000
"""Characters of a failed block's output shown in the failure (its end, where the error is)."""

_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
_ANY_MARKER = re.compile(r"readme-test")
_HEADING = re.compile(r"^#{1,6} ")
_RECONRAY_RUN = re.compile(r"^\s*[^#]*\breconray\s+run\b")


def _readme_commands() -> list[str]:
    text = README.read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_run_and_test_commands() -> None:
    run_command, test_command = _readme_commands()[:2]
    assert run_command.endswith("reconray run")
    assert "pytest" in test_command and '".[test]"' in test_command


def test_ci_runs_the_readme_test_command() -> None:
    assert _readme_commands()[1] in (ROOT / ".ci" / "run").read_text().splitlines()


# --- README blocks -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block of README.md.

    Attributes:
        language: the fence's tag (`bash`, `python`, `yaml`, `` for none).
        code: the block's text, without the fences.
        line: 1-based line of the opening fence.
        section: index of the heading the block sits under (a background server lives within one section).
        directive: `skip`, `background` or None (run it) from the marker line right before the fence; the marker's
            raw text when it is not one of those.
        reason: the text after `skip:`.
    """

    language: str
    code: str
    line: int
    section: int
    directive: str | None = None
    reason: str = ""

    @property
    def runnable(self) -> bool:
        return self.language in RUN_LANGUAGES

    def describe(self) -> str:
        return f"README.md line {self.line} ({self.language})"


def readme_blocks(text: str) -> tuple[list[Block], list[str]]:
    """Every fenced block of `text` in order, and the problems found while reading them (stray or bad markers)."""
    blocks, problems = [], []
    lines = text.splitlines()
    section, index = 0, 0
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if fence is None:
            if _HEADING.match(line):
                section += 1
            if _ANY_MARKER.search(line) and not (
                    _MARKER.match(line) and index + 1 < len(lines) and _FENCE.match(lines[index + 1])):
                problems.append(f"line {index + 1}: readme-test marker not on the line right before a fence: {line!r}")
            index += 1
            continue
        end = next((number for number in range(index + 1, len(lines)) if lines[number].rstrip() == "```"), None)
        if end is None:
            problems.append(f"line {index + 1}: fence never closed")
            break
        directive, reason = None, ""
        marker = _MARKER.match(lines[index - 1]) if index else None
        if marker:
            directive, _, reason = (part.strip() for part in marker.group(1).partition(":"))
        blocks.append(Block(fence.group(1), "\n".join(lines[index + 1:end]) + "\n", index + 1, section, directive,
                            reason))
        index = end + 1
    return blocks, problems


def block_problems(blocks: list[Block]) -> list[str]:
    """What would let a block escape the test or fail it for the wrong reason."""
    problems = []
    for block in blocks:
        where = block.describe()
        if block.language in UNRUN_CODE_LANGUAGES:
            problems.append(f"{where}: tag the block bash or python so that it is run (or give it a data language)")
        if block.directive is None:
            continue
        if not block.runnable:
            problems.append(f"{where}: readme-test marker on a block that is never run")
        elif block.directive not in DIRECTIVES:
            problems.append(f"{where}: unknown readme-test directive {block.directive!r} (known: {DIRECTIVES})")
        elif block.directive == "skip" and not block.reason:
            problems.append(f"{where}: a skipped block needs a reason (`readme-test: skip: <reason>`)")
        elif block.directive == "background" and block.language != "bash":
            problems.append(f"{where}: only a bash block can run a background server")
        elif block.directive == "background" and block.reason:
            problems.append(f"{where}: `background` takes no argument, got {block.reason!r}")
    for block in blocks[1:]:
        # `reconray run` takes minutes: the install line is the one place it is a command.
        if block.runnable and block.directive != "skip" and any(map(_RECONRAY_RUN.match, block.code.splitlines())):
            problems.append(f"{block.describe()}: runs `reconray run` (minutes); mention it in prose instead")
    return problems


def test_every_readme_block_is_run_or_skipped_with_a_reason() -> None:
    """Every bash and python block runs (in the foreground or as a background server) or says why it cannot."""
    blocks, problems = readme_blocks(README.read_text())
    assert problems + block_problems(blocks) == []
    runnable = [block for block in blocks if block.runnable]
    assert runnable[0].directive == "skip" and "reconray run" in runnable[0].code  # .ci/run runs the install block
    run = [block for block in runnable if block.directive != "skip"]
    assert len(run) >= len(runnable) - 1 and any(block.directive == "background" for block in run)


def test_the_block_reader_catches_escapes() -> None:
    """The checks above on a made-up README: each way of escaping the test is reported."""
    text = "\n".join([
        "# t", "<!-- readme-test: skip -->", "```bash", "echo", "```",
        "```sh", "ls", "```", "<!-- readme-test: background: now -->", "```bash", "serve", "```",
        "<!-- readme-test: sometimes -->", "```python", "pass", "```", "<!-- readme-test: skip: far from a fence -->",
        "", "```python", "import os", "```", "<!-- readme-test: background -->", "```python", "pass", "```",
        "```bash", "reconray run --out x", "```",
    ])
    blocks, problems = readme_blocks(text)
    assert [block.line for block in blocks] == [3, 6, 10, 14, 19, 23, 26]
    assert problems == ["line 17: readme-test marker not on the line right before a fence: "
                        "'<!-- readme-test: skip: far from a fence -->'"]
    found = block_problems(blocks)
    assert [problem.split(":")[0] for problem in found] == [f"README.md line {n} ({lang})" for n, lang in [
        (3, "bash"), (6, "sh"), (10, "bash"), (14, "python"), (23, "python"), (26, "bash")]]


# --- running them --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Server:
    block: Block
    process: subprocess.Popen
    log: Path


def _environment(ray_tmp: Path) -> dict[str, str]:
    """The user's environment, with this interpreter's scripts (`reconray`, `serve`, `python`) first on PATH.

    RAY_ADDRESS is dropped and Ray gets a temp dir of its own, so every command starts a local Ray, as on a laptop,
    instead of joining a cluster someone else started on this machine.
    """
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_TMPDIR"] = str(ray_tmp)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _command(block: Block, scripts: Path) -> list[str]:
    if block.language == "bash":
        return ["bash", "-euo", "pipefail", "-c", block.code]
    script = scripts / f"readme_line_{block.line}.py"
    script.write_text(block.code)
    return [sys.executable, str(script)]


def _kill_group(process: subprocess.Popen) -> None:
    """Kills what is left of a block's process group (the block's own session, so nothing of anyone else's)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _failure(block: Block, what: str, output: str) -> str:
    shown = output[-OUTPUT_SHOWN:]
    cut = "...\n" if len(output) > len(shown) else ""
    return f"{block.describe()} {what}\n--- block ---\n{block.code}--- output ---\n{cut}{shown}"


def _run(block: Block, cwd: Path, env: dict[str, str], scripts: Path) -> None:
    """Runs one block to completion; fails the test with the block and its output unless it exits 0."""
    log = scripts / f"readme_line_{block.line}.log"
    with log.open("w") as output:
        process = subprocess.Popen(_command(block, scripts), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.wait()
            pytest.fail(_failure(block, f"did not finish in {BLOCK_TIMEOUT_S} s", log.read_text(errors="replace")))
        finally:
            _kill_group(process)
    if returncode != 0:
        pytest.fail(_failure(block, f"exited with {returncode}", log.read_text(errors="replace")))


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _healthy() -> bool:
    try:
        with urllib.request.urlopen(SERVER_HEALTH, timeout=5) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _start(block: Block, cwd: Path, env: dict[str, str], scripts: Path) -> _Server:
    """Starts a background block in its own process group and waits until the server answers /v1/health."""
    deadline = time.monotonic() + SERVER_STOP_TIMEOUT_S
    while _port_in_use(SERVER_PORT):  # a server of a previous block still closing, or someone else's
        if time.monotonic() > deadline:
            pytest.fail(f"{block.describe()}: port {SERVER_PORT} is in use by another process; cannot start the server")
        time.sleep(1)
    log = scripts / f"readme_line_{block.line}.log"
    with log.open("w") as output:
        process = subprocess.Popen(_command(block, scripts), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    server = _Server(block, process, log)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not _healthy():
        if process.poll() is not None:
            _kill_group(process)
            pytest.fail(_failure(block, f"exited with {process.returncode} before {SERVER_HEALTH} answered",
                                 log.read_text(errors="replace")))
        if time.monotonic() > deadline:
            _stop(server, check=False)
            pytest.fail(_failure(block, f"did not answer {SERVER_HEALTH} within {SERVER_START_TIMEOUT_S} s",
                                 log.read_text(errors="replace")))
        time.sleep(1)
    return server


def _stop(server: _Server, check: bool = True) -> None:
    """Ctrl-C for the server's process group, then waits; a server that ignores it is killed and, if `check`, fails."""
    process = server.process
    stopped = True
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stopped = False
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                process.wait()
    _kill_group(process)
    if check and not stopped:
        pytest.fail(_failure(server.block, f"did not stop within {SERVER_STOP_TIMEOUT_S} s of SIGINT (Ctrl-C)",
                             server.log.read_text(errors="replace")))


@contextlib.contextmanager
def _ray_temp_dir() -> Iterator[Path]:
    """A short private folder for Ray's sessions: its unix socket paths must stay under 108 characters."""
    path = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.integration  # runs reconray, Ray and Serve in subprocesses
def test_readme_code_blocks_run(tmp_path: Path) -> None:
    """Runs the README's bash and python blocks in order in one fresh folder, servers in the background."""
    blocks, problems = readme_blocks(README.read_text())
    assert problems + block_problems(blocks) == []
    work, scripts = tmp_path / "work", tmp_path / "blocks"
    work.mkdir()
    scripts.mkdir()
    outcome: dict[int, str] = {}
    with _ray_temp_dir() as ray_tmp:
        env = _environment(ray_tmp)
        server: _Server | None = None
        try:
            for block in blocks:
                if not block.runnable:
                    continue
                if server is not None and (block.section != server.block.section or block.directive == "background"):
                    _stop(server)
                    server = None
                if block.directive == "skip":
                    outcome[block.line] = f"skipped: {block.reason}"
                elif block.directive == "background":
                    server = _start(block, work, env, scripts)
                    outcome[block.line] = "served"
                else:
                    _run(block, work, env, scripts)
                    outcome[block.line] = "ran"
            if server is not None:
                _stop(server)
                server = None
        finally:
            if server is not None:
                _stop(server, check=False)
    assert sorted(outcome) == [block.line for block in blocks if block.runnable]
