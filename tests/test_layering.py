"""The package's import graph follows the README's arrow: config -> data -> model -> train/eval -> report.

Every ``import`` of a package module is read from the source (module level and inside functions
alike: a deferred import is still a dependency), and the graph must have

- no cycle between modules;
- no import from a lower layer to a higher one (table below);
- no library module importing a command-line module (only the ``hrt-ray`` dispatcher loads them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hrt_ray"

#: Layers from the ground up; a module may import its own layer (without a cycle) and below.
#: The longest matching prefix decides a module's layer.
LAYERS: list[tuple[str, ...]] = [
    ("hrt_ray.__init__", "hrt_ray.config", "hrt_ray.storage", "hrt_ray.ray_local"),
    ("hrt_ray.data",),
    ("hrt_ray.models",),
    # Evaluation pieces that training's validation shares: metrics, inference, precision.
    ("hrt_ray.eval.metrics", "hrt_ray.eval.inference", "hrt_ray.eval.confusion", "hrt_ray.eval.precision"),
    ("hrt_ray.train",),
    # Running an evaluation builds on the training driver (a TorchTrainer of eval workers).
    ("hrt_ray.eval",),
    # Products and reports: batch inference, pictures, export, sweeps.
    ("hrt_ray.infer", "hrt_ray.tune"),
    ("hrt_ray.bench",),
]


def _is_cli(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last in {"cli", "__main__"} or last.endswith("_cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that ``module`` imports, wherever in the file the import stands."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            # The deepest package module the name refers to (``from x import y``: y may be a module).
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _layer(module: str) -> int:
    if module == "hrt_ray":
        module = "hrt_ray.__init__"
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


GRAPH = {m: _imports(m, p, set(_modules())) for m, p in _modules().items()}


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in GRAPH if not _is_cli(m) and _layer(m) < 0]
    assert not unplaced, f"modules outside the layer table: {unplaced}"


def test_no_import_runs_up_the_layers() -> None:
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in GRAPH.items()
        if not _is_cli(m)
        for d in deps
        if not _is_cli(d) and _layer(d) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_library_module_imports_a_command_line_module() -> None:
    offenders = [
        f"{m} imports {d}" for m, deps in GRAPH.items() if not _is_cli(m) for d in deps if _is_cli(d)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_import_graph_has_no_cycle() -> None:
    # Tarjan's strongly connected components; any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", ["hrt_ray.train.loop", "hrt_ray.config"])
def test_the_graph_is_read(module: str) -> None:
    """The walk sees imports (so an empty graph cannot pass the tests above)."""
    assert GRAPH[module] or module == "hrt_ray.config"
    assert "hrt_ray.config" in GRAPH["hrt_ray.train.loop"]


#: What a deferred import must say on the line above it.
DEFERRED = "# deferred:"


def _in_function_imports(path: Path) -> list[tuple[int, str, str]]:
    """``(line, module, comment)`` of every import statement inside a function (nested ones once).

    ``comment`` is the line above the import, or above the group of import statements it belongs
    to (one ``# deferred:`` line may stand over imports that share the reason, sorted into
    sections by blank lines).
    """
    text = path.read_text()
    lines = text.splitlines()
    found: dict[int, tuple[int, str]] = {}
    for fn in ast.walk(ast.parse(text, str(path))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                found[node.lineno] = (node.end_lineno or node.lineno, ", ".join(a.name for a in node.names))
            elif isinstance(node, ast.ImportFrom):
                found[node.lineno] = (node.end_lineno or node.lineno, "." * node.level + (node.module or ""))
    covered = {i for start, (end, _) in found.items() for i in range(start, end + 1)}
    out = []
    for start, (_, module) in sorted(found.items()):
        above = start - 1  # up through the imports of the group (and the blank lines between them)
        while above in covered or (not lines[above - 1].strip() and above - 1 in covered):
            above -= 1
        out.append((start, module, lines[above - 1].strip() if above >= 1 else ""))
    return out


def test_imports_stand_at_module_top_unless_deferred_with_a_reason() -> None:
    """An import inside a function hides a dependency and a cycle; only start-up time excuses it.

    The CLI answers ``--help`` and config mistakes before torch or Ray load, so the command modules
    defer those imports; each says why on the line above (``# deferred: <reason>``).
    """
    undeclared = [
        f"{path.relative_to(PACKAGE.parent)}:{lineno} {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for lineno, module, comment in _in_function_imports(path)
        if not (comment.startswith(DEFERRED) and comment[len(DEFERRED) :].strip())
    ]
    assert not undeclared, (
        f"{len(undeclared)} in-function imports without a '{DEFERRED} <reason>' line above them "
        "(move them to the module top):\n" + "\n".join(undeclared)
    )


def test_the_deferred_import_check_sees_function_imports(tmp_path: Path) -> None:
    """The walk finds imports in methods and nested functions (so an empty walk cannot pass)."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\n\nclass A:\n    def f(self):\n        import json\n\n"
        "        def g():\n            # deferred: why\n            from . import x\n"
        "            from a import (\n                b,\n            )\n\n"
        "            import c\n            g()\n\n            import d\n        return g\n"
    )
    assert _in_function_imports(sample) == [
        (5, "json", "def f(self):"),
        (9, ".", "# deferred: why"),
        (10, "a", "# deferred: why"),
        (14, "c", "# deferred: why"),
        (17, "d", ""),
    ]


#: Heavy stacks that only the processes that compute need: training workers, map tasks.
HEAVY = ("torch", "albumentations", "scipy")


def test_what_a_dataset_plan_holds_loads_without_torch() -> None:
    """Processes that only hold a dataset's plan (Ray Train's dataset manager, each split
    coordinator) or the pipeline's state actor unpickle its functions by reference, i.e. import
    their modules. Those must not pull in torch or albumentations (seconds of CPU per process and
    run); neither may the training loop, which needs torch but not the augmentation stack."""
    probe = (
        "import sys, pickle, ray.cloudpickle as cp\n"
        "from hrt_ray.data import map_tasks, pipeline_state\n"
        "held = (map_tasks.train_udf, map_tasks.val_udf, pipeline_state.PipelineState)\n"
        "blobs = [cp.dumps(f) for f in held]\n"
        "for m in [m for m in sys.modules if m.startswith('hrt_ray')]: del sys.modules[m]\n"
        "[pickle.loads(b) for b in blobs]\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
        "import hrt_ray.train.loop\n"
        "print([m for m in ('albumentations', 'scipy') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plan_holder, train_worker = out.stdout.strip().splitlines()
    assert plan_holder == "[]", f"unpickling the plan's functions imported {plan_holder}"
    assert train_worker == "[]", f"the training loop imported {train_worker}"
