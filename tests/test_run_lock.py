"""One run per run directory: a second run of the same name refuses and names the holder; a lock
left by a dead run is recognised and taken over; local disk and S3 (loopback moto_server).

The holder is a separate Python process (its own pid), as a second ``hrt-ray train`` would be.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hrt_ray.config import load_config
from hrt_ray.train.runlock import LOCK_FILE, RunLock, RunLockedError

REPO = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from hrt_ray.train.runlock import RunLock
lock = RunLock(sys.argv[1], stale_s=float(sys.argv[2])).acquire()
print("locked", flush=True)
if sys.argv[3] == "die":
    import os
    os._exit(0)  # no release: the lock stays behind, as after a crash or kill -9
time.sleep(600)
"""


def hold(run_uri: str, mode: str = "hold", stale_s: float = 300.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, run_uri, str(stale_s), mode],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "locked", line
    return proc


def lock_bytes(run_uri: str) -> bytes:
    from hrt_ray import storage

    return storage.read_bytes(f"{run_uri}/{LOCK_FILE}")


# The S3 case starts the loopback S3 server: slow tier (the marker goes on the parameter, since
# the fixture is only asked for inside).
@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def run_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/runs"


def test_second_run_refuses_and_names_the_holder(run_root: str) -> None:
    from hrt_ray.train.trainer import fit

    holder = hold(f"{run_root}/same")
    try:
        cfg = load_config(None, ["name=same", f"storage.path={run_root}"])
        with pytest.raises(RunLockedError) as info:
            fit(cfg)  # refused before anything is scheduled: no Ray needed to see it
        message = str(info.value)
        assert f"pid {holder.pid}" in message and f"host {socket.gethostname()}" in message
        assert "started 20" in message and "UTC" in message
        # The holder's lock is untouched.
        assert json.loads(lock_bytes(f"{run_root}/same"))["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_dead_process_is_taken_over(run_root: str, capsys: pytest.CaptureFixture) -> None:
    dead = hold(f"{run_root}/crashed", mode="die")
    dead.wait()
    lock = RunLock(f"{run_root}/crashed").acquire()
    try:
        out = capsys.readouterr().out
        assert f"pid {dead.pid}" in out and "no longer exists on this host" in out
        assert json.loads(lock_bytes(f"{run_root}/crashed"))["pid"] == os.getpid()
    finally:
        lock.release()
    from hrt_ray import storage

    assert not storage.exists(f"{run_root}/crashed/{LOCK_FILE}"), "released at the end"


def test_lock_without_heartbeat_from_another_host_is_stale(
    run_root: str, capsys: pytest.CaptureFixture
) -> None:
    from hrt_ray import storage

    old = time.time() - 1000
    other = {"id": "x", "host": "elsewhere", "pid": 1, "started": old, "heartbeat": old, "run": "r"}
    storage.write_bytes(f"{run_root}/old/{LOCK_FILE}", json.dumps(other).encode())
    # Fresh enough for a 2000 s threshold: refused...
    with pytest.raises(RunLockedError, match="host elsewhere, pid 1"):
        RunLock(f"{run_root}/old", stale_s=2000).acquire()
    # ...older than a 600 s one: taken over.
    lock = RunLock(f"{run_root}/old", stale_s=600).acquire()
    lock.release()
    assert re.search(r"from host elsewhere, pid 1, .*no heartbeat for 1\d\d\d s", capsys.readouterr().out)


def test_heartbeat_keeps_a_live_lock_fresh(run_root: str) -> None:
    holder = hold(f"{run_root}/beating", stale_s=2.0)  # beats every 0.5 s
    try:
        time.sleep(3.0)  # longer than the threshold: without heartbeats the lock would look stale
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(f"{run_root}/beating", stale_s=2.0).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_two_runs_starting_together_exactly_one_wins(
    run_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A loaded box (seen on CI) can pause a run between an exclusive create of the lock file and
    # the write of its holder into it: the others must never take that empty file for a dead
    # run's lock and remove it. The pause is made long here.
    real_fdopen = os.fdopen

    def slow_fdopen(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return real_fdopen(*args, **kwargs)

    monkeypatch.setattr(os, "fdopen", slow_fdopen)
    results: list[object] = []

    def take() -> None:
        try:
            results.append(RunLock(f"{run_root}/race").acquire())
        except RunLockedError as exc:
            results.append(exc)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, RunLock)]
    assert len(winners) == 1, results
    assert sum(isinstance(r, RunLockedError) for r in results) == 3
    winners[0].release()
