"""Autoscaling rehearsal on Ray's fake multi-node provider, with the node types of clusters/aws.yaml.

The cluster is what ``ray.cluster_utils.AutoscalingCluster`` builds: ``ray start --head
--autoscaling-config=<config>`` with ``RAY_FAKE_CLUSTER=1`` and the autoscaler v2 switches, a
``fake_multinode`` provider that starts a real raylet per launched node. Three things of
``AutoscalingCluster`` cannot be used on this machine, so its steps are taken here directly:
the installed wheel lacks the ``fake_multi_node/example.yaml`` it loads (its fields are
written out below; the provider is named as an external module, since for ``type:
fake_multinode`` the autoscaler also loads that file), its ``start()``/``shutdown()`` run
``ray stop --force`` (which kills every Ray instance of the user on the machine), and its head
listens on the fixed port 6379. Here the head gets free loopback ports and its own temp dir,
runs in its own process group and is stopped by that group; the provider starts nodes against
the head's own GCS address.

The worker node types are read from clusters/aws.yaml: same names, min/max workers and
priorities (spot twins first); resources scaled to this 2-core machine with ``fake_gpu``
standing in for ``GPU``. The config is written where ``ray up`` writes it on a head,
``~/ray_bootstrap_config.yaml`` (``HOME`` of the head's processes is a temp dir), so the
preflight in the job's driver finds the node types the way it does on a real cluster.
Jobs are submitted with the Jobs SDK to the head's dashboard, as ``ray job submit`` does.
"""

from __future__ import annotations

import contextlib
import importlib
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
from typing import Any

import pytest
import yaml
from stored_checkpoints import complete_states

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AWS = REPO / "clusters" / "aws.yaml"
GPU = "fake_gpu"
OBJECT_STORE = 150 * 2**20


# --------------------------------------------------------------------------------------------
# The preflight's arithmetic, on the real cluster files (no Ray needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_node_types_read_from_the_cluster_files(name: str) -> None:
    from hrt_ray.train.preflight import read_autoscaling_config

    types = {t.name: t for t in read_autoscaling_config(REPO / "clusters" / name)}
    raw = yaml.safe_load((REPO / "clusters" / name).read_text())
    assert set(types) == set(raw["available_node_types"]) - {raw["head_node_type"]}
    for t in types.values():
        spec = raw["available_node_types"][t.name]
        assert t.resources == {k: float(v) for k, v in spec["resources"].items() if v}
        assert t.max_workers == spec["max_workers"]


def test_never_versus_not_yet_on_the_aws_node_types() -> None:
    from hrt_ray.config import load_config
    from hrt_ray.train.preflight import _launchable, fits, read_autoscaling_config, resource_request

    types = read_autoscaling_config(AWS)
    head = [{"CPU": 0.0}]

    def feasible(*overrides: str) -> bool:
        request = resource_request(load_config(None, ["data.batch_size=16", *overrides]))
        return fits(request, head + _launchable(types, request))[0]

    assert not fits(resource_request(load_config(None, ["scaling.use_gpu=true"])), head)[0]
    assert feasible("scaling.use_gpu=true", "scaling.num_workers=8", "scaling.cpus_per_worker=8")
    # 16 one-GPU workers fit the 8-GPU types at their caps; 16 three-GPU workers do not (an
    # 8-GPU node holds 2 of them, the 4 such nodes 8; a bundle never spans nodes) ...
    assert feasible("scaling.use_gpu=true", "scaling.num_workers=16", "scaling.cpus_per_worker=8")
    assert not feasible("scaling.use_gpu=true", "scaling.num_workers=16", "scaling.gpus_per_worker=3")
    # ... and no node has 9 GPUs or 97 CPUs.
    assert not feasible("scaling.use_gpu=true", "scaling.num_workers=1", "scaling.gpus_per_worker=9")
    assert not feasible("scaling.num_workers=1", "scaling.cpus_per_worker=97")


