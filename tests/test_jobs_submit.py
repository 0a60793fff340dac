"""`ray job submit` the way a real cluster sees it.

A real node has the runtime dependencies installed but never the source tree or an editable
install of it: everything of ``hrt_ray`` that runs there arrives in the working-dir package that
Ray's packager builds from ``jobs/runtime_env.yaml``. So the package is built here with Ray's own
packager from a copy of the repo full of decoys (data, run outputs, a virtualenv, credentials),
and a job is submitted to a loopback cluster (head + worker node) whose Python cannot import
``hrt_ray`` any other way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT, free_port
from repo_copy import DECOYS, copy_repo, package_files

BIN = Path(sys.executable).parent
RUNTIME_ENV = "jobs/runtime_env.yaml"


def test_runtime_env_excludes_bulk_and_reports_oversize(tmp_path: Path) -> None:
    from hrt_ray.train.jobenv import JobEnvError, check_working_dir, load_runtime_env

    env = load_runtime_env(REPO_ROOT / RUNTIME_ENV)
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


@pytest.mark.parametrize("include_gitignore", [True, False], ids=["with-gitignore", "excludes-only"])
def test_ray_packager_ships_every_module_and_no_decoy(tmp_path: Path, include_gitignore: bool) -> None:
    """Ray's own packager (what `ray job submit --working-dir` calls) on a decoy-filled copy.

    `ray job submit` honours .gitignore unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1, so the
    runtime env's excludes alone must also keep credentials and bulk out.
    """
    from ray._private.runtime_env.packaging import create_package

    from hrt_ray.train.jobenv import load_runtime_env

    repo = copy_repo(tmp_path / "repo")
    excludes = load_runtime_env(repo / RUNTIME_ENV)["excludes"]
    pkg = tmp_path / "pkg.zip"
    create_package(str(repo), pkg, include_gitignore=include_gitignore, excludes=excludes)
    with zipfile.ZipFile(pkg) as zf:
        names = {n.rstrip("/") for n in zf.namelist()}

    expected = package_files()
    assert "hrt_ray/data/__init__.py" in expected and "hrt_ray/data/specs/cityscapes.yaml" in expected
    missing = sorted(expected - names)
    assert not missing, f"{RUNTIME_ENV} drops package files from the upload: {missing}"
    for needed in ("jobs/default.yaml", RUNTIME_ENV, "pyproject.toml"):
        assert needed in names
    shipped_decoys = sorted(rel for rel in DECOYS if rel in names)
    assert not shipped_decoys, f"{RUNTIME_ENV} uploads what must stay behind: {shipped_decoys}"
    secret = {".aws", ".env", ".env.local", ".git", ".venv"}
    assert not [n for n in names if secret & set(n.split("/"))]
    assert not [n for n in names if n.split("/")[0] in {"data", "runs"}]


# ---------------------------------------------------------------------------------------------
# A loopback cluster whose Python has the runtime dependencies but not hrt_ray.


@dataclass
class IsolatedCluster:
    root: Path
    python: Path
    dashboard: str
    gcs: str
    env: dict[str, str]

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Ray's CLI run by the node's Python from outside the repository."""
        return subprocess.run(
            [str(self.python), "-m", "ray.scripts.scripts", *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _node_env(root: Path) -> Path:
    """A venv whose site-packages reaches this environment's packages through a plain path line.

    A path line in a .pth adds the directory to sys.path but does not process the .pth files
    inside it, so the editable install's ``__editable__`` hook never runs there.
    """
    venv = root / "node-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "hrt-ray-runtime-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


#: Run by the node environment's Python: Ray's own multi-node test cluster (head + one worker
#: node, each its own raylet), kept on loopback. `ray start --address` cannot do that here: it
#: refuses worker nodes when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the switch that keeps Ray on
#: 127.0.0.1) and otherwise advertises the machine's external address.
CLUSTER_HELPER = """
import json, os, signal, sys
from ray._private.utils import write_ray_address
from ray.cluster_utils import Cluster

temp_root, worker_cpus = sys.argv[1], float(sys.argv[2])
# Per attempt "dashboard port:agent port"; the agent's default (52365) may be taken by another Ray.
port_pairs = [tuple(map(int, pair.split(":"))) for pair in sys.argv[3].split(",")]


def kill_attempt(marker):
    # A failed start leaves its processes running; they carry their temp dir on the command line.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                hit = marker.encode() in f.read()
        except OSError:
            continue
        if hit and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


# A raylet gets 30 s to register with the GCS; a loaded box can miss that, so the head gets a
# few attempts, each in its own temp dir and on its own dashboard port.
for attempt, (dashboard_port, agent_port) in enumerate(port_pairs):
    temp_dir = os.path.join(temp_root, f"a{attempt}")
    try:
        # The head runs the job driver only (no CPUs): training and data tasks go to the worker.
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, node_ip_address="127.0.0.1", temp_dir=temp_dir, include_dashboard=True,
            dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
            dashboard_agent_listen_port=agent_port))
        break
    except Exception as exc:
        print("head node attempt", attempt, "failed:", exc, file=sys.stderr, flush=True)
        kill_attempt(temp_dir)
else:
    raise SystemExit("head node did not start")
# As `ray start --head --temp-dir` does on a head node: record the cluster's address in the head's
# temp dir. Ray's job supervisor resolves the driver's RAY_ADDRESS ("auto") from that file; without
# it, it takes any GCS process it finds on the machine, which on this box may be another test's
# Ray, and the job's driver then runs on the wrong cluster (Cluster writes the file to /tmp/ray only).
write_ray_address(cluster.address, temp_dir)
for attempt in range(4):
    try:
        # Its own temp dir, as on a real machine: nodes sharing one would unpack the job's
        # package into the same runtime_resources directory, racing each other.
        cluster.add_node(num_cpus=worker_cpus, node_ip_address="127.0.0.1",
                         temp_dir=os.path.join(temp_root, f"w{attempt}"))
        break
    except Exception as exc:
        print("worker node attempt", attempt, "failed:", exc, file=sys.stderr, flush=True)
else:
    raise SystemExit("worker node did not start")
print("READY", json.dumps({"gcs": cluster.address, "dashboard_port": dashboard_port}), flush=True)
sys.stdin.read()  # until the test closes stdin
cluster.shutdown()
"""


def _stop(proc: subprocess.Popen[str], marker: str) -> None:
    """Shut the helper's cluster down, then kill any process of this cluster left behind.

    Leftovers are found by this cluster's own temp dir in their command line and killed by pid:
    never `ray stop`, which would stop every Ray on the machine.
    """
    with contextlib.suppress(OSError):
        proc.stdin.close()  # type: ignore[union-attr]
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    for _ in range(2):
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_dir.name), signal.SIGKILL)
        time.sleep(1)


