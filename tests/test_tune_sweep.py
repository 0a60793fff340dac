"""The tiny synthetic sweep end to end on a real local Ray: ASHA, Ctrl-C, resume, table, best checkpoint.

The sweep runs through the real command line in a subprocess that joins the session's Ray
instance (``RAY_ADDRESS``), so it is interrupted the way a user interrupts it (SIGINT) and
resumed with ``hrt-ray tune --resume``. Every phase has a deadline: an early-stopped trial
whose placement group leaks makes later trials wait forever, and that must fail this test, not
hang it. After the sweep no placement group may be left holding resources.

Kept small (HRT-T at 64x64, 4 iterations, one Train worker per trial, one trial at a time):
the file's window axis is cut to window 13 alone, so two trials (lr 2e-3, and 1e-6, which ASHA
stops) do what four did; on a loaded 2-core box a trial costs tens of seconds, mostly Ray Train
start-up. Window 13, not the model's default 7: the best checkpoint then loads only into a
window-13 model, which shows the search key reached the trial's model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hrt_ray.tune.config import load_sweep

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "jobs" / "ablations" / "synthetic-tiny-window-lr.yaml"
#: Seconds each phase may take before the test calls it a hang (override on a slow box).
PHASE_S = float(os.environ.get("HRT_TUNE_TEST_PHASE_S", "900"))


def overrides(tmp: Path) -> list[str]:
    return [
        f"storage={tmp}/sweeps",
        "search.window_size=[13]",
        f"experiment.data.train_uri={tmp}/data/train",
        f"experiment.data.val_uri={tmp}/data/val",
        "experiment.data.synth.generate=true",
        "experiment.data.synth.num_train=16",
        "experiment.data.synth.num_val=2",
        # Rungs at iteration 2 (and 4 = the end): a trial below the median at 2 stops there.
        "experiment.optim.max_iters=4",
        # A starved data pipeline on a loaded box is slow, not stalled: fail only on real stalls.
        f"experiment.failure.stall_timeout_s={PHASE_S / 2:g}",
    ]


def live_placement_groups(address: str) -> list:
    from ray.util.state import list_placement_groups

    return [pg for pg in list_placement_groups(address=address, limit=1000) if pg.state != "REMOVED"]


def test_impossible_trial_resources_fail_before_any_trial(ray_session: None, tmp_path: Path) -> None:
    from hrt_ray.train.trainer import ResourceError
    from hrt_ray.tune.sweep import run_sweep

    sweep = load_sweep(
        TINY, [*overrides(tmp_path), "experiment.scaling.num_workers=64", "experiment.data.batch_size=64"]
    )
    with pytest.raises(ResourceError, match=r"one sweep trial is a whole training run .* 64 worker"):
        run_sweep(sweep)
    assert not Path(sweep.directory).exists(), "nothing is written before the checks pass"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hrt_ray", "tune", *args]


def _wait_for(predicate, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + PHASE_S
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the sweep exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {PHASE_S:.0f} s (a hung trial?):\n{log.read_text()[-4000:]}")
        time.sleep(1.0)


@pytest.mark.timeout(3 * PHASE_S + 120)
def test_tiny_sweep_stops_early_survives_ctrl_c_resumes_and_reports(
    ray_session: None, tmp_path: Path
) -> None:
    import ray

    from hrt_ray.eval.run import checkpoint_file
    from hrt_ray.models import build_model, load_checkpoint
    from hrt_ray.models.checkpoint import CheckpointError
    from hrt_ray.tune.results import COMPLETED, STOPPED, UNFINISHED, collect

    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address}
    sweep = load_sweep(TINY, overrides(tmp_path))
    sweep_dir, runs = Path(sweep.directory), Path(sweep.runs_root)

    # 1. Start; once the second trial has started (the first is done), press Ctrl-C.
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            _cli("--config", str(TINY), *overrides(tmp_path)),
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for(lambda: runs.is_dir() and len(list(runs.iterdir())) >= 2, proc, "second trial", log)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=PHASE_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert rc == 130, text[-4000:]
    assert f"resume with `hrt-ray tune --resume {sweep_dir}`" in text
    before = {r.trial_id: r for r in collect(sweep)}
    assert len(before) >= 2  # trials are generated as slots free up: the pending ones may not exist yet
    finished = [r for r in before.values() if r.status in (COMPLETED, STOPPED)]
    assert finished and any(r.status == UNFINISHED for r in before.values())
    results_before = {r.run_name: (sweep_dir / r.run_name / "result.json").read_bytes() for r in finished}

    # 2. Resume: the finished trial(s) are not run again; the rest run; the best is evaluated.
    resumed = subprocess.run(
        _cli("--resume", str(sweep_dir), "--eval-best"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=PHASE_S,
    )
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    for name, content in results_before.items():
        assert (sweep_dir / name / "result.json").read_bytes() == content, f"{name} was rerun"

    rows = collect(sweep)
    assert len(rows) == 2 and {r.status for r in rows} <= {COMPLETED, STOPPED}
    curves = [(r.run_name, r.status, r.curve) for r in rows]
    assert sum(r.status == STOPPED for r in rows) >= 1, curves
    # ASHA's rungs survived the interruption: the barely-training lr, run after the first trial
    # (lr 2e-3) and interrupted, then run again on resume, is below it at the first rung.
    by_params = {(r.params["window_size"], r.params["lr"]): r for r in rows}
    assert by_params[(13, 1e-6)].status == STOPPED, curves
    assert all(r.iterations == 4 for r in rows if r.status == COMPLETED)
    assert all(r.iterations < 4 for r in rows if r.status == STOPPED)
    assert set(by_params) == {(13, 2e-3), (13, 1e-6)}
    bests = [r.best for r in rows]
    assert bests == sorted(bests, reverse=True) and all(0.0 <= b <= 1.0 for b in bests)

    # The table (printed and saved) lists every trial, best first; the plot is a PNG.
    csv_rows = (sweep_dir / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and csv_rows[1].startswith(rows[0].trial_id + ",")
    assert (sweep_dir / "results.md").read_text().count("\n| ") == 3
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in rows:
        assert r.trial_id in out

    # The best trial's best checkpoint loads into a fresh model and evaluates to its validation.
    best = rows[0]
    assert best.checkpoint and best.checkpoint.startswith(str(runs / best.run_name))
    assert best.params["window_size"] == 13
    load_checkpoint(build_model("hrt_tiny_ocr", 5, window_size=13), checkpoint_file(best.checkpoint))
    with pytest.raises(CheckpointError, match=r"relative_position_bias_table: checkpoint \(625, 1\)"):
        load_checkpoint(build_model("hrt_tiny_ocr", 5), checkpoint_file(best.checkpoint))
    evaluated = json.loads(Path(best.checkpoint, "eval-whole-ss1.json").read_text())
    assert evaluated["mIoU"] == pytest.approx(best.best, abs=1e-9)

    # Nothing left holding resources: early-stopped trials released their workers. Ray removes a
    # finished driver's placement groups asynchronously (seconds on a loaded box), so the check
    # waits for that; a leaked group stays CREATED and fails it.
    deadline = time.monotonic() + 60
    while (live := live_placement_groups(address)) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert live == []
