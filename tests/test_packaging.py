"""The installable artifact: pyproject's dependencies, the three locks, the image, the driver.

A node installs exactly one lock (requirements.txt on CPU machines, requirements-gpu.txt in the
image); `make` installs requirements.txt + requirements-dev.txt. These tests read the files the
way pip and Docker do, so an unpinned package, a dev tool in the image, a CUDA torch on CPU boxes
or a stale driver statement fails here rather than on a cluster.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from repo_copy import DECOYS, copy_repo, package_files

CPU_LOCK = "requirements.txt"
GPU_LOCK = "requirements-gpu.txt"
DEV_LOCK = "requirements-dev.txt"
DOCKERFILE = "clusters/docker/Dockerfile"
DOCKERIGNORE = "clusters/docker/Dockerfile.dockerignore"
CLUSTER_GUIDE = "clusters/README.md"

#: Minimum Linux x86_64 driver for each CUDA toolkit release (GA), from NVIDIA's "CUDA Toolkit and
#: Corresponding Driver Versions" table in the CUDA release notes
#: (https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/). Within a major release, CUDA minor
#: version compatibility lets a newer runtime run on this driver branch. Add the row when the
#: pinned torch moves to a CUDA release missing here.
CUDA_MIN_DRIVER = {
    (12, 0): "525.60.13",
    (12, 1): "530.30.02",
    (12, 2): "535.54.03",
    (12, 3): "545.23.06",
    (12, 4): "550.54.14",
    (12, 5): "555.42.02",
    (12, 6): "560.28.03",
    (12, 8): "570.26",
    (12, 9): "575.51.03",
    (13, 0): "580.65.06",
}

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(?P<version>[^\s;#]+)\s*$")


def read_lock(name: str) -> dict[str, Version]:
    """The pins of a lock; any requirement line that is not `name==version` fails with its text."""
    pins: dict[str, Version] = {}
    for n, line in enumerate((REPO_ROOT / name).read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = PIN.match(text)
        assert match, f"{name}:{n}: not an exact pin: {text!r}"
        pins[canonicalize_name(match["name"])] = Version(match["version"])
    return pins


def lock_command(name: str) -> list[str]:
    """The command in the lock's header, which must be the standard tool writing this very file."""
    header = (REPO_ROOT / name).read_text().splitlines()[:3]
    commands = [
        line.lstrip("# ").strip() for line in header if line.lstrip("# ").startswith("uv pip compile")
    ]
    assert commands, f"{name}: header does not state the `uv pip compile` command that produced it"
    argv = shlex.split(commands[0])
    assert argv[argv.index("-o") + 1] == name, f"{name}: header command writes {argv[argv.index('-o') + 1]}"
    return argv


def project() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def requirements(extras: tuple[str, ...] = ()) -> list[Requirement]:
    """pyproject's dependencies plus the given extras, self-references (`hrt-ray[export]`) expanded."""
    proj = project()
    reqs = [Requirement(r) for r in proj["dependencies"]]
    todo = list(extras)
    seen: set[str] = set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for raw in proj["optional-dependencies"][extra]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == canonicalize_name(proj["name"]):
                todo.extend(req.extras)
            else:
                reqs.append(req)
    return reqs


@pytest.mark.parametrize(
    ("lock", "extras"), [(CPU_LOCK, ()), (GPU_LOCK, ()), (DEV_LOCK, ("dev",))], ids=["cpu", "gpu", "dev"]
)
def test_lock_pins_everything_pyproject_asks_for(lock: str, extras: tuple[str, ...]) -> None:
    argv = lock_command(lock)
    assert argv[:4] == ["uv", "pip", "compile", "pyproject.toml"]
    for extra in extras:
        assert f"--extra={extra}" in argv or ["--extra", extra] in [argv[i : i + 2] for i in range(len(argv))]
    pins = read_lock(lock)
    for req in requirements(extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock}: {req} from pyproject.toml is not locked"
        assert req.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]} vs {req}"
    for needed in ("aiohttp", "grpcio", "pyarrow", "pandas"):  # ray[default,data] closure, not only roots
        assert needed in pins, f"{lock}: incomplete lock, {needed} missing"