def _alive_nodes(dashboard: str) -> int:
    """Alive nodes, from the head's State API over HTTP (no driver: cheap on a loaded box)."""
    try:
        with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?limit=100", timeout=30) as resp:
            nodes = json.load(resp)["data"]["result"]["result"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return sum(1 for node in nodes if node.get("state") == "ALIVE")


@pytest.fixture()
def isolated_cluster() -> Iterator[IsolatedCluster]:
    root = Path(tempfile.mkdtemp(prefix="rjiso", dir="/tmp"))  # short: Ray's socket paths have a length limit
    temp_dir = root / "ray"
    python = _node_env(root)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "RAY_ADDRESS"}
    }
    env.update(
        PATH=os.pathsep.join([str(python.parent), *path]),
        RAY_AUTH_MODE="disabled",  # loopback test cluster only
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # Ray's node-IP lookup returns 127.0.0.1
    )
    probe = subprocess.run(
        [str(python), "-c", "import ray, torch, pyarrow, albumentations; import hrt_ray"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "No module named 'hrt_ray'" in probe.stderr, (
        "the node environment must have the runtime deps but not hrt_ray: " + probe.stderr[-2000:]
    )

    log = root / "cluster.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                str(python),
                "-c",
                CLUSTER_HELPER,
                str(temp_dir),
                "4",
                ",".join(f"{free_port()}:{free_port()}" for _ in range(4)),
            ],
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    try:
        line = ""
        while not line.startswith("READY"):
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line and proc.poll() is not None:
                raise RuntimeError(f"loopback cluster did not come up: {log.read_text()[-3000:]}")
        ready = json.loads(line.split(" ", 1)[1])
        dashboard = f"http://127.0.0.1:{ready['dashboard_port']}"
        cluster = IsolatedCluster(root, python, dashboard, ready["gcs"], env)
        assert cluster.gcs.startswith("127.0.0.1:"), cluster.gcs
        deadline = time.monotonic() + 300
        while (
            _alive_nodes(cluster.dashboard) < 2
            or cluster.ray("job", "list", "--address", cluster.dashboard).returncode
        ):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"job server or worker node not up: {log.read_text()[-3000:]}")
            time.sleep(3)
        yield cluster
    finally:
        _stop(proc, str(temp_dir))
        shutil.rmtree(root, ignore_errors=True)


