"""One way to reach a URI: local paths, ``file://``, ``s3://`` and ``gs://``.

Everything that reads or writes shards, checkpoints or reports goes through
:func:`resolve`, so a test against a loopback S3 server exercises the same code path as
production S3. Credentials are never taken as arguments: pyarrow reads them from the
standard environment/credential chain (``AWS_ACCESS_KEY_ID``, ``~/.aws``, instance roles,
``GOOGLE_APPLICATION_CREDENTIALS``...). The endpoint may be overridden explicitly (config)
or by the standard ``AWS_ENDPOINT_URL`` variable.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A URI could not be read or written; the message names the URI."""


@dataclass(frozen=True)
class Location:
    """A URI resolved to a pyarrow filesystem and the path inside it."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    def join(self, *parts: str) -> Location:
        uri = self.uri.rstrip("/")
        return Location(
            uri="/".join([uri, *parts]) if is_remote(uri) else os.path.join(uri, *parts),
            filesystem=self.filesystem,
            path=posixpath.join(self.path, *parts),
        )


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("s3", "gs", "gcs")


def _endpoint_parts(endpoint: str) -> tuple[str, str]:
    """Split ``http://127.0.0.1:9000`` into (``127.0.0.1:9000``, ``http``)."""
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    return parsed.netloc, parsed.scheme or "https"


def s3_filesystem(endpoint: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem honouring an endpoint override and the standard credential chain."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, object] = {}
    if endpoint:
        host, scheme = _endpoint_parts(endpoint)
        kwargs.update(endpoint_override=host, scheme=scheme)
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"  # S3-compatible servers ignore it; avoids a region lookup.
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, endpoint: str | None = None) -> Location:
    """Resolve ``uri`` to a filesystem and path. Raises :class:`StorageError` on an empty URI."""
    if not uri or not str(uri).strip():
        raise StorageError("empty URI: expected a local path, s3://bucket/prefix or gs://bucket/prefix")
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket name")
        return Location(uri, s3_filesystem(endpoint), f"{parsed.netloc}{parsed.path}".rstrip("/"))
    if parsed.scheme in ("gs", "gcs"):
        if not parsed.netloc:
            raise StorageError(f"{uri}: a gs:// URI needs a bucket name")
        return Location(uri, pafs.GcsFileSystem(), f"{parsed.netloc}{parsed.path}".rstrip("/"))
    if parsed.scheme in ("", "file"):
        path = os.path.abspath(os.path.expanduser(parsed.path if parsed.scheme == "file" else uri))
        return Location(path, pafs.LocalFileSystem(), path)
    raise StorageError(f"{uri}: unsupported scheme {parsed.scheme!r} (use a local path, s3:// or gs://)")


def exists(uri: str, endpoint: str | None = None) -> bool:
    loc = resolve(uri, endpoint)
    try:
        return loc.filesystem.get_file_info(loc.path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(f"{uri}: cannot check existence: {exc}") from exc


def read_bytes(uri: str, endpoint: str | None = None) -> bytes:
    loc = resolve(uri, endpoint)
    try:
        with loc.filesystem.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: not found") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read: {exc}") from exc


def write_bytes(uri: str, data: bytes, endpoint: str | None = None) -> None:
    """Write ``data`` so a reader never sees a half-written file.

    Locally: write to a sibling temp file, then rename (atomic on POSIX). Object stores
    make an object visible only once its upload completes, so a plain put is already atomic.
    """
    loc = resolve(uri, endpoint)
    try:
        if isinstance(loc.filesystem, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(loc.path) or ".", exist_ok=True)
            tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, loc.path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            with loc.filesystem.open_output_stream(loc.path) as f:
                f.write(data)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write: {exc}") from exc


def list_files(uri: str, suffix: str = "", endpoint: str | None = None) -> list[str]:
    """Paths (inside the filesystem) of files under ``uri`` ending with ``suffix``, sorted."""
    loc = resolve(uri, endpoint)
    try:
        infos = loc.filesystem.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: not found") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: cannot list: {exc}") from exc
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
