"""Observations taken inside Ray Train's worker processes during a real run (test-only).

Like :mod:`faults`, these are ``WorkerCallback``\\ s that wrap ``hrt_ray.train.loop.train_step`` in
the worker process, so they watch the production loop without any hook in it; unlike faults
they change nothing. A probe rides along on a run that a test makes anyway, which saves a
Ray Train run of its own (about 40 CPU-seconds of Ray Train's processes on the 2-core box).

* :class:`RecordListening` writes, at each worker process's first step (its process group is up
  by then), the rank, pid, rank 0's store address (``MASTER_ADDR``/``MASTER_PORT``) and the
  process's listening sockets, one JSON file per process.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.cloudpickle
from faults import _WrapTrainStep

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class RecordListening(_WrapTrainStep):
    """At its first step each worker process writes ``<out>/<pid>.json`` (see module docstring)."""

    def __init__(self, out: Path) -> None:
        self.out = str(out)
        self._done = False

    def around(
        self, step: Callable[..., Any], iteration: int, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if not self._done:
            self._done = True
            self._record()
        return step(*args, **kwargs)

    def _record(self) -> None:
        import ray.train

        psutil = importlib.import_module("psutil")  # Ray's vendored copy, on sys.path once ray is imported
        ctx = ray.train.get_context()
        conns = psutil.Process().net_connections(kind="inet")
        seen = {
            "rank": ctx.get_world_rank(),
            "world_size": ctx.get_world_size(),
            "pid": os.getpid(),
            "store": [os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])],
            "listening": sorted(
                {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
            ),
        }
        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{os.getpid()}.tmp"
        tmp.write_text(json.dumps(seen))
        tmp.replace(out / f"{os.getpid()}.json")


def recorded(out: Path) -> list[dict[str, Any]]:
    """What :class:`RecordListening` wrote, by pid."""
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
