"""Shared fixtures: a real S3-compatible server and a real local Ray instance, both on loopback.

Nothing here is mocked: ``s3_server`` runs ``moto_server`` as a separate process bound to
127.0.0.1, and code under test reaches it through the same pyarrow/fsspec path as real S3
(endpoint taken from ``AWS_ENDPOINT_URL``). ``ray_session`` starts one local Ray instance for
the whole test session (starting Ray costs seconds; tests share it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Fixtures that start a server or a Ray instance: a test using one (directly or through another
#: fixture) belongs to the slow tier, whatever its module says.
SERVER_FIXTURES = frozenset({"ray_session", "s3_server", "s3_bucket"})

# Fake credentials for the loopback S3 server; set before anything (Ray workers included)
# starts, so every process sees the same standard credential chain.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# Tests on loopback opt out of Ray's token auth (see shared notes/ray-2.60.md).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Keep every Ray server on loopback: Ray otherwise advertises the machine's external address.
# (This switch makes Ray's node-IP lookup return 127.0.0.1; hrt_ray.ray_local does the same.)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO_ROOT = Path(__file__).resolve().parent.parent


#: Slow-tier modules from the longest to the shortest (seconds on one pytest process on the
#: 2-core development box, 2026-12-07 13:50 UTC, nothing else running). ``make test`` runs the
#: slow tier on several pytest processes, one module at a time each (``--dist loadfile``) in
#: collection order; starting the longest first keeps one long module from running alone at
#: the end. Modules not listed follow, in file order.
LONGEST_FIRST = (
    "test_multinode.py",  # 265: a 60 s drain deadline; the cluster idles through much of it
    "test_train_output.py",  # 143
    "test_tune_sweep.py",  # 134
    "test_autoscaling.py",  # 125
    "test_storage_outage.py",  # 96: a 25 s outage
    "test_jobs_submit.py",  # 67
    "test_data_integrity.py",  # 55
    "test_checkpoint_async.py",  # 51
    "test_train_ray.py",  # 44
    "test_fail_fast.py",  # 36
    "test_export.py",  # 28
    "test_launcher_sync.py",  # 23
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put every test that needs a server fixture in the ``slow`` tier; longest modules first.

    ``make test-fast`` runs ``-m "not slow"``: the unit tier, with no Ray cluster and no S3
    server. Marking by fixture keeps a new S3 or Ray test out of the fast tier without anyone
    having to remember the marker.
    """
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order within


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


#: Whether this process started the loopback S3 server (set by ``s3_server``).
_S3_STARTED: list[bool] = []


@pytest.fixture(autouse=True)
def _unit_tests_start_no_servers(request: pytest.FixtureRequest) -> Iterator[None]:
    """A unit-tier test must not start Ray or the S3 server: it would belong in the slow tier.

    Compared before and after the test, because in the full suite the session's Ray instance
    (``ray_session``) and S3 server are up once any slow test has run; this also catches a
    fixture asked for inside a test (``request.getfixturevalue``), which marking by fixture
    names cannot see.
    """
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    ray_before, s3_before = _ray_running(), bool(_S3_STARTED)
    yield
    if not ray_before and _ray_running():
        sys.modules["ray"].shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray but is not marked slow", pytrace=False)
    if not s3_before and _S3_STARTED:
        pytest.fail(f"{request.node.nodeid} started the S3 server but is not marked slow", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited early with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server on 127.0.0.1:{port} did not come up in {timeout}s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A ``moto_server`` on 127.0.0.1; yields its endpoint URL and sets ``AWS_ENDPOINT_URL``."""
    port = free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        _S3_STARTED.append(True)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        yield endpoint
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the loopback server; yields ``s3://<name>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_server: str) -> Iterator[None]:
    """One local Ray instance for the session, started after the S3 endpoint is in the env.

    4 logical CPUs on a 2-core box: Ray Train workers' CPUs are excluded from Ray Data's
    budget, so data tasks need headroom beside 2 train workers (shared notes).
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # a new instance of our own, never one some other process left running
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            object_store_memory=1 << 30,
            log_to_driver=False,
        )
    yield
    ray.shutdown()