def test_new_scaling_keys_are_validated() -> None:
    from hrt_ray.config import ConfigError, load_config

    cfg = load_config(None, ["scaling.resource_wait_s=60", "scaling.autoscaler_config=clusters/aws.yaml"])
    assert cfg.scaling.resource_wait_s == 60.0 and cfg.scaling.autoscaler_config == "clusters/aws.yaml"
    with pytest.raises(ConfigError, match=r"scaling.resource_wait_s: must be >= 0"):
        load_config(None, ["scaling.resource_wait_s=-1"])
    with pytest.raises(ConfigError, match=r"scaling.resource_report_interval_s: must be > 0"):
        load_config(None, ["scaling.resource_report_interval_s=0"])


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


def worker_node_types(cluster_yaml: Path) -> dict[str, dict[str, Any]]:
    """The cluster file's worker types for the fake provider: names, min/max workers and
    priorities as written; CPUs scaled down (1 logical CPU per 24, at least 3: one training
    worker plus the two CPUs Ray Data's read, repartition and map need to make progress beside
    it), GPUs as ``fake_gpu`` (the same count)."""
    cfg = yaml.safe_load(cluster_yaml.read_text())
    types = {}
    for name, spec in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        res = spec["resources"]
        resources: dict[str, Any] = {"CPU": max(3, round(res.get("CPU", 0) / 24))}
        if res.get("GPU"):
            resources[GPU] = res["GPU"]
        resources["object_store_memory"] = OBJECT_STORE
        types[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": spec.get("min_workers", 0),
            "max_workers": spec["max_workers"],
            **({"priority": spec["priority"]} if "priority" in spec else {}),
        }
    return types


