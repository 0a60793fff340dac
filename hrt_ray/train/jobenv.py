"""The runtime environment for ``ray job submit``, and a size check before uploading it.

``ray job submit --working-dir .`` zips the directory and stores it in the cluster's GCS, which
refuses packages over its gRPC message limit (512 MiB in Ray 2.60) only *after* zipping
everything. A project directory with a virtualenv, ``.git``, generated data or run outputs is
far bigger than the code, so ``jobs/runtime_env.yaml`` excludes them, and
:func:`check_working_dir` measures what would be shipped and fails early, naming the biggest
entries, when it would be too large.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray._private.thirdparty.pathspec import PathSpec

RUNTIME_ENV_FILE = "jobs/runtime_env.yaml"
#: Ray's limit for a working_dir package (``ray._private.ray_constants.GRPC_CPP_MAX_MESSAGE_SIZE``).
RAY_PACKAGE_LIMIT = int(os.environ.get("RAY_max_grpc_message_size", 512 * 1024 * 1024))  # noqa: SIM112


class JobEnvError(ValueError):
    """The runtime environment is invalid or its working dir is too large to upload."""


@dataclass
class WorkingDirSize:
    root: str
    bytes: int
    files: int
    largest: list[tuple[str, int]]


def load_runtime_env(path: str | Path = RUNTIME_ENV_FILE) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise JobEnvError(f"{path}: cannot read runtime env: {exc.strerror or exc}") from exc
    if not isinstance(data, dict):
        raise JobEnvError(f"{path}: a runtime env must be a mapping (working_dir, excludes, env_vars, ...)")
    excludes = data.get("excludes", [])
    if not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes):
        raise JobEnvError(f"{path}: excludes must be a list of gitignore-style patterns")
    return data


def working_dir_size(root: str | Path, excludes: list[str]) -> WorkingDirSize:
    """Bytes and files under ``root`` that ``excludes`` (gitignore syntax, as Ray) keeps."""
    root = Path(root).resolve()
    spec = PathSpec.from_lines("gitwildmatch", excludes)
    total, files = 0, 0
    top: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not spec.match_file(f"{(rel_dir / d).as_posix()}/")]
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if spec.match_file(rel):
                continue
            try:
                size = (Path(dirpath) / name).lstat().st_size
            except OSError:
                continue
            total += size
            files += 1
            head = rel.split("/", 1)[0]
            top[head] = top.get(head, 0) + size
    largest = sorted(top.items(), key=lambda kv: kv[1], reverse=True)[:5]
    return WorkingDirSize(str(root), total, files, largest)


def check_working_dir(
    root: str | Path = ".", runtime_env: dict[str, Any] | None = None, limit: int = RAY_PACKAGE_LIMIT
) -> WorkingDirSize:
    """Raise :class:`JobEnvError` if the upload of ``root`` would exceed Ray's package limit."""
    env = runtime_env if runtime_env is not None else load_runtime_env(Path(root) / RUNTIME_ENV_FILE)
    size = working_dir_size(root, list(env.get("excludes", [])))
    if size.bytes >= limit:
        biggest = ", ".join(f"{name} ({b / 2**20:.1f} MiB)" for name, b in size.largest)
        raise JobEnvError(
            f"working dir {size.root} would upload {size.bytes / 2**20:.1f} MiB in {size.files} files, "
            f"over Ray's working_dir limit of {limit / 2**20:.0f} MiB. Largest entries: {biggest}. "
            f"Add them to 'excludes' in {RUNTIME_ENV_FILE} (or .rayignore), or keep data and runs in "
            "object storage"
        )
    return size
