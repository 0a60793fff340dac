"""The driver's progress display, fed through its relay file the way the Ray callback feeds it."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import struct
import termios
from pathlib import Path

import pytest

from hrt_ray.train.progress import Progress, ReportRelay, RestartRelay, relay_callbacks


def relay(path: Path, *rows: dict, checkpoint: bool = True) -> None:
    cb = ReportRelay(str(path))
    for row in rows:
        cb.after_report(None, [row, row], object() if checkpoint else None)


TRAIN = {
    "iteration": 50,
    "perf/step_time_s": 0.5,
    "train/loss": 0.5,
    "train/lr": 1e-4,
    "perf/images_per_s": 12.5,
    "perf/data_wait_frac": 0.031,
}


def test_plain_lines_one_per_report_without_escape_codes(tmp_path: Path) -> None:
    path = tmp_path / "reports.jsonl"
    out = io.StringIO()
    with Progress(str(path), 100, stream=out) as progress:
        relay(path, {"iteration": 0, "val/mIoU": 0.1, "best": 0.1}, checkpoint=False)
        relay(path, TRAIN)
        relay(path, {**TRAIN, "iteration": 100, "val/mIoU": 0.4321, "best": 0.4321, "x": float("nan")})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and not re.search(r"\x1b|\r", out.getvalue())
    assert lines[0].startswith("iter   0/100  val mIoU 10.00 (best 10.00)  elapsed 0:00:00  ETA -")
    assert lines[1].startswith("iter  50/100  loss 0.5000  lr 1.00e-04  12.5 img/s  data-wait 3%  elapsed")
    assert "val mIoU" not in lines[1] and lines[1].endswith("ETA 0:00:25")  # 50 steps x 0.5 s
    assert "val mIoU 43.21 (best 43.21)" in lines[2] and lines[2].endswith("ETA 0:00:00")
    assert progress.last_checkpoint_iteration == 100 and progress.iteration == 100
    # Non-finite values never reach the relay (nor, so, a printed line).
    assert all("x" not in json.loads(line) for line in path.read_text().splitlines())


def test_a_terminal_gets_a_live_bar(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")  # a declared dependency (requirements.txt)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a 160-column terminal
    path = tmp_path / "reports.jsonl"
    with open(slave, "w") as tty, Progress(str(path), 100, stream=tty):
        relay(path, TRAIN)
    os.set_blocking(master, False)
    chunks = []
    while True:  # everything is written (the slave side is closed): read until it runs dry
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO / EAGAIN: no more
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    shown = b"".join(chunks).decode()
    assert "\r" in shown and "50/100" in shown and "loss 0.5000" in shown


def test_restarts_preemptions_and_resizes_are_printed_with_their_budget(tmp_path: Path) -> None:
    """The controller's failure decisions reach the quiet console as our own lines.

    Driven with Ray Train's real controller states and error types, as its controller passes
    them to ``after_controller_state_update``.
    """
    import time

    from ray.exceptions import ActorDiedError
    from ray.train import PreemptionError, WorkerGroupError
    from ray.train.v2._internal.execution.controller.state import (
        PreemptingState,
        RestartingState,
        RunningState,
        SchedulingState,
    )
    from ray.train.v2._internal.execution.scaling_policy.scaling_policy import ResizeDecision
    from ray.train.v2.api.preemption import PreemptionInfo

    path = tmp_path / "reports.jsonl"
    out = io.StringIO()
    cb = RestartRelay(str(path), max_failures=2)
    running = RunningState()
    with Progress(str(path), 12, stream=out):
        cb.after_controller_state_update(None, SchedulingState(ResizeDecision(2, {"CPU": 1})))
        relay(path, {**TRAIN, "iteration": 4})
        lost = WorkerGroupError("rank 1 died", {1: ActorDiedError()})
        cb.after_controller_state_update(running, RestartingState(lost))
        info = PreemptionInfo(
            deadline_ms=int(time.time() * 1000) + 10_000, preempted_node_to_ranks={"ab" * 28: [1]}
        )
        # The controller re-enters the preempting state at every poll: still one line.
        for _ in range(3):
            cb.after_controller_state_update(running, PreemptingState(info, time.time()))
        cb.after_controller_state_update(running, RestartingState(PreemptionError(info)))
        cb.after_controller_state_update(None, SchedulingState(ResizeDecision(1, {"CPU": 1})))
        cb.after_controller_state_update(running, RestartingState(lost))
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("restart 1/2 after a worker group failure: rank 1: ActorDiedError")
    assert lines[1].endswith("restarting the worker group from the checkpoint of iteration 4")
    assert lines[2].startswith("preemption notice for rank(s) [1] on node(s) ['abababab'], deadline in")
    # A preemption is charged to its own budget (no limit by default), not to max_failures.
    assert lines[3].startswith("restart 1 (no limit) after a preemption failure")
    assert lines[4] == "worker group resized: 2 -> 1 worker(s)"
    assert lines[5].startswith("restart 2/2 after a worker group failure")
    assert len(lines) == 6


def test_the_trainer_hands_each_relay_the_hooks_it_implements(tmp_path: Path) -> None:
    """Ray Train gives a ``UserCallback`` only the user hooks: the restart relay must reach the
    controller's own callback list, and the report relay the user-callback handler."""
    from ray.train.v2._internal.callbacks.user_callback import UserCallbackHandler
    from ray.train.v2._internal.execution.callback import ControllerCallback

    from hrt_ray.config import load_config
    from hrt_ray.train.trainer import build_trainer

    cfg = load_config(None, [f"storage.path={tmp_path}"])
    callbacks = relay_callbacks(str(tmp_path / "reports.jsonl"), 2, -1)
    made = build_trainer(cfg, {}, callbacks=callbacks)._create_default_callbacks()
    controller = [c for c in made if isinstance(c, ControllerCallback)]
    assert any(isinstance(c, RestartRelay) for c in controller), made
    handler = next(c for c in made if isinstance(c, UserCallbackHandler))
    assert any(isinstance(c, ReportRelay) for c in handler._user_callbacks)