def fake_cluster_config(gcs_address: str, worker_types: dict[str, Any]) -> dict[str, Any]:
    """``AutoscalingCluster._generate_config(..., autoscaler_v2=True)`` on Ray's example config."""
    from ray.autoscaler._private.fake_multi_node.node_provider import (
        FAKE_HEAD_NODE_ID,
        FAKE_HEAD_NODE_TYPE,
    )

    aws = yaml.safe_load(AWS.read_text())
    return {
        "cluster_name": "fake_" + aws["cluster_name"],
        "max_workers": aws["max_workers"],
        "upscaling_speed": aws["upscaling_speed"],
        # Short, so the rehearsal sees idle nodes go (aws.yaml: 10 minutes).
        "idle_timeout_minutes": 0.1,
        "provider": {
            # The same provider class as ``type: fake_multinode``, named as an external module:
            # "fake_multinode" makes the autoscaler load the missing example.yaml as defaults.
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,
            "head_node_id": FAKE_HEAD_NODE_ID,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            **worker_types,
            # aws.yaml's head: nothing is scheduled on it.
            FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        },
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "auth": {},
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def _free_port() -> int:
    from conftest import free_port

    return free_port()


class FakeAutoscalingCluster:
    """The head (with the v2 autoscaler and the fake provider) and the Jobs SDK client."""

    def __init__(self, root: Path) -> None:
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        self.root = root
        self.home = root / "home"
        self.home.mkdir()
        port, dash = _free_port(), _free_port()
        self.gcs = f"127.0.0.1:{port}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.types = worker_node_types(AWS)
        self.config_path = self.home / "ray_bootstrap_config.yaml"
        self.write_config(self.types)
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "PYTHONPATH": str(REPO),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PYTHONUNBUFFERED": "1",
            # AutoscalingCluster.start(autoscaler_v2=True)'s environment.
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_FAKE_CLUSTER": "1",
            "RAY_enable_autoscaler_v2": "1",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            # Ray Data asks the autoscaler for more CPU when its utilisation is high. Ray keeps
            # CPU-only demand off node types with "GPU", but the stand-in is a custom resource,
            # so here that demand would launch the 8-"GPU" types (4 CPUs, the most per node).
            # Ray Data's own utilisation-driven scale-up is off here; what Train's and Data's
            # autoscaling coordinator asks for during a run can still add nodes (seen: cpu and
            # gpu8 types) beside the one the request launches first.
            **{
                f"RAY_DATA_DEFAULT_CLUSTER_SCALING_UP_{kind}_UTIL_THRESHOLD": "2"
                for kind in ("CPU", "GPU", "MEMORY", "OBJECT_STORE_MEMORY")
            },
        }
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dir = tempfile.mkdtemp(prefix="ras", dir="/tmp")  # short: socket path limit
        cmd = [
            str(BIN / "ray"), "start", "--head", "--block",
            f"--autoscaling-config={self.config_path}",
            "--port", str(port),
            "--node-ip-address", "127.0.0.1",
            "--num-cpus", "0",
            "--object-store-memory", str(OBJECT_STORE),
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash),
            "--dashboard-agent-listen-port", str(_free_port()),
            "--dashboard-agent-grpc-port", str(_free_port()),
            "--metrics-export-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()),
            "--ray-client-server-port", str(_free_port()),
            "--temp-dir", self.temp_dir,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=open(root / "head.log", "w"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 180
        while True:
            try:
                self.client = JobSubmissionClient(self.dashboard)
                self.client.list_jobs()
                # Up once the head's raylet has registered and the autoscaler reports (`ray
                # start` gives up, taking the head down, if the raylet takes over 30 s).
                st = self.status()
                if st.stats.autoscaler_version not in (None, "", "0") and st.active_nodes + st.idle_nodes:
                    break
            except Exception as exc:  # the dashboard is not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.shutdown()
                    raise RuntimeError(f"fake autoscaling head did not come up: {exc}\n{self.log()}") from exc
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.shutdown()
                raise RuntimeError(f"fake autoscaling head did not come up:\n{self.log()}")
            time.sleep(2)

    def write_config(self, types: dict[str, Any]) -> None:
        """(Re)write the autoscaling config; the v2 autoscaler re-reads it every update."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(fake_cluster_config(self.gcs, types)))
        tmp.replace(self.config_path)

    @contextlib.contextmanager
    def node_types(self, **changes: dict[str, Any]) -> Iterator[None]:
        """Node types changed for a while (e.g. a cap: ``gpu1_spot={"max_workers": 0}``)."""
        types = json.loads(json.dumps(self.types))
        for name, change in changes.items():
            types[name].update(change)
        self.write_config(types)
        time.sleep(3)  # a few autoscaler updates
        try:
            yield
        finally:
            self.write_config(self.types)

    def log(self) -> str:
        return (self.root / "head.log").read_text()[-3000:]

    def status(self) -> Any:
        """The autoscaler's view; a GCS slow to answer on a loaded box is asked again, not failed."""
        from ray.autoscaler.v2.sdk import get_cluster_status
        from ray.exceptions import RpcError

        deadline = time.monotonic() + 120
        while True:
            try:
                return get_cluster_status(self.gcs, timeout=30)
            except RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def worker_nodes(self) -> list[str]:
        """Node types of the worker nodes that are up or launching."""
        st = self.status()
        nodes = st.active_nodes + st.idle_nodes + st.pending_nodes
        pending = [r.ray_node_type_name for r in st.pending_launches for _ in range(r.count)]
        return [n.ray_node_type_name for n in nodes if n.ray_node_type_name in self.types] + pending

    def submit(self, entrypoint: str) -> str:
        deadline = time.monotonic() + 120
        while True:
            try:
                return self.client.submit_job(entrypoint=entrypoint)
            except RuntimeError as exc:  # the head's agent registers a little after the dashboard
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def wait_job(self, job_id: str, timeout: float, seen: list[str] | None = None) -> tuple[str, str]:
        """Wait for the job to end; list the worker node types in the order first seen."""
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + timeout
        while True:
            status = self.client.get_job_status(job_id)
            if seen is not None:
                seen += [t for t in dict.fromkeys(self.worker_nodes()) if t not in seen]
            if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
                return str(status), self.client.get_job_logs(job_id)
            if time.monotonic() > deadline:
                logs = self.client.get_job_logs(job_id)
                self.client.stop_job(job_id)
                raise AssertionError(f"job {job_id} still {status} after {timeout}s:\n{logs[-4000:]}")
            time.sleep(1)

    def wait_scaled_to_zero(self, timeout: float) -> float:
        start = time.monotonic()
        while self.worker_nodes():
            assert time.monotonic() - start < timeout, f"worker nodes still up: {self.worker_nodes()}"
            time.sleep(1)
        return time.monotonic() - start

    def shutdown(self) -> None:
        """Kill the head's process group, then whatever the provider started against its GCS.

        Not SIGTERM: ``ray start --block`` then drains its node for up to 30 s, and after the
        training jobs here it waited all of them (a fresh head drains in under a second); sent
        to the whole group, the drain's RPC to the dying GCS times out after 30 s instead.
        Nothing of the cluster is needed after the tests.
        """
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)

        psutil = importlib.import_module("psutil")

        ours = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(self.gcs in arg or self.temp_dir in arg for arg in p.info["cmdline"] or []):
                    ours.append(p)
        for p in ours:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(ours, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """The module's own temp dir: pytest prunes old ``pytest-of-<user>`` directories, which
    another pytest run of the same user can do while this module's cluster still uses them."""
    root = Path(tempfile.mkdtemp(prefix="hrt-autoscaling-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(scratch: Path) -> Iterator[FakeAutoscalingCluster]:
    # `ray start` gives its raylet a fixed 30 s to register: on a saturated machine, try again.
    for attempt in range(4):
        root = scratch / f"cluster{attempt}"
        root.mkdir()
        try:
            c = FakeAutoscalingCluster(root)
            break
        except RuntimeError:
            if attempt == 3:
                raise
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def workdir(scratch: Path) -> Path:
    (scratch / "work").mkdir()
    return scratch / "work"


def train_entrypoint(workdir: Path, name: str, *overrides: str) -> str:
    """``hrt-ray train`` of jobs/default.yaml, small, each worker asking for one GPU stand-in."""
    args = [
        sys.executable, "-m", "hrt_ray", "train", "--config", str(REPO / "jobs" / "default.yaml"),
        "--no-eval",
        f"name={name}",
        f"storage.path={workdir / 'runs'}",
        f"data.train_uri={workdir / 'data' / 'train'}",
        f"data.val_uri={workdir / 'data' / 'val'}",
        "data.synth.num_train=16", "data.synth.num_val=2", "data.synth.size=[64,64]",
        "data.synth.generate=true",
        "data.crop_size=[64,64]", "data.batch_size=2",
        "optim.max_iters=2", "optim.warmup_iters=1", "loss.ohem_min_kept=1000",
        "eval.interval=2", "eval.at_start=false", "checkpoint.every=2",
        "failure.max_failures=0", "failure.stall_timeout_s=300",
        "scaling.num_workers=1", "scaling.use_gpu=false",
        f"scaling.resources_per_worker={{{GPU}: 1}}",
        *overrides,
    ]  # fmt: skip
    return " ".join(f"'{a}'" for a in args)


# --------------------------------------------------------------------------------------------
# Tests (in file order: each leaves the cluster with zero worker nodes)
# --------------------------------------------------------------------------------------------


def test_node_types_mirror_the_aws_cluster_file() -> None:
    aws = yaml.safe_load(AWS.read_text())
    types = worker_node_types(AWS)
    assert set(types) == set(aws["available_node_types"]) - {aws["head_node_type"]}
    for name, spec in types.items():
        src = aws["available_node_types"][name]
        assert (spec["min_workers"], spec["max_workers"]) == (src["min_workers"], src["max_workers"])
        assert spec["resources"].get(GPU, 0) == src["resources"].get("GPU", 0)
    # Spot first: each spot type outranks its on-demand twin of the same shape.
    for spot in (n for n in types if n.endswith("_spot")):
        twin = spot.replace("_spot", "_ondemand")
        assert types[spot]["resources"] == types[twin]["resources"]
        assert types[spot]["priority"] > types[twin]["priority"]


@pytest.mark.slow
def test_infeasible_request_fails_at_once_naming_the_node_types(
    cluster: FakeAutoscalingCluster, workdir: Path
) -> None:
    """More GPUs per worker than any node type has: no waiting, no launch, the types listed."""
    start = time.monotonic()
    job = cluster.submit(
        train_entrypoint(workdir, "infeasible", f"scaling.resources_per_worker={{{GPU}: 16}}")
    )
    seen: list[str] = []
    status, logs = cluster.wait_job(job, timeout=180, seen=seen)
    assert status == "FAILED", logs[-3000:]
    assert "resource error" in logs and "no node of this cluster can ever provide" in logs, logs[-3000:]
    assert f"1 worker(s) x {{CPU: 1, {GPU}: 16}}" in logs
    assert f"gpu8_spot {{CPU: 4, {GPU}: 8}} x max 2" in logs and "cpu {CPU: 3} x max 4" in logs
    assert "waiting up to" not in logs
    assert not seen, f"nothing should have been launched: {seen}"
    assert time.monotonic() - start < 120


@pytest.mark.slow
def test_training_job_scales_up_spot_first_then_on_demand_runs_and_scales_down(
    cluster: FakeAutoscalingCluster, workdir: Path
) -> None:
    """Zero workers at the start; two training workers, each asking for a GPU, while the cloud
    has spot capacity for one single-GPU node only (``gpu1_spot`` capped at one): the autoscaler
    launches the single-GPU spot type (best fit, then priority) for one worker and its on-demand
    twin for the other, the run finishes on the two nodes, and the nodes idle away.

    One job for what two did (one launched spot, then one with no spot capacity at all launched
    on-demand): the fallback is the same rule, a type at its cap gives way to the next priority.
    Only the first launches are the request's: during the run Ray Train's and Ray Data's
    autoscaling coordinator asks for more, which Ray keeps off real "GPU" node types but
    not off the stand-in's."""
    assert cluster.worker_nodes() == []
    seen: list[str] = []
    with cluster.node_types(gpu1_spot={"max_workers": 1}):
        job = cluster.submit(train_entrypoint(workdir, "scale", "scaling.num_workers=2"))
        status, logs = cluster.wait_job(job, 900, seen)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "waiting up to" in logs and "resources ready" in logs, logs[-3000:]
    assert (workdir / "runs" / "scale" / "summary.json").exists()
    assert sorted(seen[:2]) == ["gpu1_ondemand", "gpu1_spot"], seen
    # Both workers trained: the checkpoint holds one RNG state per rank.
    assert {len(s["rng"]) for s in complete_states(workdir / "runs" / "scale")} == {2}
    cluster.wait_scaled_to_zero(timeout=300)


@pytest.mark.slow
def test_capped_node_type_waits_with_the_autoscaler_report_then_fails(
    cluster: FakeAutoscalingCluster, workdir: Path
) -> None:
    """Quota for one single-GPU node, held by another job: the run could fit but not now, so
    the preflight waits, prints what the autoscaler reports, and fails at its deadline."""
    caps = {
        "gpu1_spot": {"max_workers": 1},
        "gpu1_ondemand": {"max_workers": 0},
        "gpu8_spot": {"max_workers": 0},
        "gpu8_ondemand": {"max_workers": 0},
    }
    holder = (
        f"'{sys.executable}' -c \"import ray, time; ray.init(); "
        f"from ray.util.placement_group import placement_group; "
        f"pg = placement_group([{{'{GPU}': 1, 'CPU': 1}}]); ray.get(pg.ready()); "
        f"print('holding', flush=True); time.sleep(600)\""
    )
    with cluster.node_types(**caps):
        held = cluster.submit(holder)
        try:
            deadline = time.monotonic() + 180
            while "holding" not in cluster.client.get_job_logs(held):
                assert time.monotonic() < deadline, cluster.client.get_job_logs(held)
                time.sleep(1)
            start = time.monotonic()
            job = cluster.submit(
                train_entrypoint(
                    workdir, "capped", "scaling.resource_wait_s=20", "scaling.resource_report_interval_s=5"
                )
            )
            status, logs = cluster.wait_job(job, timeout=240)
            assert status == "FAILED", logs[-3000:]
            assert time.monotonic() - start < 200
            assert logs.count("still waiting after") >= 2, logs[-3000:]
            assert "the autoscaler reports as infeasible now" in logs, logs[-3000:]
            assert "did not within scaling.resource_wait_s=20 s" in logs, logs[-3000:]
            assert "gpu1_spot {CPU: 3, fake_gpu: 1} x max 1" in logs
            assert not (workdir / "runs" / "capped").exists()
        finally:
            cluster.client.stop_job(held)
    cluster.wait_scaled_to_zero(timeout=300)
