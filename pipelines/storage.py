"""Where inputs and outputs live: local paths, shared filesystems, or object-storage URIs (s3://, gs://, ...).

A URI is read through fsspec (`s3fs` for s3://, configured the usual way: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
profiles; `gcsfs` for gs://), so a bucket prefix is browsed like a folder and an image or mask is read straight from
the object, by the driver's validation pass and by every Ray Data worker on whatever node it runs. Local paths are
plain `Path`s and behave exactly as before.

Outputs go to a URI through a local staging folder that is uploaded when the command ends, also when it fails, so
what was computed is kept. A model given as a URI is downloaded into a node-local cache keyed by the URI and then
hash-verified like any local artifact; each score actor and serve replica fetches its own copy, so no node needs a
path only another node sees.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from reconray.methods.errors import ArtifactError, DatasetError, OptionError, ReconrayError

logger = logging.getLogger(__name__)

MODEL_CACHE_ENV = "RECONRAY_MODEL_CACHE"


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` locations other than `file://` (those are local paths)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def joined(location: str | Path, relative: str) -> str:
    """Where `relative` lies under `location`, a folder or a URI (for messages and records)."""
    return f"{str(location).rstrip('/')}/{relative}" if is_uri(location) else str(Path(location) / relative)


def as_location(location: str | Path) -> Any:
    """A pathlib-like handle: `Path` (expanded, absolute) for a local path, a `UPath` over fsspec for a URI."""
    if not is_uri(location):
        return Path(str(location).removeprefix("file://")).expanduser().resolve()
    from upath import UPath

    return UPath(str(location))


def open_binary(location: str | Path) -> IO[bytes] | str:
    """What Pillow opens: the path itself when local, an open fsspec file when a URI (the caller closes it)."""
    if not is_uri(location):
        return str(location)
    import fsspec

    with storage_errors(location, DatasetError):
        return fsspec.open(str(location), "rb").open()


@contextlib.contextmanager
def storage_errors(location: str | Path, error_class: type[ReconrayError] = DatasetError) -> Iterator[None]:
    """Turns object-storage failures (no bucket, no credentials, access denied) into one line naming the URI."""
    if not is_uri(location):
        yield
        return
    try:
        yield
    except ReconrayError:
        raise
    except FileNotFoundError as error:
        raise error_class(f"{location}: not found ({_bucket_hint(location, error)})") from error
    except PermissionError as error:
        raise error_class(f"{location}: access denied ({error})") from error
    except Exception as error:
        if type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise error_class(f"{location}: no credentials for object storage (set AWS_ACCESS_KEY_ID and "
                              f"AWS_SECRET_ACCESS_KEY, or a profile)") from error
        if type(error).__name__ in ("ClientError", "EndpointConnectionError", "ConnectTimeoutError"):
            raise error_class(f"{location}: object storage refused the request ({error})") from error
        raise


def _bucket_hint(location: str | Path, error: Exception) -> str:
    """Says whether the bucket itself is missing, the commonest mistake with a new endpoint."""
    filesystem, path = _filesystem(location)
    bucket = path.split("/", 1)[0]
    try:
        missing = not filesystem.exists(bucket)
    except Exception:  # the probe is only a hint; the original error is what counts
        missing = False
    return f"bucket {bucket!r} does not exist" if missing else str(error) or "no such object"


def glob_locations(pattern: str) -> list[Any]:
    """The files and folders matching a glob pattern (`**` spans folders), sorted, as `as_location` handles."""
    if not is_uri(pattern):
        return sorted(Path(match) for match in glob.glob(pattern, recursive=True))
    filesystem, path = _filesystem(pattern)
    with storage_errors(pattern, DatasetError):
        return [as_location(filesystem.unstrip_protocol(match)) for match in sorted(filesystem.glob(path))]


def modified_time(location: str | Path) -> float:
    """Last modification of a file or object, in seconds since the epoch (part of a feature cache's key)."""
    if not is_uri(location):
        return Path(location).stat().st_mtime
    filesystem, path = _filesystem(location)
    with storage_errors(location, DatasetError):
        modified = filesystem.modified(path)
    return modified.timestamp()


@contextlib.contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """A local folder to write `out` into: `out` itself when local; for a URI a temporary folder whose contents are
    uploaded to the URI when the block ends, whether it succeeded or failed (nothing computed is lost)."""
    if not is_uri(out):
        yield Path(out)
        return
    filesystem, root = _filesystem(out)
    with storage_errors(out, DatasetError):  # no bucket or no credentials: refused before any work starts
        if not filesystem.exists(root.split("/", 1)[0]):
            raise FileNotFoundError(str(out))
    staging = Path(tempfile.mkdtemp(prefix="reconray-out-"))
    try:
        yield staging
    finally:
        upload(staging, out)
        shutil.rmtree(staging, ignore_errors=True)


def upload(local_dir: Path, uri: str | Path) -> None:
    """Copies every file under `local_dir` to the same relative key under `uri`."""
    filesystem, root = _filesystem(uri)
    files = sorted(path for path in local_dir.rglob("*") if path.is_file())
    with storage_errors(uri, DatasetError):
        for path in files:
            filesystem.put_file(str(path), f"{root.rstrip('/')}/{path.relative_to(local_dir).as_posix()}")
    logger.info("uploaded %d files to %s", len(files), uri)


def local_model(model: str | Path) -> Path:
    """The artifact folder `model` on this node: itself when local, else a copy fetched into the model cache.

    The copy is refreshed whenever the stored config.json differs from the cached one, and `load_artifact` checks
    every file's sha256 afterwards, so a stale or truncated download cannot be scored with.
    """
    if not is_uri(model):
        return Path(model)
    from reconray.methods.artifact import CONFIG_FILE, verify_files

    filesystem, root = _filesystem(model)
    cache = Path(os.environ.get(MODEL_CACHE_ENV, Path(tempfile.gettempdir()) / "reconray-models"))
    target = cache / hashlib.sha256(str(model).rstrip("/").encode()).hexdigest()[:16]
    with storage_errors(model, ArtifactError):
        remote_config = filesystem.cat_file(f"{root.rstrip('/')}/{CONFIG_FILE}")
        cached = target / CONFIG_FILE
        if cached.is_file() and cached.read_bytes() == remote_config:
            return target
        fresh = Path(tempfile.mkdtemp(prefix="fetch-", dir=_made(cache)))
        for key in filesystem.find(root):
            relative = key[len(root.rstrip("/")) + 1:]
            filesystem.get_file(key, str(_made((fresh / relative).parent) / Path(relative).name))
    try:
        verify_files(fresh)
    except ArtifactError as error:
        shutil.rmtree(fresh, ignore_errors=True)
        raise ArtifactError(f"{model}: {str(error).replace(str(fresh), model.rstrip('/'))}") from error
    shutil.rmtree(target, ignore_errors=True)
    fresh.rename(target)  # atomic on one filesystem: a concurrent reader sees the old copy or the new, never half
    logger.info("fetched model %s into %s", model, target)
    return target


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _filesystem(uri: str | Path) -> tuple[Any, str]:
    """The fsspec filesystem of `uri` and the path inside it; an unknown scheme or missing driver names the URI."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(uri))
    except (ImportError, ValueError) as error:
        raise OptionError(f"{uri}: no filesystem for this URI ({error})") from error

