"""Resuming a run cannot silently mix configs, load the wrong model, or go back past a checkpoint
that is complete on storage; the run lock is released however the run ends.

Real local Ray (the session instance), tiny runs as in test_train_ray.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from faults import CrashAt
from stored_checkpoints import complete_states
from test_train_ray import tiny_config as base_config

from hrt_ray.train.resume import ResumeConfigError
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


def test_changed_lr_is_refused_then_accepted_and_really_applies(
    ray_session: None, data_dir: Path, tmp_path: Path
) -> None:
    from hrt_ray.train.optim import warmup_poly_factor
    from hrt_ray.train.trainer import fit

    runs = str(tmp_path / "runs")
    held: list[dict] = []

    def finish(summary):  # the CLI evaluates and writes summary.json here: still under the lock
        held.append(json.loads((Path(summary.run_dir) / LOCK_FILE).read_text()))
        return summary

    first = fit(tiny_config(data_dir, runs, "lr", "optim.max_iters=2"), finish=finish)
    assert first.iteration == 2
    assert [h["pid"] for h in held] == [os.getpid()], "finish ran while this run held the lock"
    assert not (Path(first.run_dir) / LOCK_FILE).exists(), "released after finish"
    run_dir = Path(first.run_dir)

    # More iterations and another eval interval are resume-safe; a new lr is not.
    changed = tiny_config(data_dir, runs, "lr", "optim.max_iters=4", "eval.interval=4", "optim.lr=0.002")
    started = time.monotonic()
    with pytest.raises(ResumeConfigError) as info:
        fit(changed)
    refused_in = time.monotonic() - started
    message = str(info.value)
    assert "optim.lr: 0.001 -> 0.002" in message
    assert "max_iters" not in message and "eval.interval" not in message
    assert "--accept-config-change" in message
    assert newest_state(run_dir)["iteration"] == 2, "nothing was trained"
    assert not (run_dir / LOCK_FILE).exists(), "the refused run released its lock"

    summary = fit(changed, accept_config_change=True)
    assert summary.resumed_from == 2 and summary.iteration == 4
    final = newest_state(run_dir)
    assert final["iteration"] == 4
    # The restored optimiser and schedule continue with the new lr (not the saved 1e-3)...
    assert final["scheduler"]["base_lrs"] == [0.002, 0.002]
    assert all(g["initial_lr"] == 0.002 for g in final["optimizer"]["param_groups"])
    expected = 0.002 * warmup_poly_factor(4, 4, 1, 1e-6, 0.9)
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected, abs=1e-12)
    # ...and the config the checkpoint records is the one that was trained.
    assert final["config"]["optim"]["lr"] == 0.002
    print(f"refused a changed lr in {refused_in:.1f} s, before any worker started")

    # A different model is refused, even with changes accepted: its weights cannot be loaded.
    for override, shown in (
        # A class count must agree with the synthetic set's (config check), so both change.
        ("model.num_classes=7 data.synth.classes=7", "model.num_classes: 5 -> 7"),
        ("model.window_size=4", "model.window_size: None -> 4"),
        ("model.arch=hrt_small_ocr", "model.arch: 'hrt_tiny_ocr' -> 'hrt_small_ocr'"),
    ):
        other = tiny_config(data_dir, runs, "lr", "optim.max_iters=6", "optim.lr=0.002", *override.split())
        with pytest.raises(ResumeConfigError, match="different model") as info:
            fit(other, accept_config_change=True)
        assert shown in str(info.value) and "model.init_checkpoint=" in str(info.value)
    assert newest_state(run_dir)["iteration"] == 4


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
