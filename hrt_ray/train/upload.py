"""Rank 0's checkpoint: written locally, reported to Ray Train, uploaded (async or sync).

Kept apart from the worker loop (``loop.py`` imports it; so does ``hrt-ray bench checkpoint``,
which times this same path): at most one upload in flight, and local copies of dead workers'
unfinished uploads removed.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from typing import Any

import ray.train
from ray.train import Checkpoint
from ray.train.v2.api.report_config import CheckpointUploadMode

from hrt_ray.config import ExperimentConfig
from hrt_ray.train.state import save_state


def checkpoint_upload_mode(cfg: ExperimentConfig) -> Any:
    """Ray's ``CheckpointUploadMode`` for ``checkpoint.upload``.

    ``async``: ``ray.train.report`` returns once rank 0 has written the state to local disk; Ray
    uploads it in a background thread and registers the checkpoint only when the upload is
    complete (a crash mid-upload leaves the previous checkpoint the latest: never half-written).
    An upload error is raised in the training thread and fails the worker group like any error.
    ``sync``: every rank waits at the report barrier until the upload is done.
    """
    return CheckpointUploadMode.ASYNC if cfg.checkpoint.upload == "async" else CheckpointUploadMode.SYNC


def report_checkpoint(
    metrics: dict[str, Any],
    state: dict[str, Any],
    upload_mode: Any,
    previous_dir: str | None,
    timeout_s: float,
) -> str:
    """Rank 0's ``ray.train.report`` with a checkpoint of ``state``; returns its local directory.

    Waits for the previous checkpoint's upload first (at most one in flight), writes ``state``
    atomically to a fresh local directory and reports it with ``upload_mode``. Not a
    TemporaryDirectory: with an async upload Ray still reads it after ``report()`` returns, and
    deletes it once uploaded (``delete_local_checkpoint_after_upload``); on an error here it is
    removed at once.
    """
    if previous_dir is not None:
        _wait_for_upload(previous_dir, timeout_s)
    tmp = tempfile.mkdtemp(prefix=f"hrt-ckpt-{os.getpid()}-")
    try:
        save_state(tmp, state, metrics)
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(tmp),
            checkpoint_upload_mode=upload_mode,
            delete_local_checkpoint_after_upload=True,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _wait_for_upload(local_dir: str, timeout_s: float) -> None:
    """Wait until Ray has uploaded (and so deleted) the previous checkpoint's local directory.

    Ray's upload pool has one thread and queues the rest: without this, checkpoints written faster
    than they upload would pile up on local disk. A failed upload never deletes the directory, but
    Ray raises its error in the training thread, which ends the worker group before the timeout.
    """
    deadline = time.monotonic() + timeout_s
    while os.path.exists(local_dir):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the previous checkpoint ({local_dir}) has not finished uploading after {timeout_s:.0f} s "
                "(failure.stall_timeout_s); is the storage reachable?"
            )
        time.sleep(0.05)


def remove_orphaned_checkpoint_dirs() -> None:
    """Delete local checkpoint directories of dead processes (an async upload that never finished:
    its worker died). Named ``hrt-ckpt-<pid>-*``; a live process's are left alone."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "hrt-ckpt-*-*")):
        pid = os.path.basename(path).split("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            continue
