"""Storage through fsspec URLs (local paths, ``file://``, ``root://``, ``s3://``) with time-outs and
errors that say what to do; plus the atomic publication of a finished dataset.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator
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
    if proto == "s3":
        _check_speaks_s3(endpoint, url, min(cfg.timeout_s, 10))


_S3_ENDPOINTS: set[str] = set()  # endpoints seen answering as S3 in this process


def _check_speaks_s3(endpoint: str, url: str, timeout: float) -> None:
    """An endpoint that answers but is no S3 service lists no files, which reads as "no file
    matches": ask it once. Every S3 service (AWS, SeaweedFS, MinIO, Ceph) answers an anonymous
    ``GET /`` with x-amz-* headers or an XML document, even when it refuses."""
    import urllib.error
    import urllib.request

    if endpoint in _S3_ENDPOINTS:
        return
    try:
        response = urllib.request.urlopen(endpoint.rstrip("/") + "/", timeout=timeout)
    except urllib.error.HTTPError as e:
        response = e
    except OSError as e:
        raise StorageError(f"the S3 endpoint {endpoint} does not answer HTTP: {e}\nfor URL {url}\n"
                           "check storage.s3_endpoint_url (or AWS_ENDPOINT_URL): scheme, host and port") from e
    with response:
        headers = {k.lower(): v for k, v in response.headers.items()}
    if not any(k.startswith("x-amz-") for k in headers) and "xml" not in headers.get("content-type", ""):
        server = headers.get("server", "unknown server")
        raise StorageError(f"the endpoint {endpoint} answers HTTP but is not an S3 service ({server})\n"
                           f"for URL {url}\ncheck storage.s3_endpoint_url (or AWS_ENDPOINT_URL): host and port")
    _S3_ENDPOINTS.add(endpoint)


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
        if type(e).__name__ in ("ClientError", "EndpointConnectionError"):
            raise StorageError(f"S3 request failed: {e}\nfor URL {url}\ncheck endpoint and credentials") from e
        raise
    except Exception as e:
        if type(e).__name__ == "NoCredentialsError":  # botocore's, not an OSError
            raise StorageError(f"no S3 credentials for URL {url}\n"
                               "set storage.s3_access_key_id and storage.s3_secret_access_key "
                               "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)") from e
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


def check_output(url: str, stage: str, cfg: StorageConfig, inputs: Iterable[str] = ()) -> None:
    """Refuse, before any work starts, an output that would destroy what this stage did not write.

    A stage replaces its output folder only when that folder is empty or an earlier output of the
    same stage (its manifest says so); anything else needs ``storage.overwrite``. A folder holding
    the stage's inputs or the working directory is never replaced. Local outputs must be writable.
    """
    for inner in [*inputs, os.getcwd()]:
        if _contains(url, inner):
            what = "the working directory" if inner == os.getcwd() else f"the input {inner!r}"
            raise StorageError(f"refusing to write to {url!r}: replacing it would delete {what}\n"
                               "choose another output folder")
    fs, path = filesystem(url, cfg)
    with storage_errors(url):
        if fs.isfile(path):
            raise StorageError(f"the output {url!r} is a file, not a folder\nchoose another output path")
        if fs.isdir(path) and fs.ls(path, detail=False) and not cfg.overwrite:
            found = output_stage(fs, path)
            if found != stage:
                wrote = f"an output of topoflow {found}" if found else "not written by topoflow " + stage
                raise StorageError(
                    f"refusing to replace {url!r}: it exists and is {wrote}\n"
                    "choose another output folder, or replace it (deleting what it holds) with --overwrite")
    if protocol(url) == "file":
        _check_writable(url)


def output_stage(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The stage that wrote the dataset or folder at ``path``, from its manifest (None: not topoflow's)."""
    try:
        manifest = json.loads(fs.cat(join(path, MANIFEST)))
    except (FileNotFoundError, ValueError):
        return None
    return manifest.get("stage") or manifest.get("meta", {}).get("stage")


def _contains(outer: str, inner: str) -> bool:
    """Whether ``inner`` (a path, URL or glob) lies in or is ``outer``."""
    if protocol(outer) != protocol(inner):
        return False
    inner = inner[: min((inner.find(c) for c in "*?[" if c in inner), default=len(inner))]
    if protocol(outer) == "file":
        a, b = _local_path(outer), _local_path(inner)
        return b == a or a in b.parents
    a, b = outer.rstrip("/"), inner.rstrip("/")
    return b == a or b.startswith(a + "/")


def _local_path(url: str) -> Path:
    """The absolute path a local path or ``file://`` URL names."""
    return Path(urlsplit(url).path if url.startswith("file:") else url).resolve()


def _check_writable(url: str) -> None:
    """Write a probe beside the local output (where its staging area goes), so a read-only or
    forbidden location fails now rather than after all the reading is done."""
    parent = _local_path(url).parent
    while not parent.exists():
        parent = parent.parent
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise StorageError(f"cannot write to {url!r}: {e.strerror or e} ({parent})\n"
                           "choose an output folder on a writable filesystem, or fix its permissions") from e


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
