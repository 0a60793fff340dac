"""Where a run's things go: its directory, Ray's storage arguments, URIs of its checkpoints.

Its own module because the driver (``trainer``), the resume check (``resume``) and the worker
all need these, and none of them should import the others for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hrt_ray import storage
from hrt_ray.config import ExperimentConfig, to_dict


def storage_root(cfg: ExperimentConfig) -> str:
    """``storage.path`` as an absolute local path or a URI (Ray needs absolute paths)."""
    if storage.is_remote(cfg.storage.path):
        return cfg.storage.path.rstrip("/")
    return str(Path(cfg.storage.path).expanduser().resolve())


def run_uri(cfg: ExperimentConfig) -> str:
    """The run's directory: ``<storage.path>/<name>`` (checkpoints, TensorBoard, results)."""
    return f"{storage_root(cfg)}/{cfg.name}"


def ray_storage(cfg: ExperimentConfig) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``.

    On object storage: the bucket path without scheme plus our filesystem (endpoint from
    ``storage.endpoint`` or ``AWS_ENDPOINT_URL``) wrapped to retry transient errors with
    ``storage.retries`` / ``storage.retry_backoff_s``. Ray writes checkpoints and its controller
    snapshot through it; without retries, an outage of a few seconds during the snapshot write
    ends the run as a non-retryable controller error. Locally: the absolute path, no filesystem.
    """
    root = storage_root(cfg)
    if not storage.is_remote(root):
        return root, None
    loc = storage.resolve(root, cfg.storage.endpoint, storage.RetryPolicy.from_config(cfg.storage))
    return loc.path, loc.filesystem


def worker_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """``to_dict(cfg)`` with local paths made absolute: workers do not share the driver's cwd."""
    data = to_dict(cfg)
    for section, key in (
        ("data", "train_uri"),
        ("data", "val_uri"),
        ("model", "pretrained"),
        ("model", "init_checkpoint"),
    ):
        value = data[section][key]
        if value and not storage.is_remote(value):
            data[section][key] = str(Path(value).expanduser().resolve())
    data["storage"]["path"] = storage_root(cfg)
    return data


def checkpoint_uri(cfg: ExperimentConfig, checkpoint: Any) -> str:
    """A URI for a Ray ``Checkpoint`` (its ``path`` has no scheme on object storage)."""
    root = storage_root(cfg)
    path = str(checkpoint.path)
    if "://" in root and "://" not in path:
        return f"{urlsplit(root).scheme}://{path.lstrip('/')}"
    return path
