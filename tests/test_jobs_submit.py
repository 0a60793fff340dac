"""`ray job submit` of `hrt-ray train` against a real head node started (and stopped) by the test;
the shipped runtime env keeps the upload small and fails clearly when it would be too big."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT, free_port

BIN = Path(sys.executable).parent


def test_runtime_env_excludes_bulk_and_reports_oversize(tmp_path: Path) -> None:
    from hrt_ray.train.jobenv import JobEnvError, check_working_dir, load_runtime_env

    env = load_runtime_env(REPO_ROOT / "jobs" / "runtime_env.yaml")
    for pattern in (".venv/", ".git/", "data/", "runs/"):
        assert pattern in env["excludes"]
    (tmp_path / "hrt_ray").mkdir()
    (tmp_path / "hrt_ray" / "x.py").write_text("print(1)\n")
    for bulky in ("data", "runs", ".venv", ".git"):
        (tmp_path / bulky).mkdir()
        (tmp_path / bulky / "blob.bin").write_bytes(b"\0" * 200_000)
    size = check_working_dir(tmp_path, env, limit=100_000)
    assert size.files == 1 and size.bytes == len("print(1)\n")
    (tmp_path / "hrt_ray" / "weights.npy").write_bytes(b"\0" * 150_000)
    with pytest.raises(JobEnvError, match=r"over Ray's working_dir limit.*Largest entries: hrt_ray"):
        check_working_dir(tmp_path, env, limit=100_000)
    # The real checkout ships far below Ray's limit.
    real = check_working_dir(REPO_ROOT, env)
    assert real.bytes < 50 * 2**20


@pytest.fixture()
def head_node() -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head --block` in its own process group on loopback; killed by its pgid only."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--port",
        str(free_port()),
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--ray-client-server-port",
        str(free_port()),
        "--num-cpus",
        "4",
        "--temp-dir",
        temp_dir,
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 240
        while True:
            probe = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", address],
                env=env,
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"head node did not come up: {probe.stderr[-2000:]}")
            time.sleep(1)
        yield address, env
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_trains_and_fails_loudly(
    head_node: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    address, env = head_node
    data = tmp_path / "data"
    runs = tmp_path / "runs"
    overrides = [
        "name=job",
        f"storage.path={runs}",
        f"data.train_uri={data}/train",
        f"data.val_uri={data}/val",
        "data.synth.generate=true",
        "data.synth.num_train=16",
        "data.synth.num_val=2",
        "data.synth.size=[64,64]",
        "data.crop_size=[64,64]",
        "data.batch_size=4",
        "optim.max_iters=2",
        "optim.warmup_iters=1",
        "eval.interval=2",
        "eval.at_start=false",
        "checkpoint.every=2",
        "loss.ohem_min_kept=2000",
    ]
    submit = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO_ROOT),
        "--runtime-env",
        str(REPO_ROOT / "jobs" / "runtime_env.yaml"),
        "--",
    ]
    ok = subprocess.run(
        [
            *submit[:-1],
            "--submission-id",
            f"hrt-ok-{os.getpid()}",
            "--",
            "hrt-ray",
            "train",
            "--config",
            "jobs/default.yaml",
            *overrides,
            "--no-eval",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert ok.returncode == 0, ok.stdout[-4000:] + ok.stderr[-4000:]
    assert "succeeded" in (ok.stdout + ok.stderr).lower()
    summary = json.loads((runs / "job" / "summary.json").read_text())
    assert summary["iteration"] == 2 and summary["checkpoint"].startswith(str(runs / "job" / "checkpoint_"))
    # The cluster keeps the driver's log, with the printed summary in it.
    logs = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--address", address, f"hrt-ok-{os.getpid()}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "run            job (2 iterations)" in logs.stdout
    assert f"checkpoint     {summary['checkpoint']}" in logs.stdout
    # A failing run makes the driver, and so `ray job submit`, exit non-zero.
    bad = subprocess.run(
        [
            *submit,
            "hrt-ray",
            "train",
            *overrides,
            "name=bad",
            "data.dataset=ade20k",
            f"data.train_uri={tmp_path}/nothing",
            "model.num_classes=5",
            "--no-eval",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0
    out = bad.stdout + bad.stderr
    assert "failed" in out.lower() and f"{tmp_path}/nothing" in out
