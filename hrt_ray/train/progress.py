"""Training progress on the driver: one line per report, or a live bar on a terminal.

Ray Train calls a ``UserCallback`` on its controller actor, which Ray places on the driver's
node (``label_selector`` on the driver's node id in Ray 2.60). :class:`ReportRelay` appends
rank 0's metrics of each report to a JSON-lines file there; :class:`Progress`, a thread in the
driver, tails that file and prints. The driver's console thus shows our lines, not Ray's
``TrainingReport(...)`` dumps (those stay in the run's logs), and works the same under
``ray job submit``, where the controller's stdout would only reach the job log.

The relay also writes the controller's restarts (a lost worker or node, a preemption, an
elastic resize) as event lines, with the failure budget each one is charged to: Ray logs these
decisions on the controller actor only, so a quiet console would otherwise show a run that
stalls and later jumps back to an older iteration without saying why.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from ray.train import ControllerError, UserCallback, WorkerGroupError
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.failure_handling.default import _is_preemption_failure
from tqdm import tqdm

from hrt_ray.train.failures import describe
from hrt_ray.train.meter import finite_numbers

#: Seconds between looks at the relay file.
POLL_S = 0.5


def failure_source(error: BaseException) -> str:
    """The failure budget Ray Train charges ``error`` to, by its ``DefaultFailurePolicy``'s own
    test: a preemption (a ``PreemptionError``, or a worker group whose dead actor was
    preempted), a worker group failure, or a controller error (a group that could not start)."""
    if _is_preemption_failure(error):
        return "preemption"
    if isinstance(error, WorkerGroupError):
        return "worker group"
    if isinstance(error, ControllerError):
        return "controller"
    return type(error).__name__


class _Relay:
    """Appends one JSON line per event to the relay file the driver's :class:`Progress` tails."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class ReportRelay(_Relay, UserCallback):
    """Controller side: one JSON line per report (rank 0's finite numeric metrics)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        row: dict[str, Any] = finite_numbers(metrics[0] if metrics else {})
        row["checkpoint"] = checkpoint is not None
        self._write(row)


class RestartRelay(_Relay, ControllerCallback):
    """Controller side: one ``{"event": ...}`` line per restart, preemption notice or resize.

    A separate class from :class:`ReportRelay`: Ray Train hands a ``UserCallback`` only the
    user hooks, never the controller's state updates. ``max_failures`` and
    ``max_preemption_failures`` are the run's ``FailureConfig`` limits (-1: no limit), shown
    beside each restart's count.
    """

    def __init__(self, path: str, max_failures: int = 0, max_preemption_failures: int = -1) -> None:
        super().__init__(path)
        self.limits = {"worker group": max_failures, "preemption": max_preemption_failures}
        self.counts: dict[str, int] = {}
        self.workers: int | None = None
        self.notice: tuple[Any, ...] | None = None  # the preemption last written (one line each)

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        kind = type(current_state).__name__
        if kind in ("RestartingState", "ReschedulingState"):
            error = current_state.training_failed_error
            source = failure_source(error)
            self.counts[source] = self.counts.get(source, 0) + 1
            row: dict[str, Any] = {"event": "restart", "source": source, "count": self.counts[source]}
            if source in self.limits:
                row["limit"] = self.limits[source]
            row["detail"] = describe(error)
            self._write(row)
            self.notice = None
        elif kind == "PreemptingState":
            # The controller re-enters this state at every poll until the deadline: one line per
            # notice, again only when more ranks or nodes are affected.
            info = current_state.preemption_info
            ranks = sorted(r for rs in info.preempted_node_to_ranks.values() for r in rs)
            nodes = sorted(info.preempted_node_ids)
            if (ranks, nodes) == self.notice:
                return
            self.notice = (ranks, nodes)
            row = {"event": "preempting", "ranks": ranks, "nodes": [n[:8] for n in nodes]}
            if info.deadline_ms is not None:
                row["deadline_in_s"] = round(info.deadline_ms / 1000 - time.time(), 1)
            self._write(row)
        elif kind in ("SchedulingState", "ResizingState"):
            # The worker count of each (re)start; an elastic run that comes back smaller says so.
            workers = getattr(current_state.scaling_decision, "num_workers", None)
            if workers is not None and self.workers is not None and workers != self.workers:
                self._write({"event": "resize", "from": self.workers, "workers": workers})
            self.workers = workers if workers is not None else self.workers


def relay_callbacks(path: str, max_failures: int = 0, max_preemption_failures: int = -1) -> list[Any]:
    """The ``RunConfig`` callbacks that feed :class:`Progress` through the file at ``path``."""
    return [ReportRelay(path), RestartRelay(path, max_failures, max_preemption_failures)]


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Driver side: prints each relayed report; a tqdm bar instead when ``stream`` is a terminal."""

    def __init__(
        self, relay_path: str, max_iters: int, metric: str = "val/mIoU", stream: TextIO | None = None
    ) -> None:
        self.path = Path(relay_path)
        self.max_iters = max_iters
        self.metric = metric
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.last_checkpoint_iteration: int | None = None
        self.iteration: int | None = None
        self._first: tuple[int, float] | None = None  # (iteration, time) of the first training report
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hrt-progress", daemon=True)
        self._bar: Any = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Progress:
        self.path.touch()
        self.started = time.monotonic()
        if self.tty:
            self._bar = tqdm(total=self.max_iters, file=self.stream, unit="it", dynamic_ncols=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()  # the reports written while the thread stopped
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    # -- reading and printing ----------------------------------------------------------------

    def poll(self) -> None:
        try:
            with self.path.open() as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind("\n")
        if end < 0:
            return
        self._offset += len(chunk[: end + 1].encode())
        for line in chunk[: end + 1].splitlines():
            if line.strip():
                self.show(json.loads(line))

    def event_line(self, row: dict[str, Any]) -> str:
        """``restart 1/2 after a worker group failure: rank 1: ActorDiedError: ...; restarting ...``."""
        kind = row["event"]
        if kind == "restart":
            limit = row.get("limit")
            budget = f"{row['count']} (no limit)" if limit is None or limit < 0 else f"{row['count']}/{limit}"
            where = (
                f"from the checkpoint of iteration {self.last_checkpoint_iteration}"
                if self.last_checkpoint_iteration is not None
                else "from the start (no checkpoint yet)"
            )
            return (
                f"restart {budget} after a {row['source']} failure: {row.get('detail', '')}; "
                f"restarting the worker group {where}"
            )
        if kind == "preempting":
            deadline = f", deadline in {row['deadline_in_s']:.0f} s" if "deadline_in_s" in row else ""
            return (
                f"preemption notice for rank(s) {row.get('ranks')} on node(s) {row.get('nodes')}{deadline}: "
                "checkpointing at the next iteration"
            )
        if kind == "resize":
            return f"worker group resized: {row.get('from')} -> {row.get('workers')} worker(s)"
        return f"{kind}: {row}"

    def show(self, row: dict[str, Any]) -> None:
        if "event" in row:
            line = self.event_line(row)
            if self._bar is not None:
                self._bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)
            return
        iteration = int(row.get("iteration", 0))
        self.iteration = iteration
        if row.get("checkpoint"):
            self.last_checkpoint_iteration = iteration
        now = time.monotonic()
        line = self.format(row, now)
        if "train/loss" in row and self._first is None:
            self._first = (iteration, now)  # the wall-clock rate is measured from here on
        if self._bar is not None:
            self._bar.n = iteration
            self._bar.set_postfix_str(line.split("  ", 1)[1] if "  " in line else "", refresh=False)
            self._bar.refresh()
            if "val/mIoU" in row:
                self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def eta(self, row: dict[str, Any], now: float) -> float | None:
        """Remaining time at the wall-clock rate since the first training report (validation and
        checkpoints included); before a second one, at the report's own step time."""
        iteration = int(row.get("iteration", 0))
        if self._first is not None and iteration > self._first[0]:
            rate = (now - self._first[1]) / (iteration - self._first[0])
        elif "perf/step_time_s" in row:
            rate = float(row["perf/step_time_s"])
        else:
            return None
        return rate * max(self.max_iters - iteration, 0)

    def format(self, row: dict[str, Any], now: float | None = None) -> str:
        """``iter 25/150  loss 1.234  lr 9.8e-04  41.2 img/s  data-wait 3%  val mIoU 23.45 (best ..)``."""
        now = time.monotonic() if now is None else now
        iteration = int(row.get("iteration", 0))
        width = len(str(self.max_iters))
        parts = [f"iter {iteration:>{width}}/{self.max_iters}"]
        if "train/loss" in row:
            parts.append(f"loss {row['train/loss']:.4f}")
        if "train/lr" in row:
            parts.append(f"lr {row['train/lr']:.2e}")
        if "perf/images_per_s" in row:
            parts.append(f"{row['perf/images_per_s']:.1f} img/s")
        if "perf/data_wait_frac" in row:
            parts.append(f"data-wait {100 * row['perf/data_wait_frac']:.0f}%")
        if "val/mIoU" in row:
            best = f" (best {100 * row['best']:.2f})" if "best" in row and self.metric == "val/mIoU" else ""
            parts.append(f"val mIoU {100 * row['val/mIoU']:.2f}{best}")
        if self.metric != "val/mIoU" and self.metric in row:
            best = f" (best {row['best']:.4g})" if "best" in row else ""
            parts.append(f"{self.metric} {row[self.metric]:.4g}{best}")
        parts.append(f"elapsed {_clock(now - self.started)}")
        eta = self.eta(row, now)
        parts.append(f"ETA {_clock(eta)}" if eta is not None else "ETA -")
        return "  ".join(parts)
