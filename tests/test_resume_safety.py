"""Resuming a run cannot go back past a checkpoint that is complete on storage, and the run lock
is released however the run ends. (A resume that would mix configs or load the wrong model is
refused in test_checkpoint_async.py, on S3.)

Real local Ray (the session instance), tiny runs as in test_train_ray.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faults import CrashAt
from stored_checkpoints import complete_states
from test_train_ray import tiny_config as base_config

from hrt_ray.train.runlock import LOCK_FILE
from hrt_ray.train.state import complete_checkpoints

pytestmark = pytest.mark.slow


def tiny_config(*args: object) -> object:
    """test_train_ray's tiny run, with a stall timeout that survives a heavily loaded box."""
    return base_config(*args, "failure.stall_timeout_s=600")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def newest_state(run_dir: Path) -> dict:
    return complete_states(run_dir)[-1]


def test_resume_starts_from_the_newest_complete_checkpoint_on_storage(
    ray_session: None, data_dir: Path, tmp_path: Path
) -> None:
    """A worker dies as soon as checkpoint 3 is complete on storage: Ray registers a round only
    once its background upload has ended and the controller has collected every worker's report
    (polled every 2 s), so Ray's snapshot usually stops at 1 or 2. The resume must still continue
    from 3. (The crash waits for the upload: unwaited, a loaded box crashes mid-upload and 2 is
    rightly the newest complete checkpoint.)"""
    from hrt_ray.train.trainer import TrainError, fit

    runs = tmp_path / "runs"
    cfg = tiny_config(data_dir, str(runs), "orphan", "optim.max_iters=5", "checkpoint.keep=5")
    with pytest.raises(TrainError):  # failure.max_failures=0: the crash ends the run
        fit(cfg, callbacks=[CrashAt(4, tmp_path / "crashed", once_stored=(runs / "orphan", 3))])
    run_dir = runs / "orphan"
    assert not (run_dir / LOCK_FILE).exists(), "a failed run releases its lock"
    import pyarrow.fs as pafs

    on_storage = complete_checkpoints(pafs.LocalFileSystem(), str(run_dir))
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    snapshot = json.loads((run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_text())
    ray_latest = max((int(r["metrics"]["iteration"]) for r in snapshot["checkpoint_results"]), default=0)
    newest = on_storage[-1].iteration
    assert newest == 3, [c.iteration for c in on_storage]
    summary = fit(cfg)
    assert summary.resumed_from == newest and summary.iteration == 5
    print(
        f"Ray's snapshot listed up to iteration {ray_latest}; storage held {newest}; "
        f"resumed from {summary.resumed_from}"
    )
