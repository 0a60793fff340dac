"""A real multi-node Ray cluster on loopback: a head and three worker nodes, jobs submitted with
``ray job submit``, worker nodes lost and preempted mid-run.

The cluster lives in a helper process (this file run as a script) that drives
``ray.cluster_utils.Cluster``, so the test process never calls ``ray.init`` (the session's
``ray_session`` instance may be running beside it) and ``Cluster.shutdown()`` stops exactly the
processes this test started. Every node is a separate raylet with its own ``node_slot``
resource, and each training worker asks for one slot, so two workers land on two nodes.

Loopback: ``ray start --address`` refuses to add nodes when
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the switch that makes Ray's node-IP lookup answer
127.0.0.1), and without it ``resolve_ip_for_localhost`` turns ``--node-ip-address 127.0.0.1``
into the machine's external address. ``Cluster.add_node`` does not go through that CLI check,
so with the switch set every node registers as 127.0.0.1 and every connection between the
cluster's processes stays on loopback (asserted below from the processes' own sockets).
Ray 2.60's C++ gRPC servers still *listen* on 0.0.0.0; no option of 2.60 narrows that.

``RAY_TMPDIR`` gives the cluster its own temp root, so its ``ray_current_cluster`` file never
makes another test's ``ray.init()`` join this cluster.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------
# The cluster helper process
# --------------------------------------------------------------------------------------------


def _serve_cluster(head_args: dict[str, Any]) -> None:
    """Run a Ray cluster and obey JSON commands on stdin (add/remove/shutdown), one per line.

    Runs in its own process: ``Cluster.add_node``/``remove_node`` must be called from the
    main thread, and keeping the cluster out of the pytest process keeps ``ray.init`` there free.
    """
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=head_args)
    nodes: dict[str, Any] = {}

    def emit(**event: Any) -> None:
        print(json.dumps(event), flush=True)

    emit(event="head", gcs=cluster.address, node_id=cluster.head_node.node_id,
         ip=cluster.head_node.node_ip_address)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "add":
                try:
                    node = cluster.add_node(**cmd["args"])
                except Exception as exc:  # e.g. its raylet missed Ray's 30 s to register: say so
                    emit(event="add_failed", error=f"{type(exc).__name__}: {exc}"[:2000])
                    continue
                nodes[node.node_id] = node
                emit(event="added", node_id=node.node_id, ip=node.node_ip_address)
            elif cmd["op"] == "remove":
                cluster.remove_node(nodes.pop(cmd["node_id"]), allow_graceful=False)
                emit(event="removed", node_id=cmd["node_id"])
            elif cmd["op"] == "shutdown":
                break
    finally:
        cluster.shutdown()
        emit(event="down")


def _psutil() -> Any:
    """Ray's vendored psutil (the venv has no separate one); importing ray puts it on sys.path."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