def _submit(cluster: IsolatedCluster, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """`ray job submit`, retried only while the head's job agent is still starting (loaded box)."""
    deadline = time.monotonic() + 240
    while True:
        done = subprocess.run(
            cmd, cwd=cluster.root, env=cluster.env, capture_output=True, text=True, timeout=600
        )
        if "No available agent to submit job" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(5)


#: Runtime-env log lines worth showing when a job failed on the nodes.
SETUP_WORDS = ("Failed", "ERROR", "Downloading")


def _node_evidence(cluster: IsolatedCluster) -> str:
    """What the nodes logged about the job's runtime env, and the helper's failed node starts.

    The agents log each runtime env's set-up (download, failure) per job in
    ``runtime_env_setup-<job>.log``; a node whose start timed out keeps running beside its retry.
    """
    ray_dir = cluster.root / "ray"
    lines = [
        f"[{log.relative_to(ray_dir).parts[0]} {log.name}] {line[:300]}"
        for log in sorted(ray_dir.glob("*/session_2*/logs/runtime_env_*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if any(word in line for word in SETUP_WORDS)
    ]
    helper_log = cluster.root / "cluster.log"
    helper = helper_log.read_text(errors="replace").splitlines() if helper_log.exists() else []
    return "\n".join(lines[-60:] + [f"[helper] {ln[:300]}" for ln in helper if "attempt" in ln][-10:])


@pytest.mark.slow
def test_job_on_isolated_nodes_runs_from_the_uploaded_package(isolated_cluster: IsolatedCluster) -> None:
    cluster = isolated_cluster
    repo = copy_repo(cluster.root / "repo")
    out = cluster.root / "out"
    overrides = [
        "name=job",
        f"storage.path={out}/runs",
        f"data.train_uri={out}/data/train",
        f"data.val_uri={out}/data/val",
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
    # What the job's own Python resolves, and what landed in its working dir, then the default job.
    show = (
        "import os, hrt_ray, hrt_ray.data;"
        "print('HRT_RAY_FILE', hrt_ray.__file__);"
        "print('HRT_RAY_DATA_FILE', hrt_ray.data.__file__);"
        "print('SHIPPED', sorted(os.listdir('.')));"
        "print('DRIVER_RAY_ADDRESS', os.environ.get('RAY_ADDRESS'))"
    )
    script = (
        f"python -c {json.dumps(show)} && python -m hrt_ray train --config jobs/default.yaml "
        + " ".join(f"'{o}'" for o in overrides)
    )
    submit = [
        str(BIN / "ray"), "job", "submit",
        "--address", cluster.dashboard,
        "--working-dir", str(repo),
        "--runtime-env", str(repo / RUNTIME_ENV),
    ]  # fmt: skip
    sid = "hrt-iso-ok"
    ok = _submit(cluster, [*submit, "--submission-id", sid, "--", "bash", "-c", f"{script} --no-eval"])
    logs = cluster.ray("job", "logs", "--address", cluster.dashboard, sid).stdout
    shown = ("HRT_RAY_", "SHIPPED", "DRIVER_")
    lines = dict(line.split(" ", 1) for line in logs.splitlines() if line.startswith(shown))
    # Ray's job supervisor resolves the driver's RAY_ADDRESS from the head's bootstrap file; it
    # must name this cluster's GCS, not another Ray instance on the machine. Checked first: a
    # driver on another instance fails later with a package error that hides the cause.
    assert lines.get("DRIVER_RAY_ADDRESS") == cluster.gcs, (lines, logs[-4000:])
    assert ok.returncode == 0, (
        ok.stdout[-4000:] + ok.stderr[-4000:] + logs[-4000:] + "\nnodes:\n" + _node_evidence(cluster)
    )
    for key in ("HRT_RAY_FILE", "HRT_RAY_DATA_FILE"):
        imported = Path(lines[key])
        assert "runtime_resources" in imported.parts and "working_dir_files" in imported.parts, lines
        assert not imported.is_relative_to(REPO_ROOT)
    shipped = set(json.loads(lines["SHIPPED"].replace("'", '"')))
    assert {"hrt_ray", "jobs", "pyproject.toml"} <= shipped
    assert not shipped & {".env", ".env.local", ".aws", ".venv", ".git", "data", "runs"}, shipped

    summary = json.loads((out / "runs" / "job" / "summary.json").read_text())
    assert summary["iteration"] == 2
    assert summary["checkpoint"].startswith(str(out / "runs" / "job" / "checkpoint_"))
    assert Path(summary["checkpoint"]).is_dir()
    assert isinstance(summary["final_miou"], float) and 0.0 <= summary["final_miou"] <= 1.0
    assert "run            job (2 iterations)" in logs
    assert f"checkpoint     {summary['checkpoint']}" in logs

    # A failing run makes the driver, and so `ray job submit`, exit non-zero with the reason.
    bad = _submit(
        cluster,
        [
            *submit,
            "--",
            "python",
            "-m",
            "hrt_ray",
            "train",
            *overrides,
            "name=bad",
            "data.dataset=ade20k",
            f"data.train_uri={out}/nothing",
            "model.num_classes=5",
            "--no-eval",
        ],  # fmt: skip
    )
    assert bad.returncode != 0
    text = bad.stdout + bad.stderr
    assert "failed" in text.lower() and f"{out}/nothing" in text
