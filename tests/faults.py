"""Faults injected into Ray Train's workers from outside the production code (test-only).

Ray Train V2 pickles every ``WorkerCallback`` of ``RunConfig(callbacks=...)`` to each worker
actor and calls its ``after_init_train_context`` in the worker process, after the train context
is set and before the training function starts (``ray/train/v2/_internal/execution/worker_group/
worker.py``). There these callbacks wrap :func:`hrt_ray.train.loop.train_step`, which the loop
looks up through its module globals at every call, so the fault hits the real loop:

* :class:`CrashAt` ends the last rank's process (``os._exit(17)``, as a lost worker would) just
  before it runs iteration ``k``, once per marker file: a restarted group runs on.

(A non-finite loss needs no injection: a huge learning rate produces one, see test_fail_fast.py.)

The iteration about to run is ``scheduler.last_epoch + 1``, as the step itself counts it, so a
fault lands on the same iteration after a resume. The workers import ``hrt_ray`` but not this
directory, so this module is pickled by value.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.cloudpickle
from ray.train.v2._internal.execution.callback import WorkerCallback

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _iteration_of(step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The iteration a ``train_step`` call is about to run."""
    scheduler = inspect.signature(step).bind(*args, **kwargs).arguments["scheduler"]
    return int(scheduler.last_epoch) + 1


class _WrapTrainStep(WorkerCallback):
    """Replaces ``hrt_ray.train.loop.train_step`` in the worker process; restores it on shutdown.

    Subclasses define ``around(step, iteration, args, kwargs)``, which runs instead of each step.
    """

    def after_init_train_context(self) -> None:
        from hrt_ray.train import loop

        self._original = loop.train_step
        original = self._original

        # wraps: the signature stays the real step's, so another wrapper (callbacks stack, in
        # list order) still finds the ``scheduler`` argument.
        @functools.wraps(original)
        def train_step(*args: Any, **kwargs: Any) -> Any:
            return self.around(original, _iteration_of(original, args, kwargs), args, kwargs)

        loop.train_step = train_step

    def before_worker_shutdown(self) -> None:
        from hrt_ray.train import loop

        if getattr(self, "_original", None) is not None:
            loop.train_step = self._original


class CrashAt(_WrapTrainStep):
    """The last rank's process exits before iteration ``iteration``, the first time only.

    With ``once_stored=(run_dir, k)`` it first waits (up to ``STORED_WAIT_S``) until checkpoint
    ``k`` is complete in the local ``run_dir``: rank 0 uploads checkpoints in the background, and
    on a loaded box an unwaited crash lands before that upload ends, which a test that needs
    the checkpoint on storage would take for a product failure.
    """

    STORED_WAIT_S = 180.0

    def __init__(self, iteration: int, marker: Path, once_stored: tuple[Path, int] | None = None) -> None:
        self.iteration = iteration
        self.marker = str(marker)
        self.once_stored = (str(once_stored[0]), once_stored[1]) if once_stored else None

    def around(
        self, step: Callable[..., Any], iteration: int, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        import ray.train

        ctx = ray.train.get_context()
        last_rank = ctx.get_world_rank() == ctx.get_world_size() - 1
        marker = Path(self.marker)
        if iteration == self.iteration and last_rank and not marker.exists():
            if self.once_stored:
                _wait_until_stored(*self.once_stored, timeout=self.STORED_WAIT_S)
            marker.write_text(f"crashed at iteration {iteration}\n")
            os._exit(17)
        return step(*args, **kwargs)


def _wait_until_stored(run_dir: str, iteration: int, timeout: float) -> None:
    """Poll ``run_dir`` until a complete checkpoint of ``iteration`` lies there, or ``timeout``."""
    import pyarrow.fs as pafs

    from hrt_ray.train.state import complete_checkpoints

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c.iteration == iteration for c in complete_checkpoints(pafs.LocalFileSystem(), run_dir)):
            return
        time.sleep(0.05)
