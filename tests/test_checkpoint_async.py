"""Checkpoints on a real local Ray: sync then async upload to the loopback S3 server, and the
run resumed from S3 only with a config it agrees to. (No checkpoint of a non-finite state:
test_fail_fast.py; a restart from the newest complete checkpoint: test_train_ray.py.)
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
from test_train_ray import tiny_config

from hrt_ray import storage
from hrt_ray.train.resume import ResumeConfigError
from hrt_ray.train.runlock import LOCK_FILE
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


def test_run_on_s3_uploads_sync_then_async_and_resumes_only_an_agreed_config(
    ray_session: None, data_dir: Path, s3_bucket: str
) -> None:
    """One run on S3 (the storage of every published config), resumed twice:

    - 2 iterations with synchronous checkpoint upload, the run lock held through ``finish``
      (where the CLI evaluates and writes ``summary.json``) and released after it;
    - resumed with more iterations, another eval interval and background upload (resume-safe)
      and a new lr (not): refused before anything is scheduled, naming only the lr;
    - resumed again with the change accepted: it continues from the checkpoint on S3 with the
      new lr in its optimiser and schedule, and every checkpoint on S3 is complete;
    - a different model is refused even with changes accepted.
    """
    from hrt_ray.train.optim import warmup_poly_factor
    from hrt_ray.train.trainer import fit

    before = _local_checkpoint_dirs()
    run_uri = f"{s3_bucket}/runs/uploads"
    lock_uri = f"{run_uri}/{LOCK_FILE}"
    held: list[dict] = []

    def finish(summary):  # the CLI evaluates and writes summary.json here: still under the lock
        held.append(json.loads(storage.read_bytes(lock_uri)))
        return summary

    cfg = tiny_config(data_dir, f"{s3_bucket}/runs", "uploads", "optim.max_iters=2", "checkpoint.upload=sync")
    first = fit(cfg, finish=finish)
    assert first.iteration == 2
    assert [h["pid"] for h in held] == [os.getpid()], "finish ran while this run held the lock"
    assert not storage.exists(lock_uri), "released after finish"

    # More iterations, another eval interval and another upload mode are resume-safe; a new lr is not.
    changed = tiny_config(
        data_dir, f"{s3_bucket}/runs", "uploads", "optim.max_iters=4", "eval.interval=4",
        "checkpoint.upload=async", "optim.lr=0.002",
    )  # fmt: skip
    with pytest.raises(ResumeConfigError) as info:
        fit(changed)
    message = str(info.value)
    assert "optim.lr: 0.001 -> 0.002" in message and "--accept-config-change" in message
    assert "max_iters" not in message and "eval.interval" not in message
    assert "checkpoint.upload" not in message
    assert max(s["iteration"] for s in _remote_states(run_uri)) == 2, "nothing was trained"
    assert not storage.exists(lock_uri), "the refused run released its lock"

    second = fit(changed, accept_config_change=True)
    assert second.resumed_from == 2 and second.iteration == 4
    assert second.checkpoint.startswith(f"{run_uri}/checkpoint_")
    assert storage.list_files(f"{run_uri}/tensorboard"), "rank 0's event files are uploaded"
    states = _remote_states(run_uri)
    # Every registered checkpoint is complete (loadable, weights_only) and its own iteration.
    assert states and max(s["iteration"] for s in states) == 4
    for s in states:
        assert s["scheduler"]["last_epoch"] == s["iteration"]
        assert all(torch.isfinite(v).all() for v in s["model"].values() if v.is_floating_point())
    # The restored optimiser and schedule continue with the new lr (not the saved 1e-3)...
    final = max(states, key=lambda s: s["iteration"])
    assert final["scheduler"]["base_lrs"] == [0.002, 0.002]
    assert all(g["initial_lr"] == 0.002 for g in final["optimizer"]["param_groups"])
    expected = 0.002 * warmup_poly_factor(4, 4, 1, 1e-6, 0.9)
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected, abs=1e-12)
    # ...and the config the checkpoint records is the one that was trained.
    assert final["config"]["optim"]["lr"] == 0.002
    # Ray deleted every local copy after uploading it (delete_local_checkpoint_after_upload).
    assert _local_checkpoint_dirs() - before == set()

    # A different model is refused, even with changes accepted: its weights cannot be loaded.
    for override, shown in (
        # A class count must agree with the synthetic set's (config check), so both change.
        ("model.num_classes=7 data.synth.classes=7", "model.num_classes: 5 -> 7"),
        ("model.window_size=4", "model.window_size: None -> 4"),
        ("model.arch=hrt_small_ocr", "model.arch: 'hrt_tiny_ocr' -> 'hrt_small_ocr'"),
    ):
        other = tiny_config(
            data_dir, f"{s3_bucket}/runs", "uploads", "optim.max_iters=6", "optim.lr=0.002", *override.split()
        )
        with pytest.raises(ResumeConfigError, match="different model") as info:
            fit(other, accept_config_change=True)
        assert shown in str(info.value) and "model.init_checkpoint=" in str(info.value)
    assert max(s["iteration"] for s in _remote_states(run_uri)) == 4