class LoopbackCluster:
    """The test's handle on the helper process: add/remove nodes, submit jobs, clean up."""

    def __init__(self, root: Path, head_cpus: int = 1) -> None:
        from conftest import free_port

        self.root = root
        dashboard_port = free_port()
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        # The head's fixed default ports (8265 dashboard, 52365 agent) may belong to another
        # Ray instance on this machine: the dashboard gets a free port, the agent a random one
        # (None, as Cluster gives every worker node).
        head_args = {
            "num_cpus": head_cpus,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            "dashboard_agent_listen_port": None,
            "object_store_memory": 200 * 2**20,
        }
        self.env = {
            **os.environ,
            "RAY_TMPDIR": str(root),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            # A killed node is declared dead after ~3 missed 1 s health checks, not ~15 s.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            # Ray Train's preemption watcher polls node drains every second, not every 5 s.
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", json.dumps(head_args)],
            env=self.env,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(root / "helper.log", "w"),  # noqa: SIM115 (closed with the process)
            text=True,
            start_new_session=True,
        )
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read_events, daemon=True).start()
        try:
            head = self._expect("head", timeout=240)
        except RuntimeError:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the helper and its nodes
            self.proc.wait(timeout=30)
            raise
        self.gcs, self.head_id, self.head_ip = head["gcs"], head["node_id"], head["ip"]
        self.workers: list[str] = []
        self._added = 0

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self._events.put(json.loads(line))

    def _expect(self, event: str | tuple[str, ...], timeout: float) -> dict[str, Any]:
        try:
            got = self._events.get(timeout=timeout)
        except queue.Empty:
            log = self.helper_log()
            raise RuntimeError(f"cluster helper sent no {event!r} in {timeout}s: {log}") from None
        assert got["event"] in ((event,) if isinstance(event, str) else event), (got, self.helper_log())
        return got

    def _send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def helper_log(self) -> str:
        return (self.root / "helper.log").read_text()[-3000:]

    def add_worker_node(self, num_cpus: int = 2) -> str:
        self._added += 1
        args = {
            "num_cpus": num_cpus,
            "resources": {"node_slot": 1},
            # Its own runtime-env directory, as on a separate machine: nodes sharing one would
            # unpack and garbage-collect the job's working dir under each other's running code.
            "runtime_env_dir_name": f"runtime_resources_node{self._added}",
        }
        # A node whose raylet misses Ray's fixed 30 s to register (a saturated machine) is
        # started again, as a cloud replaces a node that fails to boot.
        for attempt in range(3):
            self._send(op="add", args=args)
            added = self._expect(("added", "add_failed"), timeout=240)
            if added["event"] == "added":
                break
            assert attempt < 2, f"a worker node failed to start three times: {added['error']}"
        assert added["ip"] == "127.0.0.1"
        self.workers.append(added["node_id"])
        return added["node_id"]

    def remove_node(self, node_id: str) -> None:
        """Kill the node's raylet and every process on it, without grace (a lost machine)."""
        self._send(op="remove", node_id=node_id)
        self._expect("removed", timeout=60)
        self.workers.remove(node_id)

    def drain_for_preemption(self, node_id: str, deadline_s: int) -> None:
        """What a cloud provider's reclaim notice becomes in Ray: a drain with reason PREEMPTION."""
        out = subprocess.run(
            [str(BIN / "ray"), "drain-node", "--address", self.gcs, "--node-id", node_id,
             "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
             "--deadline-remaining-seconds", str(deadline_s)],
            env=self.env, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def pids(self) -> list[int]:
        psutil = _psutil()
        with contextlib.suppress(psutil.NoSuchProcess):
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        return []

    def shutdown(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self._send(op="shutdown")
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # Only this helper's own process group (start_new_session): nobody else's Ray.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


def tiny_job(name: str, runs: Path, data: Path, max_iters: int, *extra: str) -> list[str]:
    """``hrt-ray train`` of the default job, shrunk to seconds, one worker per node.

    48 training images at a global batch of 4 make 12 iterations per epoch: Ray Data re-runs
    its pipeline every epoch, which is slow on a busy 2-core machine, so runs stay short in
    epochs.
    """
    return [
        "hrt-ray", "train", "--config", "jobs/default.yaml",
        f"name={name}",
        f"storage.path={runs}",
        f"data.train_uri={data}/train",
        f"data.val_uri={data}/val",
        "data.synth.num_train=48",
        "data.synth.num_val=2",
        "data.synth.size=[64,64]",
        "data.crop_size=[64,64]",
        "data.batch_size=4",
        f"optim.max_iters={max_iters}",
        "optim.warmup_iters=1",
        "loss.ohem_min_kept=2000",
        f"eval.interval={max_iters}",
        "eval.at_start=false",
        # Keep every checkpoint: the tests read the world size each one was written with.
        "checkpoint.keep=100",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=1",
        "scaling.resources_per_worker={node_slot: 1}",
        "failure.stall_timeout_s=300",
        *extra,
        "--no-eval",
    ]


def submit(cluster: LoopbackCluster, job_id: str, entrypoint: list[str]) -> None:
    """``ray job submit --no-wait``; retried while the head's job agent is still starting."""
    deadline = time.monotonic() + 180
    while True:
        out = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id,
             "--working-dir", str(REPO), "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"),
             "--no-wait", "--", *entrypoint],
            env=cluster.env, capture_output=True, text=True, timeout=180,
        )
        if out.returncode == 0:
            return
        not_ready = "No available agent" in out.stderr or "Connection refused" in out.stderr
        assert not_ready and time.monotonic() < deadline, out.stdout + out.stderr
        time.sleep(2)


def wait_job(cluster: LoopbackCluster, job_id: str, timeout: float) -> tuple[str, str]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value, client.get_job_logs(job_id)
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} still running after {timeout}s:\n{logs[-4000:]}")


def wait_for_job_log(cluster: LoopbackCluster, job_id: str, text: str, timeout: float) -> None:
    """Until the running job's console output (``ray job logs``) shows ``text``."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    deadline = time.monotonic() + timeout
    logs = ""
    while time.monotonic() < deadline:
        logs = client.get_job_logs(job_id)
        if text in logs:
            return
        time.sleep(1)
    raise AssertionError(f"job {job_id} printed no {text!r} in {timeout}s:\n{logs[-4000:]}")


def train_worker_actors(cluster: LoopbackCluster) -> list[Any]:
    """Every Ray Train worker actor the cluster has seen, alive or dead (by pid)."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
        limit=1000, raise_on_missing_output=False,
    )
    return sorted(actors, key=lambda a: a.pid or 0)


