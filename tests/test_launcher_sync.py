"""What `ray up clusters/<cloud>.yaml` puts on a node, rehearsed on this machine with Ray's own code.

Ray's ``NodeUpdater`` syncs the YAML's ``file_mounts`` and runs its commands through its
``SSHCommandRunner``, which builds the real ``rsync`` and ``ssh`` command lines (``--exclude`` per
``rsync_exclude``, ``--filter "dir-merge,- F"`` per ``rsync_filter``, ``bash --login -c -i`` around
each command). Here the runner's process runner, an injection point Ray itself provides, stands in
for the network only: an ``rsync`` to ``ubuntu@node:~/x`` becomes a local rsync into an empty
"node" home with the very arguments Ray built, and an ``ssh`` command runs the remote command line
in that home, as sshd would hand it to the login shell. Nothing else is rewritten.

The node's Python stands in for the project image (clusters/docker/Dockerfile): a fresh venv that
sees the runtime dependencies through a ``.pth`` path line to this venv's site-packages. A path line
does not process the ``.pth`` files in that directory, so the development checkout's editable
install is *not* active there; ``hrt_ray`` can only come from what the sync delivered and the
YAML's setup commands installed. Every module must then import from the node's copy, the CLI
must answer ``--help`` and ``config show`` for every job file, and every sweep file must load,
all from the node's copy of jobs/.

Needs the system ``rsync`` (``apt-get install rsync``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]
NODE_HOST = "node.invalid"  # RFC 2606: never resolves; no command here ever reaches a network
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"


class NodeShell:
    """Process runner for Ray's command runner: executes on this machine what Ray sends a node.

    ``rsync ... --rsh "ssh ..." SRC ubuntu@node.invalid:~/dst`` runs as ``rsync ... SRC
    <home>/dst`` (transport dropped, every other argument Ray built kept); ``ssh ... ubuntu@node.invalid
    CMD...`` runs ``CMD...`` joined by spaces under ``/bin/sh -c`` in ``<home>``, which is what sshd
    does with a remote command.
    """

    DEVNULL = subprocess.DEVNULL
    PIPE = subprocess.PIPE
    STDOUT = subprocess.STDOUT

    def __init__(self, home: Path, source_dir: Path) -> None:
        self.home = home
        self.source_dir = source_dir
        self.rsync_commands: list[list[str]] = []
        self.remote_commands: list[str] = []

    def _node_path(self, remote: str) -> str:
        user_host, _, path = remote.partition(":")
        assert user_host.endswith("@" + NODE_HOST), remote
        return str(self.home) + path[1:] if path.startswith("~") else path

    def _run(self, cmd: list[str]) -> bytes:
        if cmd[0] == "rsync":
            self.rsync_commands.append(list(cmd))
            args = list(cmd)
            rsh = args.index("--rsh")
            del args[rsh : rsh + 2]
            args[-1] = self._node_path(args[-1])
            proc = subprocess.run(args, cwd=self.source_dir, capture_output=True, timeout=120)
        elif cmd[0] == "ssh":
            target = next(i for i, a in enumerate(cmd) if a.endswith("@" + NODE_HOST))
            remote = " ".join(cmd[target + 1 :])
            self.remote_commands.append(remote)
            env = {"HOME": str(self.home), "PATH": BASE_PATH, "USER": "ubuntu", "LANG": "C.UTF-8"}
            proc = subprocess.run(
                ["/bin/sh", "-c", remote], cwd=self.home, env=env, capture_output=True, timeout=600
            )
        else:
            raise AssertionError(f"Ray asked to run something other than rsync/ssh: {cmd}")
        if proc.returncode != 0:
            raise AssertionError(
                f"node command failed ({proc.returncode}): {cmd}\n"
                f"stdout:\n{proc.stdout.decode(errors='replace')}\n"
                f"stderr:\n{proc.stderr.decode(errors='replace')}"
            )
        return proc.stdout

    def check_call(self, cmd: list[str], **_: Any) -> int:
        self._run(cmd)
        return 0

    def check_output(self, cmd: list[str], **_: Any) -> bytes:
        return self._run(cmd)


def load_cluster(name: str) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load((REPO / "clusters" / name).read_text()))
    validate_config(cfg)
    return cfg


def node_updater(cfg: dict[str, Any], node_type: str, shell: NodeShell):
    """Ray's own NodeUpdater for one node of ``node_type``, as the launcher builds it.

    ``docker_config`` is left out: Ray's DockerCommandRunner hands file mounts to the same
    SSHCommandRunner.run_rsync_up with the same options and mounts the result into the container,
    so the synced tree is identical; the container itself is what the scratch venv stands in for.
    """
    from ray.autoscaler._private.updater import NodeUpdater
    from ray.autoscaler.node_provider import NodeProvider

    class OneNode(NodeProvider):
        def external_ip(self, node_id: str) -> str:
            return NODE_HOST

        def internal_ip(self, node_id: str) -> str:
            return NODE_HOST

    provider = OneNode(cfg["provider"], cfg["cluster_name"])
    is_head = node_type == cfg["head_node_type"]
    return NodeUpdater(
        node_id="node-1",
        provider_config=cfg["provider"],
        provider=provider,
        auth_config=cfg["auth"],
        cluster_name=cfg["cluster_name"],
        file_mounts=cfg["file_mounts"],
        initialization_commands=cfg["available_node_types"][node_type].get(
            "initialization_commands", cfg["initialization_commands"]
        ),
        # What Ray runs: prepare_config has merged setup_commands into these two lists.
        setup_commands=cfg["head_setup_commands"] if is_head else cfg["worker_setup_commands"],
        ray_start_commands=[],
        runtime_hash="",
        file_mounts_contents_hash="",
        is_head_node=is_head,
        rsync_options={"rsync_exclude": cfg.get("rsync_exclude"), "rsync_filter": cfg.get("rsync_filter")},
        process_runner=shell,
        docker_config=None,
    )


@pytest.fixture(scope="module")
def image_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv standing in for the project image's Python: dependencies yes, hrt_ray no."""
    venv = tmp_path_factory.mktemp("image") / "venv"
    # No pip of its own: pip and the build backend (setuptools) come with the dependencies, as
    # in the image, where the setup command's --no-build-isolation uses the image's setuptools.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]
    Path(purelib, "_image_runtime_deps.pth").write_text(deps + "\n")
    probe = subprocess.run(
        [str(py), "-c", "import ray, torch, hrt_ray"], capture_output=True, text=True, cwd=venv.parent,
        env={"PATH": BASE_PATH, "HOME": str(venv.parent)},
    )
    assert "No module named 'hrt_ray'" in probe.stderr, "the image stand-in must not see hrt_ray yet"
    return venv