def test_cpu_lock_is_cpu_torch_and_agrees_with_the_gpu_and_dev_locks() -> None:
    cpu, gpu, dev = read_lock(CPU_LOCK), read_lock(GPU_LOCK), read_lock(DEV_LOCK)
    # On CPU machines (this box, CI, laptops) the CUDA build of torch is GBs of unused wheels.
    assert cpu["torch"].local == "cpu", f"{CPU_LOCK}: torch=={cpu['torch']} is not the CPU build"
    gpu_only = sorted(n for n in cpu if n.startswith(("nvidia-", "cuda-")) or n == "triton")
    assert not gpu_only, f"{CPU_LOCK} pulls CUDA packages: {gpu_only}"
    # The image runs the same code on the same versions as CPU nodes: only torch's build differs.
    assert gpu["torch"].local is None and gpu["torch"].public == cpu["torch"].public
    differ = {n: (cpu[n], gpu[n]) for n in cpu.keys() & gpu.keys() if n != "torch" and cpu[n] != gpu[n]}
    assert not differ, f"{CPU_LOCK} and {GPU_LOCK} disagree: {differ}"
    missing = sorted(cpu.keys() - gpu.keys() - {"torch"})
    assert not missing, f"{GPU_LOCK} lacks runtime packages of {CPU_LOCK}: {missing}"
    # `make` installs both requirements.txt and requirements-dev.txt: they must not fight.
    assert cpu.keys() <= dev.keys()
    differ = {n: (cpu[n], dev[n]) for n in cpu if cpu[n] != dev[n]}
    assert not differ, f"{CPU_LOCK} and {DEV_LOCK} disagree: {differ}"


def dev_only_packages() -> set[str]:
    dev_only = read_lock(DEV_LOCK).keys() - read_lock(CPU_LOCK).keys()
    assert {"pytest", "pytest-timeout", "moto", "ruff", "onnx", "onnxruntime", "onnxscript"} <= dev_only
    return dev_only


def pip_installs(command: str) -> tuple[list[str], list[str], list[str]] | None:
    """(options, -r files, other arguments) of a `pip install` command line, else None."""
    words = shlex.split(command)
    if "pip" not in words or "install" not in words[words.index("pip") :]:
        return None
    rest = words[words.index("install", words.index("pip")) + 1 :]
    options, files, args = [], [], []
    i = 0
    while i < len(rest):
        if rest[i] in {"-r", "--requirement"}:
            files.append(rest[i + 1])
            i += 2
            continue
        (options if rest[i].startswith("-") else args).append(rest[i])
        i += 1
    return options, files, args


def makefile_commands() -> list[str]:
    """The Makefile's logical lines as make reads them: continuations joined, comments dropped."""
    text = (REPO_ROOT / "Makefile").read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def test_makefile_installs_both_locks_then_the_project_without_deps() -> None:
    installs = [p for line in makefile_commands() if (p := pip_installs(line))]
    assert sorted(f for _, files, _ in installs for f in files) == sorted([CPU_LOCK, DEV_LOCK]), installs
    project_installs = [(opts, args) for opts, _, args in installs if "." in args]
    assert project_installs, "the Makefile never installs the project"
    for opts, args in (i[::2] for i in installs):
        assert set(args) <= {".", "pip"}, f"Makefile installs unpinned {args}"
        if "." in args:
            assert "--no-deps" in opts, "the project must not resolve its own (unpinned) dependencies"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (REPO_ROOT / DOCKERFILE).read_text().splitlines():
        if line.strip().startswith("#") and not pending:
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            op, _, args = pending.strip().partition(" ")
            out.append((op.upper(), args.strip()))
        pending = ""
    return out