def checkpoint_states(run_dir: Path) -> list[dict[str, Any]]:
    """Complete checkpoints only: a node lost mid-upload leaves a half-copied one behind."""
    # deferred: this file also runs as the cluster helper script, which needs neither torch nor hrt_ray
    from stored_checkpoints import complete_states

    return complete_states(run_dir)


def wait_for_checkpoint(run_dir: Path, min_iteration: int, timeout: float) -> None:
    # deferred: this file also runs as the cluster helper script, which needs neither torch nor hrt_ray
    from stored_checkpoints import stored_iterations

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(stored_iterations(run_dir), default=-1) >= min_iteration:
            return
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint at iteration >= {min_iteration} in {run_dir} after {timeout}s")


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    # The head's raylet gets Ray's fixed 30 s to register with its GCS: on a saturated machine
    # that can time out, and a fresh attempt usually comes up.
    for attempt in range(3):
        root = Path(tempfile.mkdtemp(prefix="hmn", dir="/tmp"))  # short: Ray's socket path limit
        try:
            handle = LoopbackCluster(root)
            break
        except RuntimeError:
            shutil.rmtree(root, ignore_errors=True)
            if attempt == 2:
                raise
    try:
        for _ in range(3):
            handle.add_worker_node()
        yield handle
    finally:
        handle.shutdown()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The jobs' synthetic dataset, written up front (same settings as ``tiny_job``) so the
    job drivers find it instead of generating it while the cluster is busy."""
    root = tmp_path_factory.mktemp("mn-data")
    out = subprocess.run(
        [str(BIN / "hrt-ray"), "data", "synth", "--dst", str(root), "--num-train", "48",
         "--num-val", "2", "--size", "64x64", "--classes", "5"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return root


def test_lost_node_restarts_from_last_checkpoint_on_remaining_nodes(
    cluster: LoopbackCluster, data: Path, tmp_path: Path
) -> None:
    """A fixed-size run (the published configs' mode), submitted with ``ray job submit``, spreads
    its workers over the worker nodes, then loses a node hosting one of them.

    Ray Train charges the worker-group failure to ``failure.max_failures``, restarts the whole
    group from the latest checkpoint on the nodes that are left (here the spare third node, on
    a cloud the node the autoscaler launches), and the run finishes. Every process of the
    cluster talks to 127.0.0.1 only.
    """
    runs = tmp_path / "runs"
    run_dir = runs / "lost"
    before = {a.actor_id for a in train_worker_actors(cluster)}
    submit(cluster, "lost", tiny_job("lost", runs, data, 12, "checkpoint.every=2", "failure.max_failures=2"))
    wait_for_checkpoint(run_dir, 2, timeout=480)
    first_group = [a for a in train_worker_actors(cluster) if a.actor_id not in before and a.state == "ALIVE"]
    assert len(first_group) == 2, first_group
    # Two training workers, each on its own worker node (never the head).
    first_nodes = {a.node_id for a in first_group}
    assert len(first_nodes) == 2 and first_nodes <= set(cluster.workers), (first_nodes, cluster.workers)
    victim = first_group[-1].node_id
    cluster.remove_node(victim)
    status, logs = wait_job(cluster, "lost", timeout=600)
    assert status == "SUCCEEDED", logs[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iteration"] == 12
    assert summary["checkpoint"].startswith(str(run_dir / "checkpoint_"))
    assert 0.0 <= summary["final_miou"] <= 1.0
    assert f"run            lost (12 iterations, resumed at iteration {summary['resumed_from']})" in logs
    # Resumed from a checkpoint taken before the loss, not from scratch and not after the end.
    assert summary["resumed_from"] is not None and 2 <= summary["resumed_from"] < 12, summary
    # The quiet console says what happened and which failure budget it was charged to.
    assert "restart 1/2 after a worker group failure: rank" in logs, logs[-4000:]
    assert "preemption" not in logs
    ours = [a for a in train_worker_actors(cluster) if a.actor_id not in before]
    restarted = [a for a in ours if a.actor_id not in {w.actor_id for w in first_group}]
    # The restarted group: two workers again, on the two nodes that are left.
    assert len(restarted) >= 2, restarted
    assert victim not in {a.node_id for a in restarted}
    assert len({a.node_id for a in restarted}) == 2
    # Every checkpoint was written by a 2-worker group (one RNG state per rank).
    assert {len(s["rng"]) for s in checkpoint_states(run_dir)} == {2}
    # All nodes registered as 127.0.0.1, and no process of the cluster holds a connection to
    # any other address.
    psutil = _psutil()
    remote_ips = set()
    for pid in cluster.pids():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for conn in psutil.Process(pid).net_connections(kind="inet"):
                if conn.raddr:
                    remote_ips.add(conn.raddr.ip)
    assert remote_ips and remote_ips <= {"127.0.0.1", "::ffff:127.0.0.1"}, remote_ips
    assert cluster.head_ip == "127.0.0.1"


def test_preempted_node_is_survived_elastically_without_spending_max_failures(
    cluster: LoopbackCluster, data: Path, tmp_path: Path
) -> None:
    """Spot preemption: the reclaim notice reaches Ray as a node drain with reason PREEMPTION.

    - Ray Train's preemption watcher sees the drain; at the deadline the controller restarts the
      group and charges it to ``FailureConfig.max_preemption_failures`` (Ray's default: no
      limit), not to ``failure.max_failures``, which is 0 here: any real failure would end it.
    - Warned of the preemption (``ray.train.get_preemption_info``), every rank reports a
      just-in-time checkpoint at the next iteration; the group comes back elastically
      (``scaling.min_workers=1``) on the one node left and resumes from it, so less than
      ``checkpoint.every`` iterations are redone.
    """
    runs = tmp_path / "runs"
    run_dir = runs / "spot"
    # Two slot nodes, so that losing one leaves one: the lost-node test above took the third,
    # and when this test runs alone it goes here (an idle node, before the job starts).
    while len(cluster.workers) > 2:
        cluster.remove_node(cluster.workers[-1])
    every, total = 6, 36
    before = {a.actor_id for a in train_worker_actors(cluster)}
    submit(
        cluster,
        "spot",
        tiny_job("spot", runs, data, total, f"checkpoint.every={every}", "failure.max_failures=0",
                 "scaling.min_workers=1"),
    )
    wait_for_checkpoint(run_dir, every, timeout=480)
    alive = [a for a in train_worker_actors(cluster) if a.actor_id not in before and a.state == "ALIVE"]
    assert len(alive) == 2, alive
    victim = alive[-1].node_id
    # Ray counts a node's death as a preemption only after the drain's deadline (the GCS infers
    # AUTOSCALER_DRAIN_PREEMPTED then; before it, the death is unexpected and would be charged to
    # max_failures=0). So the cloud here takes the machine just after the deadline, as a real
    # one does. The deadline leaves a loaded 2-core box time for the notice (a 5 s poll) and the
    # just-in-time checkpoint, which at an epoch boundary waits for Ray Data to restart its
    # pipeline (10 s was seen too short).
    deadline_s = 60
    cluster.drain_for_preemption(victim, deadline_s=deadline_s)
    drained = time.monotonic()
    wait_for_job_log(cluster, "spot", "preemption notice for rank(s) [", timeout=deadline_s)
    noticed = max(s["iteration"] for s in checkpoint_states(run_dir))
    wait_for_checkpoint(run_dir, noticed + 1, timeout=max(1.0, drained + deadline_s - time.monotonic()))
    # The reclaimed machine freezes once the checkpoint is saved (SIGSTOP on its training
    # process; the rank on the other node then waits in DDP's all-reduce). Otherwise a fast
    # box finishes all `total` iterations inside the deadline (CI did: resumed at 48 of 48), and
    # there is nothing left to resume. Ray's worker health check allows 10 min, far past this.
    frozen = alive[-1].pid
    os.kill(frozen, signal.SIGSTOP)
    try:
        time.sleep(max(0.0, drained + deadline_s + 3 - time.monotonic()))
        cluster.remove_node(victim)
    finally:
        # Killing the raylet does not end a stopped process: it would linger after the node.
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGKILL)
    status, logs = wait_job(cluster, "spot", timeout=600)
    # Without the raylet's state dumps, which a killed node's last words fill the log with.
    assert status == "SUCCEEDED", "\n".join(
        line for line in logs.splitlines() if "[state-dump]" not in line
    )[-6000:]
    assert "restart 1 (no limit) after a preemption failure" in logs, logs[-4000:]
    assert "worker group failure" not in logs, logs[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iteration"] == total
    resumed = summary["resumed_from"]
    # The notice made every rank report a just-in-time checkpoint after the last periodic one seen
    # before it, so the lost work is less than a checkpoint interval.
    assert "preemption notice for rank(s) [" in logs, logs[-4000:]
    assert "worker group resized: 2 -> 1 worker(s)" in logs, logs[-4000:]
    assert resumed is not None and noticed < resumed < total, (summary, noticed)
    # Two workers wrote the checkpoints before the preemption, one after it (elastic shrink).
    sizes = {s["iteration"]: len(s["rng"]) for s in checkpoint_states(run_dir)}
    assert sizes[resumed] == 2 and sizes[total] == 1, sizes
    restarted = [
        a for a in train_worker_actors(cluster)
        if a.actor_id not in before and a.actor_id not in {w.actor_id for w in alive}
    ]
    assert restarted and len({a.node_id for a in restarted}) == 1, restarted
    assert victim not in {a.node_id for a in restarted}


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve_cluster(json.loads(sys.argv[2]))
