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
from xdist.scheduler import LoadScopeScheduling
from xdist.workermanage import WorkerController

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
#: 2-core development box, 2026-12-07 13:50 UTC, nothing else running). Each pytest process
#: takes the longest module left of its half of the slow tier (below); the longest first keeps
#: one long module from running alone at the end. Modules not listed follow, in file order.
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
_RANK = {name: i for i, name in enumerate(LONGEST_FIRST)}

#: The slow-tier modules that start clusters of their own (multi-node, the fake autoscaler,
#: isolated job-server nodes, the launcher's synced node, a laptop's own instance, subprocess
#: runs) and never use the session's Ray instance or S3 server. ``make test`` (``--slow-halves``)
#: gives them to one pytest process and every other slow module to the other: each pytest
#: process that runs a test on the session's servers starts its own Ray instance and S3 server,
#: and on a 2-core box a second idle Ray node (GCS, raylet, dashboard and its agents, log
#: monitor, pooled workers) costs CPU that the tests need. A process that runs out of its own
#: half takes modules from the other rather than idle. ``_unit_tests_start_no_servers`` fails a
#: test listed here that starts a session server after all.
OWN_CLUSTER_MODULES = frozenset(
    {
        "test_autoscaling.py",
        "test_ddp_layout.py",
        "test_export.py",
        "test_jobs_submit.py",
        "test_launcher_sync.py",
        "test_multinode.py",
        "test_ray_local.py",
        "test_visualize.py",
    }
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow-halves",
        action="store_true",
        help="with -n 2: whole modules per pytest process, OWN_CLUSTER_MODULES (tests/conftest.py) "
        "preferably on one, the modules on the session's Ray and S3 server on the other",
    )


class _SlowTierHalves(LoadScopeScheduling):
    """Whole modules per worker, longest first; ``gw0`` prefers the modules on the session's
    servers and the other workers prefer ``OWN_CLUSTER_MODULES``, each taking from the other
    half only when its own is used up.

    A scheduler of our own rather than ``--dist loadgroup``: xdist 3.8 marks groups by
    rewriting node ids, which pytest 9.2 no longer lets it do, so the groups are silently
    ignored (pytest-dev/pytest-xdist#1386). The controller sees module names without collecting.
    """

    def _split_scope(self, nodeid: str) -> str:
        return nodeid.split("::", 1)[0]

    def _assign_work_unit(self, node: WorkerController) -> None:
        wants_own = node.gateway.id != "gw0"

        def preference(scope: str) -> tuple[bool, int]:
            name = scope.rsplit("/", 1)[-1]
            return ((name in OWN_CLUSTER_MODULES) != wants_own, _RANK.get(name, len(_RANK)))

        best = min(self.workqueue, key=preference)  # ties keep queue (collection) order
        self.workqueue.move_to_end(best, last=False)
        super()._assign_work_unit(node)  # takes the first unit of the queue


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which always answers
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> LoadScopeScheduling | None:
    return _SlowTierHalves(config, log) if config.getoption("slow_halves") else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put every test that needs a server fixture in the ``slow`` tier; longest modules first.

    ``make test-fast`` runs ``-m "not slow"``: the unit tier, with no Ray cluster and no S3
    server. Marking by fixture keeps a new S3 or Ray test out of the fast tier without anyone
    having to remember the marker.
    """
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: _RANK.get(item.path.name, len(_RANK)))  # stable: file order within


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


#: Whether this process started the loopback S3 server (set by ``s3_server``).
_S3_STARTED: list[bool] = []


@pytest.fixture(autouse=True)
def _unit_tests_start_no_servers(request: pytest.FixtureRequest) -> Iterator[None]:
    """A unit-tier test must not start Ray or the S3 server: it would belong in the slow tier;
    nor may a test in ``OWN_CLUSTER_MODULES`` start the session's servers: it would belong in
    the other half of the slow tier.

    Compared before and after the test, because in the full suite the session's Ray instance
    (``ray_session``) and S3 server are up once any slow test has run; this also catches a
    fixture asked for inside a test (``request.getfixturevalue``), which marking by fixture
    names cannot see.
    """
    ray_before, s3_before = _ray_running(), bool(_S3_STARTED)
    yield
    if request.node.get_closest_marker("slow") is not None:
        if request.node.path.name in OWN_CLUSTER_MODULES and not s3_before and _S3_STARTED:
            pytest.fail(
                f"{request.node.nodeid} started the session's S3 server (ray_session starts it "
                "too), but its module is in OWN_CLUSTER_MODULES (tests/conftest.py): take it out",
                pytrace=False,
            )
        return
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
