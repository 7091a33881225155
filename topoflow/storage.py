"""Storage through fsspec URLs (local paths, ``file://``, ``root://``, ``s3://``) with time-outs and
errors that say what to do; plus the atomic publication of a finished dataset.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from topoflow.config import StorageConfig
from topoflow.errors import StorageError

MANIFEST = "_manifest.json"
"""Written last into a dataset: a dataset without it is incomplete and must not be read."""


def protocol(url: str) -> str:
    """``file``, ``root``, ``s3``, … (a bare path is ``file``)."""
    scheme = urlsplit(url).scheme
    return scheme if len(scheme) > 1 else "file"  # "C:" is a drive letter, not a scheme


def fs_options(url: str, cfg: StorageConfig) -> dict[str, Any]:
    """fsspec keyword arguments for ``url``'s protocol."""
    proto = protocol(url)
    if proto == "s3":
        return cfg.s3_options()
    if proto == "root":
        xrootd_env(cfg)
        return {"timeout": cfg.timeout_s}
    return {}


def xrootd_env(cfg: StorageConfig) -> None:
    """Bound the XRootD client's waits (by default it retries a closed port for minutes)."""
    os.environ.setdefault("XRD_CONNECTIONRETRY", str(max(cfg.retries, 1)))
    os.environ.setdefault("XRD_REQUESTTIMEOUT", str(cfg.timeout_s))
    os.environ.setdefault("XRD_STREAMTIMEOUT", str(cfg.timeout_s))
    os.environ.setdefault("XRD_CONNECTIONWINDOW", str(min(cfg.timeout_s, 15)))


def filesystem(url: str, cfg: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it, after checking that the endpoint answers."""
    check_reachable(url, cfg)
    with storage_errors(url):
        fs, path = fsspec.core.url_to_fs(url, **fs_options(url, cfg))
    fs.invalidate_cache()  # instances are shared: another task may have changed the listing since
    return fs, path


def check_reachable(url: str, cfg: StorageConfig) -> None:
    """Fail in seconds, naming the endpoint, when nothing listens there (XRootD and S3)."""
    proto = protocol(url)
    if proto == "root":
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or 1094
    elif proto == "s3":
        endpoint = cfg.s3_options().get("endpoint_url")
        if not endpoint:
            return
        parts = urlsplit(endpoint)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    else:
        return
    try:
        with socket.create_connection((host, port), timeout=min(cfg.timeout_s, 10)):
            pass
    except OSError as e:
        what = "XRootD server" if proto == "root" else "S3 endpoint"
        raise StorageError(
            f"cannot reach the {what} at {host}:{port}: {e.strerror or e}\n"
            f"for URL {url}\n"
            "check the host and port, that the server runs, and that this machine may connect to it"
        ) from e


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn the many storage client exceptions into one :class:`StorageError` naming URL and fix."""
    try:
        yield
    except StorageError:
        raise
    except PermissionError as e:
        if protocol(url) == "s3":
            fix = ("check the S3 credentials (storage.s3_access_key_id and storage.s3_secret_access_key, "
                   "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) and that they may use this bucket")
        else:
            fix = "check the permissions on this location"
        raise StorageError(f"access denied: {e}\nfor URL {url}\n{fix}") from e
    except (TimeoutError, ConnectionError) as e:
        raise StorageError(f"storage did not answer in time: {e}\nfor URL {url}\ncheck the endpoint") from e
    except OSError as e:
        if type(e).__name__ in ("ClientError", "NoCredentialsError", "EndpointConnectionError"):
            raise StorageError(f"S3 request failed: {e}\nfor URL {url}\ncheck endpoint and credentials") from e
        raise


def expand(pattern: str, cfg: StorageConfig, missing_ok: bool = False) -> list[str]:
    """The URLs a path, URL or glob names, sorted; fails when it names nothing (unless ``missing_ok``)."""
    fs, path = filesystem(pattern, cfg)
    with storage_errors(pattern):
        if fsspec.core.has_magic(path):
            found = sorted(fs.glob(path))
        else:
            found = [path] if fs.exists(path) else []
    if not found and not missing_ok:
        raise StorageError(
            f"no file matches {pattern!r}\ncheck the path or glob (and for s3:// the bucket name)"
        )
    return [_unstrip(pattern, fs, p) for p in found]


def _unstrip(original: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Give a path found by ``fs`` back its protocol prefix (and host, for XRootD)."""
    proto = protocol(original)
    if proto == "file":
        return os.path.normpath(path)
    if proto == "root":
        parts = urlsplit(original)
        return f"root://{parts.netloc}/{path if path.startswith('/') else '/' + path}"
    return fs.unstrip_protocol(path)


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def write_json(fs: fsspec.AbstractFileSystem, path: str, data: Any) -> None:
    with fs.open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def staging_url(output: str) -> str:
    """A fresh sibling of ``output`` where a job writes before publishing."""
    return f"{output.rstrip('/')}.staging-{uuid.uuid4().hex[:12]}"


def new_staging(output: str, cfg: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """Clear staging areas that killed runs left beside ``output``, and name a fresh one:
    ``(filesystem, staging URL, staging path)``."""
    fs, path = filesystem(output, cfg)
    for stale in fs.glob(path.rstrip("/") + ".staging-*"):
        discard(fs, stale)
    url = staging_url(output)
    return fs, url, filesystem(url, cfg)[1]


def publish(fs: fsspec.AbstractFileSystem, staging: str, final: str, manifest: dict[str, Any]) -> None:
    """Replace ``final`` with the finished ``staging`` dataset; the manifest, written last, marks it
    complete. A crash part-way leaves either the old complete dataset or one without a manifest."""
    if fs.exists(final):
        if fs.exists(join(final, MANIFEST)):
            fs.rm(join(final, MANIFEST))
        fs.rm(final, recursive=True)
    if isinstance(fs, LocalFileSystem):
        fs.mv(staging, final, recursive=True)  # one rename
    else:  # object stores have no directories to rename: move the files one by one
        for src in fs.find(staging):
            fs.mv(src, final + src[len(staging):])
        discard(fs, staging)
    write_json(fs, join(final, MANIFEST), manifest)


def publish_folder(folder: str, output: str, cfg: StorageConfig, manifest: dict[str, Any]) -> None:
    """Upload a finished local folder to ``output`` (any URL) and publish it like a dataset."""
    fs, _, staging = new_staging(output, cfg)
    final = filesystem(output, cfg)[1]
    with storage_errors(output):
        fs.put(folder, staging, recursive=True)
        publish(fs, staging, final, manifest)


def discard(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove a staging area, ignoring one that is already gone."""
    if fs.exists(path):
        fs.rm(path, recursive=True)


def read_manifest(url: str, cfg: StorageConfig) -> dict[str, Any]:
    """The manifest of a complete dataset; a clear error for a missing or incomplete one."""
    fs, path = filesystem(url, cfg)
    with storage_errors(url):
        if not fs.exists(join(path, MANIFEST)):
            raise StorageError(
                f"no complete dataset at {url!r}: {MANIFEST} is missing\n"
                "the job that wrote it failed or is still running; run it (again) to completion"
            )
        with fs.open(join(path, MANIFEST)) as f:
            return json.load(f)