def source_modules() -> list[str]:
    """Every module of the package as the checkout has it (tracked files only)."""
    files = subprocess.run(
        ["git", "ls-files", "hrt_ray"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split()
    modules = []
    for f in files:
        if not f.endswith(".py"):
            continue
        parts = Path(f).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        elif parts[-1] == "__main__":
            continue
        modules.append(".".join(parts))
    return sorted(modules)


def job_files() -> list[str]:
    """The job configs under jobs/ (the runtime env is not one; sweeps are checked apart)."""
    return sorted(p.name for p in (REPO / "jobs").glob("*.yaml") if p.name != "runtime_env.yaml")


def sweep_files() -> list[str]:
    """The Tune sweep files under jobs/ablations/ (`hrt-ray tune --config`)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "jobs" / "ablations").glob("*.yaml"))


LOAD_SWEEPS = """
import sys
from hrt_ray.tune.config import load_sweep
for path in sys.argv[1:]:
    load_sweep(path)
print(len(sys.argv) - 1)
"""


IMPORT_ALL = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    out[name] = importlib.import_module(name).__file__
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launched_node_runs_the_synced_project(
    name: str, image_python: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert shutil.which("rsync"), "this rehearsal needs the real rsync (apt-get install rsync)"
    # The user's machine: run from the repository root (file_mounts "." is relative to it), with
    # the cluster token that file_mounts also syncs.
    laptop_home = tmp_path / "laptop"
    (laptop_home / ".hrt-ray-auth").mkdir(parents=True)
    (laptop_home / ".hrt-ray-auth" / "auth_token").write_text("0" * 64 + "\n")
    monkeypatch.setenv("HOME", str(laptop_home))
    monkeypatch.chdir(REPO)
    # The node: an empty home whose ~/.bashrc puts the image's Python first, as the image does.
    home = tmp_path / "node" / "home" / "ubuntu"
    home.mkdir(parents=True)
    (home / ".bashrc").write_text(f'export PATH="{image_python / "bin"}:$PATH"\n')
    shell = NodeShell(home, REPO)

    cfg = load_cluster(name)
    updater = node_updater(cfg, "gpu1_spot", shell)
    updater.sync_file_mounts(updater.rsync_up)

    # Ray built the rsync command lines; the YAML's excludes and filters reached them.
    project_sync = next(c for c in shell.rsync_commands if c[-1].endswith(":~/hrt-ray/"))
    pairs = set(zip(project_sync, project_sync[1:], strict=False))
    for pattern in cfg["rsync_exclude"]:
        assert ("--exclude", pattern) in pairs, pattern
    for merge_file in cfg["rsync_filter"]:
        assert ("--filter", f"dir-merge,- {merge_file}") in pairs, merge_file
    node_project = home / "hrt-ray"
    tracked = subprocess.run(
        ["git", "ls-files", "hrt_ray", "jobs", "pyproject.toml", "README.md"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split()
    missing = [f for f in tracked if not (node_project / f).is_file()]
    assert not missing, f"{name}: the sync left out {missing[:10]} ({len(missing)} files)"
    for heavy in (".git", ".venv", "runs", "data"):
        assert not (node_project / heavy).exists(), f"{name}: {heavy} was synced"
    assert not list(node_project.rglob("__pycache__")), f"{name}: __pycache__ was synced"
    assert (home / ".hrt-ray-auth" / "auth_token").is_file()

    # The YAML's setup commands, through Ray's command runner, offline.
    for cmd in updater.setup_commands:
        updater.cmd_runner.run(cmd, run_env="auto")

    # From anywhere on the node, with nothing of this checkout on the path.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"HOME": str(home), "PATH": f"{image_python / 'bin'}:{BASE_PATH}", "LANG": "C.UTF-8"}
    py = str(image_python / "bin" / "python")

    def node_run(*args: str) -> str:
        proc = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{name}: {args} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    modules = source_modules()
    assert "hrt_ray.data" in modules
    files = json.loads(node_run(py, "-c", IMPORT_ALL, *modules).strip().splitlines()[-1])
    outside = {m: f for m, f in files.items() if not Path(f).resolve().is_relative_to(node_project.resolve())}
    assert not outside, f"{name}: imported from outside the synced tree: {outside}"

    assert "train" in node_run(str(image_python / "bin" / "hrt-ray"), "--help")
    for job in job_files():
        node_job = str(node_project / "jobs" / job)
        shown = yaml.safe_load(node_run(py, "-m", "hrt_ray", "config", "show", node_job))
        assert shown["name"], job
    sweeps = [str(node_project / f) for f in sweep_files()]
    assert sweeps and node_run(py, "-c", LOAD_SWEEPS, *sweeps).split()[-1] == str(len(sweeps))


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
@pytest.mark.parametrize(("driver", "ok"), [("570.172.08", False), ("580.105.08", True), (None, False)])
def test_gpu_nodes_refuse_a_driver_older_than_the_pinned_torch_needs(
    name: str, driver: str | None, ok: bool, tmp_path: Path
) -> None:
    """The GPU node types' boot check, run through Ray's command runner against a stand-in
    ``nvidia-smi`` that reports ``driver`` (None: no driver at all)."""
    cfg = load_cluster(name)
    home = tmp_path / "home"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(parents=True)
    home.mkdir()
    if driver is not None:
        smi = fake_bin / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho {driver}\necho {driver}\n")
        smi.chmod(0o755)
    (home / ".bashrc").write_text(f'export PATH="{fake_bin}:$PATH"\n')
    shell = NodeShell(home, REPO)
    gpu_types = [t for t, v in cfg["available_node_types"].items() if v["resources"].get("GPU")]
    assert len(gpu_types) == 4
    for node_type in gpu_types:
        updater = node_updater(cfg, node_type, shell)
        checks = [c for c in updater.initialization_commands if "nvidia-smi" in c]
        assert len(checks) == 1, f"{name}:{node_type} has no driver check"
        if ok:
            updater.cmd_runner.run(checks[0], run_env="host")
        else:
            with pytest.raises(AssertionError, match="older than 580"):
                updater.cmd_runner.run(checks[0], run_env="host")
    head = node_updater(cfg, cfg["head_node_type"], shell)
    assert not any("nvidia-smi" in c for c in head.initialization_commands), "the head has no GPU"
