"""Distributed training on a real local Ray (2 CPU workers, gloo): survive a killed worker, listen
on loopback only, refuse impossible requests.

A short run's reports, checkpoints, validation and evaluation are checked on the one run of
test_train_output.py (the command as a laptop runs it); a run resumed with another config in
test_checkpoint_async.py (on S3), one interrupted in test_train_output.py; a non-finite loss and
a failed run's lock in test_fail_fast.py.

Kept tiny (hrt_tiny_ocr, 64x64 crops, a handful of iterations): these tests check behaviour,
not accuracy; `hrt-ray bench train` and the default run measure speed and learning.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from faults import CrashAt
from probes import RecordListening, recorded
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


@pytest.fixture(scope="module")
def killed_run(
    ray_session: None, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Path]:
    """A 2-worker run whose last rank dies as soon as checkpoint 3 is complete on storage; Ray
    restarts the group (``failure.max_failures=1``). Every worker process of both groups also
    records its listening sockets (:class:`probes.RecordListening`).

    Ray registers a round only once its background upload has ended and the controller has
    collected every worker's report (polled every 2 s; a dead worker's pending report is lost),
    so the checkpoint Ray hands the new group usually stops at 1 or 2. Rank 0 then takes the
    newer complete one on storage. (The crash waits for the upload: unwaited, a loaded box
    crashes mid-upload and 2 is rightly the newest complete checkpoint.)
    """
    from hrt_ray.train.trainer import fit

    tmp = tmp_path_factory.mktemp("killed")
    runs = tmp / "runs"
    cfg = tiny_config(
        data_dir, str(runs), "killed", "failure.max_failures=1", "optim.max_iters=5", "checkpoint.keep=5"
    )
    crash = CrashAt(4, tmp / "crashed", once_stored=(runs / "killed", 3))
    summary = fit(cfg, callbacks=[crash, RecordListening(tmp / "sockets")])
    return summary, tmp


def test_killed_worker_restarts_from_the_newest_complete_checkpoint(killed_run: tuple[Any, Path]) -> None:
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    summary, tmp = killed_run
    runs = tmp / "runs"
    assert (tmp / "crashed").exists(), "the fault was injected"
    assert summary.resumed_from == 3 and summary.iteration == 5
    states = checkpoints(Path(summary.run_dir))
    assert max(s["iteration"] for s in states) == 5
    assert not (runs / "killed" / LOCK_FILE).exists(), "the run released its lock"
    snapshot = json.loads((runs / "killed" / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_text())
    registered = sorted(int(r["metrics"]["iteration"]) for r in snapshot["checkpoint_results"])
    print(f"Ray registered checkpoints {registered}; the restarted group resumed from {summary.resumed_from}")
    # The run's placement-group cleaner was hrt-ray's, which waits for a confirmed controller death.
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # the other pytest process runs a Ray of its own

    def actors(class_name: str) -> list:
        return list_actors(address=address, filters=[("class_name", "=", class_name)], limit=1000)

    assert actors("ConfirmingPlacementGroupCleaner"), "no ConfirmingPlacementGroupCleaner ran"
    assert not actors("PlacementGroupCleaner")


def _loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (``::ffff:127.0.0.1``: a dual-stack socket)."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_every_training_process_listens_on_loopback_only(killed_run: tuple[Any, Path]) -> None:
    """Which addresses the worker processes of a loopback run listen on, seen from inside each.

    On main, rank 0's torch.distributed store (started by ``init_process_group("env://")``)
    listened on ``::``, every interface of the machine, although the run's cluster advertised
    127.0.0.1. Both worker groups of the killed run (through the trainer's own ``TorchConfig``)
    are checked: the first, and the one Ray restarted.
    """
    _, tmp = killed_run
    procs = recorded(tmp / "sockets")
    # Two ranks per group, each its own process; the restarted group is two new processes.
    assert len(procs) == 4 and len({p["pid"] for p in procs}) == 4, procs
    assert sorted(p["rank"] for p in procs) == [0, 0, 1, 1] and {p["world_size"] for p in procs} == {2}
    for zero in (p for p in procs if p["rank"] == 0):
        store = tuple(zero["store"])
        assert store[0] == "127.0.0.1"
        assert store in [tuple(a) for a in zero["listening"]]  # rank 0 serves the store...
    for p in procs:  # ...and no process listens beyond loopback
        assert p["listening"], p
        assert all(_loopback(ip) for ip, _ in p["listening"]), p


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
