"""The one root of reconray's user-facing errors, in the spirit of anomalib's `data/errors.py`.

A `ReconrayError` is a problem with what the user gave (a dataset, an artifact, an option) or with the order of
calls (a method used before it was fitted); its message names the file, URI or value and says what is accepted.
The command line prints these as one line and exits 2. Anything else is a bug and keeps its traceback (exit 1).
The subclasses are also `ValueError`s, so code written against the standard exception keeps catching them.
"""

from __future__ import annotations


class ReconrayError(Exception):
    """Root of every error caused by the input rather than by reconray itself."""


class DatasetError(ReconrayError, ValueError):
    """Input data that cannot be used as it is; the message names the file or folder and the problem."""


class ArtifactError(ReconrayError, ValueError):
    """An artifact directory that cannot be loaded as it is (missing, tampered, or from another schema)."""


class OptionError(ReconrayError, ValueError):
    """A method, backbone, training or command option that is unknown or out of range; the message names it."""


class NotFittedError(ReconrayError, ValueError):
    """A method asked to score or save before it was fitted or loaded."""

    def __init__(self, method: str, action: str) -> None:
        super().__init__(f"{method} is not fitted: {action} needs fit() or a loaded artifact first")


def check_fitted(method: str, fitted: bool, action: str) -> None:
    """Raises `NotFittedError` for `method` when it is not `fitted` yet; `action` names what was attempted."""
    if not fitted:
        raise NotFittedError(method, action)
