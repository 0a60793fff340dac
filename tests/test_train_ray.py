"""Distributed training on a real local Ray (2 CPU workers, gloo): survive a killed worker, refuse
impossible requests.

A short run's reports, checkpoints, validation and evaluation are checked on the one run of
test_train_output.py (the command as a laptop runs it); a run resumed with another config in
test_checkpoint_async.py (on S3), one interrupted in test_train_output.py; a non-finite loss and
a failed run's lock in test_fail_fast.py.

Kept tiny (hrt_tiny_ocr, 64x64 crops, a handful of iterations): these tests check behaviour,
not accuracy; `hrt-ray bench train` and the default run measure speed and learning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faults import CrashAt
from stored_checkpoints import complete_states

from hrt_ray.config import ExperimentConfig, load_config
from hrt_ray.train.runlock import LOCK_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def tiny_config(data_dir: Path, storage: str, name: str, *overrides: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"name={name}",
            f"storage.path={storage}",
            f"data.train_uri={data_dir}/train",
            f"data.val_uri={data_dir}/val",
            "data.synth.generate=true",
            "data.synth.num_train=32",
            "data.synth.num_val=4",
            "data.synth.size=[64,64]",
            "data.crop_size=[64,64]",
            "data.batch_size=4",
            "optim.max_iters=4",
            "optim.warmup_iters=1",
            "loss.ohem_min_kept=2000",
            "eval.interval=2",
            "eval.at_start=false",
            "checkpoint.every=1",
            "failure.max_failures=0",
            "failure.stall_timeout_s=120",
            *overrides,
        ],
    )


def checkpoints(run_dir: Path) -> list[dict]:
    return complete_states(run_dir)


def test_killed_worker_restarts_from_the_newest_complete_checkpoint(
    ray_session: None, data_dir: Path, tmp_path: Path
) -> None:
    """A worker dies as soon as checkpoint 3 is complete on storage; Ray restarts the group
    (``failure.max_failures=1``) and it continues from 3.

    Ray registers a round only once its background upload has ended and the controller has
    collected every worker's report (polled every 2 s; a dead worker's pending report is lost),
    so the checkpoint Ray hands the new group usually stops at 1 or 2. Rank 0 then takes the
    newer complete one on storage. (The crash waits for the upload: unwaited, a loaded box
    crashes mid-upload and 2 is rightly the newest complete checkpoint.)
    """
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from hrt_ray.train.trainer import fit

    runs = tmp_path / "runs"
    cfg = tiny_config(
        data_dir, str(runs), "killed", "failure.max_failures=1", "optim.max_iters=5", "checkpoint.keep=5"
    )
    summary = fit(cfg, callbacks=[CrashAt(4, tmp_path / "crashed", once_stored=(runs / "killed", 3))])
    assert (tmp_path / "crashed").exists(), "the fault was injected"
    assert summary.resumed_from == 3 and summary.iteration == 5
    states = checkpoints(Path(summary.run_dir))
    assert max(s["iteration"] for s in states) == 5
    assert not (runs / "killed" / LOCK_FILE).exists(), "the run released its lock"
    snapshot = json.loads((runs / "killed" / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_text())
    registered = sorted(int(r["metrics"]["iteration"]) for r in snapshot["checkpoint_results"])
    print(f"Ray registered checkpoints {registered}; the restarted group resumed from {summary.resumed_from}")


def test_unsatisfiable_request_fails_before_fit_with_the_numbers(
    ray_session: None, data_dir: Path, tmp_path: Path
) -> None:
    from hrt_ray.train.trainer import ResourceError, check_resources, fit

    cfg = tiny_config(
        data_dir, str(tmp_path / "runs"), "toobig", "scaling.num_workers=8", "data.batch_size=8"
    )
    with pytest.raises(ResourceError, match=r"8 worker\(s\) x \{CPU: 1\}.*\{CPU: 9\}.*has \{CPU: 4\}"):
        fit(cfg)
    assert not (tmp_path / "runs" / "toobig").exists()
    gpu = tiny_config(data_dir, str(tmp_path / "runs"), "gpu", "scaling.use_gpu=true")
    with pytest.raises(ResourceError, match=r"GPU: 2.*GPU: 0"):
        check_resources(gpu)
    check_resources(tiny_config(data_dir, str(tmp_path / "runs"), "fits"))  # 2 workers + data fit in 4 CPUs
