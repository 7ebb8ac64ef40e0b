"""What a person sees: reconray's own log lines and one progress bar per stage; Ray's output goes to a log file.

Ray writes to the terminal from many places: Python loggers (streaming-executor plans, token-auth notices, Train's
controller warnings), the C++ core worker (straight to file descriptor 2), and the log monitor that echoes every
worker's and raylet's output to stdout and stderr. Only a redirection of descriptors 1 and 2 themselves catches all
of them, so `console_session` points both at the run's log file and gives reconray's console handler and progress
bars a duplicate of the original stderr.
With `verbose` nothing is redirected and every logger shows on the console.

Example:
    >>> with console_session(Path("runs/x/reconray.log")):
    ...     with stage("extract features", total=120) as advance:
    ...         for batch in batches:
    ...             advance(len(batch))
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from tqdm import tqdm

LOGGER_NAME = "reconray"
FILE_ONLY_LOGGER = f"{LOGGER_NAME}.log_file"
"""Records of this logger reach the log file but not the console: per-epoch detail of long runs."""
_LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_console: IO[str] | None = None
"""The terminal stream of the running `console_session` (None outside one: then `sys.stderr`)."""


def console_stream() -> IO[str]:
    """Where reconray's own console output goes: the terminal, even while descriptor 2 feeds the log file."""
    return _console or sys.stderr


@contextlib.contextmanager
def console_session(log_file: Path | None, verbose: bool = False) -> Iterator[None]:
    """Routes logging for one command: reconray's INFO lines to the console, everything to `log_file`.

    Args:
        log_file: file that receives every log record and, unless `verbose`, all other output of descriptor 2
            (Ray, its workers, C++ code, warnings). None logs to the console only.
        verbose: show every logger on the console and redirect nothing.
    """
    global _console
    root = logging.getLogger()
    previous_level = root.level
    handlers: list[logging.Handler] = []
    saved: tuple[int, int] | None = None
    terminal = sys.stderr
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(_LINE_FORMAT))
        handlers.append(file_handler)
        if not verbose and _is_descriptor(sys.stderr, 2) and _is_descriptor(sys.stdout, 1):
            sys.stdout.flush()
            sys.stderr.flush()
            saved = (os.dup(1), os.dup(2))
            terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
            with log_file.open("a") as log:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
    console_handler = logging.StreamHandler(terminal)
    console_handler.setFormatter(logging.Formatter("%(message)s"))
    if not verbose:
        console_handler.addFilter(_console_record)
    handlers.append(console_handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    _console = terminal
    try:
        yield
    finally:
        _console = None
        logging.captureWarnings(False)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)
        if saved is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            for descriptor, original in zip((1, 2), saved, strict=True):
                os.dup2(original, descriptor)
                os.close(original)
            terminal.close()


def _console_record(record: logging.LogRecord) -> bool:
    """reconray's own records, except the per-step detail meant for the log file only."""
    return (record.name == LOGGER_NAME or record.name.startswith(f"{LOGGER_NAME}.")) and not (
        record.name == FILE_ONLY_LOGGER or record.name.startswith(f"{FILE_ONLY_LOGGER}."))


@contextlib.contextmanager
def stage(description: str, total: int | None, unit: str = "image") -> Iterator[Callable[[int], None]]:
    """A progress bar (count, rate, ETA) on an interactive console, then one summary line when the stage succeeds.

    Yields the function that advances the bar by a number of `unit`s.
    """
    stream = console_stream()
    bar = tqdm(total=total, desc=description, unit=unit, file=stream, leave=False, dynamic_ncols=True,
               disable=not _is_terminal(stream))
    started = time.perf_counter()
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        bar.update(count)

    try:
        yield advance
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    rate = done / max(elapsed, 1e-9)
    shown_rate = f"{rate:.0f}" if rate >= 100 else f"{rate:.2g}"
    logging.getLogger(LOGGER_NAME).info("%s: %d %s%s in %.1f s (%s/s)", description, done, unit,
                                        "" if done == 1 else "s", elapsed, shown_rate)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table for the end-of-command summary: columns padded, floats to 3 decimals."""
    cells = [[_cell(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _is_descriptor(stream: IO[str], descriptor: int) -> bool:
    try:
        return stream.fileno() == descriptor
    except (AttributeError, OSError, ValueError):
        return False


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
