"""Distributed training on a real local Ray (2 CPU workers, gloo): survive a killed worker, refuse
impossible requests.

A short run's reports, checkpoints, validation and evaluation are checked on the one run of
test_train_output.py (the command as a laptop runs it). A run interrupted and run again is in
test_resume_safety.py (locally) and test_checkpoint_async.py (on S3); a non-finite loss in
test_fail_fast.py.

Kept tiny (hrt_tiny_ocr, 64x64 crops, a handful of iterations): these tests check behaviour,
not accuracy; `hrt-ray bench train` and the default run measure speed and learning.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faults import CrashAt
from stored_checkpoints import complete_states

from hrt_ray.config import ExperimentConfig, load_config

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


def test_killed_worker_restarts_from_the_last_checkpoint(
    ray_session: None, data_dir: Path, tmp_path: Path
) -> None:
    from hrt_ray.train.trainer import fit

    cfg = tiny_config(
        data_dir, str(tmp_path / "runs"), "killed", "failure.max_failures=1", "optim.max_iters=5"
    )
    summary = fit(cfg, callbacks=[CrashAt(4, tmp_path / "crashed")])
    assert (tmp_path / "crashed").exists(), "the fault was injected"
    # Checkpoints every iteration. Ray registers a checkpoint when its controller collects the
    # round's reports from every worker (one queued report per worker, polled every 2 s, and a
    # dead worker's pending report is lost), and the newest complete one on storage may still be
    # uploading: resuming from 1, 2 or 3 is right, from 0 is not.
    assert summary.resumed_from in (1, 2, 3)
    assert summary.iteration == 5
    states = checkpoints(Path(summary.run_dir))
    assert max(s["iteration"] for s in states) == 5


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
