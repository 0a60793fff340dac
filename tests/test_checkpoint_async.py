"""Checkpoints on a real local Ray: sync then async upload to the loopback S3 server, and the
run resumed from S3. (No checkpoint of a non-finite state: test_fail_fast.py.)
"""

from __future__ import annotations

import glob
import io
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
from test_train_ray import tiny_config

from hrt_ray import storage
from hrt_ray.train.state import CHECKPOINT_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def _local_checkpoint_dirs() -> set[str]:
    """This code's local checkpoint directories (``hrt-ckpt-<pid>-*``) in the temp dir."""
    found = glob.glob(os.path.join(tempfile.gettempdir(), "hrt-ckpt-*-*"))
    return {p for p in found if re.search(r"ckpt-\d+-", p)}


def _remote_states(run_uri: str) -> list[dict]:
    # list_files gives paths inside the filesystem ("bucket/runs/x/checkpoint_.../f"): make them
    # relative to the run directory.
    prefix = run_uri.split("://", 1)[-1].rstrip("/") + "/"
    rel = [f[len(prefix):] for f in storage.list_files(run_uri) if f.startswith(prefix)]
    dirs = sorted({f.split("/")[0] for f in rel if f.startswith("checkpoint_") and "/" in f})
    states = []
    for d in dirs:
        data = storage.read_bytes(f"{run_uri}/{d}/{CHECKPOINT_FILE}")
        states.append(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return states


def test_sync_then_async_upload_to_s3_resumes(ray_session: None, data_dir: Path, s3_bucket: str) -> None:
    from hrt_ray.train.trainer import fit

    before = _local_checkpoint_dirs()
    run_uri = f"{s3_bucket}/runs/uploads"
    cfg = tiny_config(data_dir, f"{s3_bucket}/runs", "uploads", "optim.max_iters=2", "checkpoint.upload=sync")
    first = fit(cfg)
    assert first.iteration == 2
    cfg = tiny_config(
        data_dir, f"{s3_bucket}/runs", "uploads", "optim.max_iters=4", "checkpoint.upload=async"
    )
    second = fit(cfg)
    assert second.resumed_from == 2 and second.iteration == 4
    assert second.checkpoint.startswith(f"{run_uri}/checkpoint_")
    assert storage.list_files(f"{run_uri}/tensorboard"), "rank 0's event files are uploaded"
    states = _remote_states(run_uri)
    # Every registered checkpoint is complete (loadable, weights_only) and its own iteration.
    assert states and max(s["iteration"] for s in states) == 4
    for s in states:
        assert s["scheduler"]["last_epoch"] == s["iteration"]
        assert all(torch.isfinite(v).all() for v in s["model"].values() if v.is_floating_point())
    # Ray deleted every local copy after uploading it (delete_local_checkpoint_after_upload).
    assert _local_checkpoint_dirs() - before == set()
