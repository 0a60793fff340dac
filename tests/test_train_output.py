"""What a person sees: `hrt-ray train` output captured as under CI or `ray job logs` (no TTY).

Runs the real console entry point in a subprocess against a fresh local Ray (the command starts
its own), on a tiny run: the output must be our lines (one per report), no escape codes, no raw
Ray report dicts, no sentinel values; the run's Ray result table must not hold sentinels either.
Mistakes in the config are named before Ray starts, with exit code 2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from stored_checkpoints import complete_states

from hrt_ray.models import build_model, load_checkpoint
from hrt_ray.train.state import CHECKPOINT_FILE

REPO = Path(__file__).resolve().parent.parent
ESCAPE = re.compile(r"\x1b\[|\r")


def hrt_ray(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the console entry point as a user's shell would; on a timeout stop it with SIGTERM so
    it stops its own Ray.

    Not in the environment: the session's cluster (``RAY_ADDRESS``), and this suite's opt-out of
    Ray's token authentication (``RAY_AUTH_MODE``, tests/conftest.py): a user's local instance
    runs with Ray's default, token authentication on.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    cmd = [sys.executable, "-m", "hrt_ray", *args]
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=120)
            pytest.fail(f"hrt-ray {args[0]} took over {timeout}s:\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def tiny(tmp: Path, name: str) -> list[str]:
    return [
        f"name={name}",
        f"storage.path={tmp}/runs",
        f"data.train_uri={tmp}/data/train",
        f"data.val_uri={tmp}/data/val",
        "data.synth.generate=true",
        "data.synth.num_train=16",
        "data.synth.num_val=2",
        "data.synth.size=[64,64]",
        "data.batch_size=4",
        "optim.max_iters=4",
        "optim.warmup_iters=1",
        "loss.ohem_min_kept=2000",
        "eval.interval=4",
        "checkpoint.every=2",
        "failure.max_failures=0",
        "failure.stall_timeout_s=300",
    ]


@pytest.fixture(scope="module")
def laptop_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One ``hrt-ray train`` as on a laptop: its own local Ray, training, then the evaluation of
    the final checkpoint. The tests below read its console output, run directory and checkpoints."""
    tmp = tmp_path_factory.mktemp("laptop")
    args = ["train", *tiny(tmp, "out"), "eval.at_start=true", "target.miou_ss=50"]
    proc = hrt_ray(args, cwd=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp, proc


@pytest.mark.slow
def test_train_output_is_one_clean_line_per_report(laptop_run) -> None:
    tmp_path, proc = laptop_run
    out, err = proc.stdout, proc.stderr
    assert not ESCAPE.search(out + err), "escape codes / carriage returns in non-TTY output"
    assert "TrainingReport" not in out + err and "1e+30" not in out + err and "1e30" not in out + err
    assert "raylet" not in out + err and "Execution plan" not in out + err
    # No line of Ray's own loggers (e.g. its notice that token authentication is on).
    assert not re.search(r"^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING) ", out + err, re.M), err
    lines = [line for line in out.splitlines() if line.startswith("iter ")]
    # Reports: the untrained model's validation at 0, a checkpoint at 2, validation + checkpoint at 4.
    assert [line.split()[1] for line in lines] == ["0/4", "2/4", "4/4"], out
    assert re.search(r"loss \d+\.\d{4}  lr \S+  \d+\.\d img/s  data-wait \d+%", lines[1]), lines[1]
    assert "val mIoU" not in lines[1], "no validation at iteration 2: no mIoU shown"
    assert re.search(r"val mIoU \d+\.\d\d \(best \d+\.\d\d\)  elapsed \d:\d\d:\d\d  ETA 0:00:00", lines[2])
    assert "run directory" in out and "driver log" in out and "worker logs" in out
    run_dir = tmp_path / "runs" / "out"
    assert (run_dir / "logs" / "driver.log").is_file()
    # Ray's own result table (the checkpoint manager's snapshot) holds no sentinel score either.
    snapshot = next(run_dir.glob("checkpoint_manager_snapshot*.json"))
    text = snapshot.read_text()
    assert "1e+30" not in text and "1e30" not in text and "Infinity" not in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iteration"] == 4 and [h[0] for h in summary["history"]] == [0.0, 4.0]
    # The config's published figure beside the (single-scale) evaluation of the final checkpoint.
    assert summary["eval"]["setting"] == "whole-ss1" and summary["eval"]["scales"] == "ss"
    (compared,) = summary["target"]["compared"]
    assert compared["scales"] == "ss" and compared["published_miou"] == 50.0
    assert compared["achieved_miou"] == pytest.approx(100 * summary["eval"]["mIoU"])
    achieved = f"{100 * summary['eval']['mIoU']:.2f}"
    assert f"eval mIoU      {achieved} (whole-ss1)" in out
    assert f"target mIoU   50.00 ss -> achieved {achieved} ({float(achieved) - 50:+.2f})" in out


@pytest.mark.slow
def test_short_run_reports_checkpoints_and_validates(laptop_run) -> None:
    tmp_path, _ = laptop_run
    summary = json.loads((tmp_path / "runs" / "out" / "summary.json").read_text())
    run_dir = Path(summary["run_dir"])
    assert summary["iteration"] == 4 and summary["resumed_from"] is None
    assert all(0.0 <= h[1] <= 1.0 for h in summary["history"])
    assert summary["start_miou"] == summary["history"][0][1]
    assert summary["final_miou"] == summary["history"][-1][1]
    # Best-by-mIoU plus latest are kept (keep=2; the reports at 2 and 4 carried a checkpoint).
    states = complete_states(run_dir)
    assert {s["iteration"] for s in states} == {2, 4}
    final = max(states, key=lambda s: s["iteration"])
    assert final["scheduler"]["last_epoch"] == 4
    assert final["optimizer"]["state"], "optimizer moments are saved"
    assert len(final["rng"]) == 2 and torch.is_tensor(final["rng"][1]["torch"])
    assert final["arch"] == "hrt_tiny_ocr" and set(final["model"]) and final["best"] == summary["best_miou"]
    assert Path(summary["checkpoint"], CHECKPOINT_FILE).exists()
    assert not list(run_dir.rglob(".checkpoint.pt.tmp-*"))
    # The checkpoint loads into a fresh model through the model package (weights_only).
    load_checkpoint(build_model("hrt_tiny_ocr", 5), f"{summary['checkpoint']}/{CHECKPOINT_FILE}")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_eval_cli_writes_tables_beside_the_checkpoint(
    laptop_run, ray_session: None, capsys: pytest.CaptureFixture
) -> None:
    from hrt_ray.cli import main
    from hrt_ray.config import ConfigError, load_config

    tmp_path, _ = laptop_run
    summary = json.loads((tmp_path / "runs" / "out" / "summary.json").read_text())
    checkpoint = summary["checkpoint"]
    # The train command's own evaluation (whole image, single scale) of the final checkpoint is
    # the final in-loop validation.
    single = json.loads(Path(checkpoint, "eval-whole-ss1.json").read_text())
    assert single["mIoU"] == pytest.approx(summary["final_miou"], abs=1e-9)
    assert len(single["per_class"]) == 5 and "confusion" in single
    common = [
        f"data.train_uri={tmp_path}/data/train",
        f"data.val_uri={tmp_path}/data/val",
        "data.synth.size=[64,64]",
        f"storage.path={tmp_path}/runs",
    ]
    capsys.readouterr()
    # On three workers, which training refuses (batch 4 does not split in three): evaluation
    # splits only the validation images (two here, so one worker holds nothing but padding).
    with pytest.raises(ConfigError, match="does not split evenly"):
        load_config(None, [*common, "data.batch_size=4", "scaling.num_workers=3"])
    argv = ["eval", "--checkpoint", checkpoint, *common, "data.batch_size=4", "scaling.num_workers=3",
            "eval.mode=slide", "eval.crop_size=[48,48]", "eval.stride=[32,32]", "eval.scales=[0.75,1.0]",
            "eval.flip=true"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "mIoU" in out and "written" in out
    ms = json.loads(Path(checkpoint, "eval-slide-ms0.75_1-flip.json").read_text())
    assert 0.0 <= ms["mIoU"] <= 1.0
    assert sum(c["pixels"] for c in ms["per_class"]) == 2 * 64 * 64  # every val pixel, once
    rows = Path(checkpoint, "eval-slide-ms0.75_1-flip.csv").read_text().splitlines()
    assert rows[0] == "class,iou,pixels" and rows[-1].startswith("mIoU,") and len(rows) == 7
    # A missing checkpoint is the user's to fix: one line naming it, exit code 2.
    assert main(["eval", "--checkpoint", str(Path(checkpoint) / "missing.pt"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pt" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.arch=hrt_nonexistent", "model.arch: unknown model 'hrt_nonexistent'"),
        ("model.window_size=200", "model.window_size: 200 does not fit the 64x64 crop"),
        ("optim.lr=.nan", "optim.lr: must be a finite number"),
        ("optim.lr=.inf", "optim.lr: must be a finite number"),
        ("failure.stall_timeout_s=.nan", "failure.stall_timeout_s: must be a finite number"),
        ("loss.ignore_index=-5", "loss.ignore_index"),
        ("loss.ignore_index=3", "loss.ignore_index: 3 is a class id"),
        ("model.num_classes=3", "data.synth.classes"),
        ("checkpoint.metric=val/miou", "did you mean 'val/mIoU'"),
        ("loss.class_weights=[1,2]", "loss.class_weights: 2 weights for 5 classes"),
        ("optim.poly_power=-1", "optim.poly_power"),
        ("optim.warmup_ratio=2", "optim.warmup_ratio"),
        ("optim.grad_clip=0", "optim.grad_clip"),
        ("data.synth.classes=1", "data.synth.classes: must be >= 2"),
    ],
)
def test_config_mistakes_are_named_on_the_driver(tmp_path: Path, override: str, named: str) -> None:
    from hrt_ray.config import ConfigError, load_config
    from hrt_ray.train.run_checks import check_run

    with pytest.raises(ConfigError) as info:
        check_run(load_config(None, [*tiny(tmp_path, "bad"), override]))
    assert named in str(info.value) and "datasynth" not in str(info.value)


def test_a_per_class_iou_is_a_valid_checkpoint_metric(tmp_path: Path) -> None:
    from hrt_ray.config import ConfigError, load_config
    from hrt_ray.train.run_checks import check_run

    check_run(load_config(None, [*tiny(tmp_path, "ok"), "checkpoint.metric=val/IoU/4"]))
    with pytest.raises(ConfigError, match="checkpoint.metric"):
        check_run(load_config(None, [*tiny(tmp_path, "bad"), "checkpoint.metric=val/IoU/5"]))
    with pytest.raises(ConfigError, match="checkpoint.mode"):
        check_run(load_config(None, [*tiny(tmp_path, "bad"), "checkpoint.mode=min"]))


def test_a_config_mistake_is_one_line_and_exit_2_before_ray_starts(tmp_path: Path) -> None:
    proc = hrt_ray(["train", *tiny(tmp_path, "bad"), "model.window_size=200"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: model.window_size: 200"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists(), "Ray never started"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "on_cluster"),
    [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, True)],
    ids=["SIGINT-local", "SIGTERM-cluster"],
)
def test_an_interrupt_says_where_the_run_stands_and_how_to_resume(
    tmp_path: Path, request: pytest.FixtureRequest, signum: signal.Signals, code: int, on_cluster: bool
) -> None:
    """Ctrl-C on a laptop (the command's own local Ray), and SIGTERM to a driver on a running
    cluster (what ``ray job stop`` and Kubernetes send; here the session's Ray, joined through
    ``RAY_ADDRESS``): one line each, and on the cluster the run's workers are gone after it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    if on_cluster:
        request.getfixturevalue("ray_session")
        import ray

        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    else:  # a laptop's own instance: Ray's default token authentication (see hrt_ray())
        env.pop("RAY_AUTH_MODE", None)
    # One training worker: what is checked is the driver's handling of the signal.
    args = [*tiny(tmp_path, "sig"), "optim.max_iters=500", "checkpoint.every=1", "eval.at_start=false",
            "scaling.num_workers=1"]  # fmt: skip
    with subprocess.Popen(
        [sys.executable, "-m", "hrt_ray", "train", "--no-eval", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first report (with a checkpoint) is on screen
        assert first.startswith("iter "), first + proc.stderr.read() if proc.stderr else first
        proc.send_signal(signum)
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no exit within 180 s of {signum.name}:\n{out}\n{err}")
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"interrupted \({signum.name}\): run 'sig' stopped at iteration \d+ \(last checkpoint at "
        rf"iteration \d+, in .*/runs/sig\); resume with: hrt-ray train --no-eval .*name=sig.*",
        last,
    ), err
    assert "Traceback" not in err and "SIGABRT" not in err and "*** " not in err, err
    if on_cluster:  # the driver's exit ended the job: none of its training workers lives on
        from ray.util.state import list_actors

        deadline = time.monotonic() + 60
        while alive := list_actors(
            address=env["RAY_ADDRESS"],
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
            raise_on_missing_output=False,
        ):
            assert time.monotonic() < deadline, alive
            time.sleep(1)
