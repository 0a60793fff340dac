"""Checkpoints on a real local Ray: async/sync upload to the loopback S3 server with resume, and
no checkpoint of a non-finite state when a huge learning rate blows the weights up.

Nothing is injected into production code: the blow-up comes from the configuration alone.
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
from test_train_ray import checkpoints, tiny_config

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
    states = _remote_states(run_uri)
    # Every registered checkpoint is complete (loadable, weights_only) and its own iteration.
    assert states and max(s["iteration"] for s in states) == 4
    for s in states:
        assert s["scheduler"]["last_epoch"] == s["iteration"]
        assert all(torch.isfinite(v).all() for v in s["model"].values() if v.is_floating_point())
    # Ray deleted every local copy after uploading it (delete_local_checkpoint_after_upload).
    assert _local_checkpoint_dirs() - before == set()


def test_huge_learning_rate_stops_without_a_non_finite_checkpoint(
    ray_session: None, data_dir: Path, tmp_path: Path
) -> None:
    from hrt_ray.train.trainer import TrainError, fit

    cfg = tiny_config(
        data_dir, str(tmp_path / "runs"), "blowup", "optim.lr=1e10", "optim.max_iters=12", "eval.interval=100"
    )
    with pytest.raises(TrainError, match="non-finite") as info:
        fit(cfg)
    message = str(info.value)
    assert "no broken state is saved" not in message
    match = re.search(r"the last checkpoint \(reported; the run resumes from it\) is at iteration (\d+)",
                      message)
    assert match, message
    last_good = int(match.group(1))
    states = checkpoints(tmp_path / "runs" / "blowup")
    assert states, "the iterations before the blow-up were checkpointed"
    # An async upload of the last reported checkpoint may be cut short by the stop; never one after it.
    assert max(s["iteration"] for s in states) <= last_good
    for s in states:
        for name, v in s["model"].items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), f"iteration {s['iteration']}: {name}"
        for st in s["optimizer"]["state"].values():
            assert all(torch.isfinite(t).all() for t in st.values() if torch.is_tensor(t))