def test_dockerfile_installs_the_gpu_runtime_lock_on_the_matching_ray_image() -> None:
    steps = dockerfile_instructions()
    base = [args for op, args in steps if op == "FROM"]
    assert len(base) == 1, base
    gpu = read_lock(GPU_LOCK)
    argv = lock_command(GPU_LOCK)
    python = argv[argv.index("--python-version") + 1]
    assert argv[argv.index("--python-platform") + 1].startswith("x86_64-manylinux")
    # Ray's image must run the same Ray and Python as the lock the image installs.
    assert base[0] == f"rayproject/ray:{gpu['ray']}-py{python.replace('.', '')}-gpu", base[0]
    assert Version(python) in Requirement(f"x{project()['requires-python']}").specifier

    copied: set[str] = set()
    installed_locks: list[str] = []
    for op, args in steps:
        if op == "COPY":
            copied.update(a for a in shlex.split(args)[:-1] if not a.startswith("--"))
        if op != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            parsed = pip_installs(command)
            if parsed is None:
                continue
            options, files, others = parsed
            for lock in files:
                assert lock in copied, f"{DOCKERFILE}: installs {lock} before copying it"
            installed_locks.extend(files)
            # Besides the lock, only the project itself, as a copy, resolving nothing unpinned.
            assert set(others) <= {"."}, f"{DOCKERFILE}: pip installs {others}"
            if others:
                assert "--no-deps" in options, f"{DOCKERFILE}: `pip install .` must use --no-deps"
                assert not {"-e", "--editable"} & set(options), f"{DOCKERFILE}: the image installs -e"
    assert installed_locks == [GPU_LOCK], installed_locks
    leaked = sorted(gpu.keys() & dev_only_packages())
    assert not leaked, f"{GPU_LOCK} (the image) carries test/lint/export tools: {leaked}"
    assert "nvidia-cuda-runtime" in gpu and gpu["torch"].local is None


def test_docker_build_context_has_the_code_and_no_credentials(tmp_path: Path) -> None:
    """The build context BuildKit sends, computed with docker-py's .dockerignore implementation."""
    from docker.utils.build import exclude_paths

    lines = (REPO_ROOT / DOCKERIGNORE).read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.strip().startswith("#")]
    repo = copy_repo(tmp_path / "repo")
    context = exclude_paths(str(repo), patterns, dockerfile=DOCKERFILE)
    missing = sorted(package_files() - context)
    assert not missing, f"{DOCKERIGNORE} drops package files from the image: {missing}"
    assert {"pyproject.toml", GPU_LOCK, "jobs/default.yaml"} <= context
    leaked = sorted(rel for rel in DECOYS if rel in context)
    assert not leaked, f"{DOCKERIGNORE} lets these into the image: {leaked}"


def test_stated_driver_minimum_matches_the_pinned_cuda_runtime() -> None:
    """clusters/README.md states the driver that the CUDA runtime of the pinned torch needs."""
    gpu = read_lock(GPU_LOCK)
    cudart = gpu["nvidia-cuda-runtime"]
    cuda = (cudart.major, cudart.minor)
    assert cuda in CUDA_MIN_DRIVER, (
        f"{GPU_LOCK} pins nvidia-cuda-runtime=={cudart} (CUDA {cuda[0]}.{cuda[1]}); add its row from "
        "NVIDIA's CUDA toolkit/driver table to CUDA_MIN_DRIVER"
    )
    required = Version(CUDA_MIN_DRIVER[cuda])
    stated = re.findall(
        r"^Minimum NVIDIA driver: (\d+(?:\.\d+)*)\s*$", (REPO_ROOT / CLUSTER_GUIDE).read_text(), re.M
    )
    assert stated, f"{CLUSTER_GUIDE} has no line 'Minimum NVIDIA driver: <version>'"
    assert len(set(stated)) == 1, f"{CLUSTER_GUIDE} states different minimum drivers: {stated}"
    minimum = Version(stated[0])
    # The stated branch is the one CUDA {major}.x needs: not older (would not run) and not newer
    # (would rule out the long-term-support branch that does run it).
    assert minimum.major == required.major, (
        f"{CLUSTER_GUIDE}: driver {minimum}, CUDA {cudart} needs {CUDA_MIN_DRIVER[cuda]}"
    )
    if len(minimum.release) > 1:
        assert minimum >= required, (
            f"{CLUSTER_GUIDE}: driver {minimum} < {CUDA_MIN_DRIVER[cuda]} for CUDA {cudart}"
        )
