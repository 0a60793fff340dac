"""Distributed training on a real local Ray (2 CPU workers, gloo): report, checkpoint, validate,
survive a killed worker, refuse impossible requests, evaluate.

A run interrupted and run again is in test_resume_safety.py (locally) and test_checkpoint_async.py
(on S3); a non-finite loss in test_fail_fast.py.

Kept tiny (hrt_tiny_ocr, 64x64 crops, a handful of iterations): these tests check behaviour,
not accuracy; `hrt-ray bench train` and the default run measure speed and learning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faults import CrashAt
from stored_checkpoints import complete_states

from hrt_ray.config import ExperimentConfig, load_config
from hrt_ray.train.state import CHECKPOINT_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def tiny_config(data_dir: Path, storage: str, name: str, *overrides: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"name={name}",
            f"storage.path={storage}",
            f"data.train_uri={data_dir}/train",
            f"data.val_uri={data_dir}/val",
            "data.synth.generate=true",
            "data.synth.num_train=32",
            "data.synth.num_val=4",
            "data.synth.size=[64,64]",
            "data.crop_size=[64,64]",
            "data.batch_size=4",
            "optim.max_iters=4",
            "optim.warmup_iters=1",
            "loss.ohem_min_kept=2000",
            "eval.interval=2",
            "eval.at_start=false",
            "checkpoint.every=1",
            "failure.max_failures=0",
            "failure.stall_timeout_s=120",
            *overrides,
        ],
    )


def checkpoints(run_dir: Path) -> list[dict]:
    return complete_states(run_dir)


@pytest.fixture(scope="module")
def trained(ray_session: None, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from hrt_ray.train.trainer import fit

    storage = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(data_dir, str(storage), "basic", "eval.at_start=true", "checkpoint.every=2")
    return cfg, fit(cfg)


def test_short_run_reports_checkpoints_and_validates(trained) -> None:
    cfg, summary = trained
    run_dir = Path(summary.run_dir)
    assert summary.iteration == 4 and summary.resumed_from is None
    assert [h[0] for h in summary.history] == [0.0, 2.0, 4.0]
    assert all(0.0 <= h[1] <= 1.0 for h in summary.history)
    assert summary.start_miou == summary.history[0][1] and summary.final_miou == summary.history[-1][1]
    # Best-by-mIoU plus latest are kept (keep=2; every report at 2 and 4 carried a checkpoint).
    states = checkpoints(run_dir)
    assert {s["iteration"] for s in states} == {2, 4}
    final = max(states, key=lambda s: s["iteration"])
    assert final["scheduler"]["last_epoch"] == 4
    assert final["optimizer"]["state"], "optimizer moments are saved"
    assert len(final["rng"]) == 2 and torch.is_tensor(final["rng"][1]["torch"])
    assert final["arch"] == "hrt_tiny_ocr" and set(final["model"]) and final["best"] == summary.best_miou
    assert Path(summary.checkpoint, CHECKPOINT_FILE).exists()
    assert not list(run_dir.rglob(".checkpoint.pt.tmp-*"))
    # The checkpoint loads into a fresh model through the model package (weights_only).
    from hrt_ray.models import build_model, load_checkpoint

    load_checkpoint(build_model("hrt_tiny_ocr", 5), f"{summary.checkpoint}/{CHECKPOINT_FILE}")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_cli_writes_tables_beside_the_checkpoint(trained, capsys: pytest.CaptureFixture) -> None:
    from hrt_ray.cli import main

    cfg, summary = trained
    common = [
        f"data.train_uri={cfg.data.train_uri}",
        f"data.val_uri={cfg.data.val_uri}",
        "data.synth.size=[64,64]",
        f"storage.path={cfg.storage.path}",
    ]
    assert main(["eval", "--checkpoint", summary.checkpoint, *common]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "written" in out
    single = json.loads(Path(summary.checkpoint, "eval-whole-ss1.json").read_text())
    # Whole-image single-scale eval of the final checkpoint = the final in-loop validation.
    assert single["mIoU"] == pytest.approx(summary.final_miou, abs=1e-9)
    assert len(single["per_class"]) == 5 and "confusion" in single
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                summary.checkpoint,
                *common,
                "eval.mode=slide",
                "eval.crop_size=[48,48]",
                "eval.stride=[32,32]",
                "eval.scales=[0.75,1.0]",
                "eval.flip=true",
            ]
        )
        == 0
    )
    ms = json.loads(Path(summary.checkpoint, "eval-slide-ms0.75_1-flip.json").read_text())
    assert 0.0 <= ms["mIoU"] <= 1.0
    rows = Path(summary.checkpoint, "eval-slide-ms0.75_1-flip.csv").read_text().splitlines()
    assert rows[0] == "class,iou,pixels" and rows[-1].startswith("mIoU,") and len(rows) == 7
    capsys.readouterr()
    # A missing checkpoint is the user's to fix: one line naming it, exit code 2.
    assert main(["eval", "--checkpoint", str(Path(summary.checkpoint) / "missing.pt"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pt" in err[0] and "Traceback" not in err[0]


def test_killed_worker_restarts_from_the_last_checkpoint(
    ray_session: None, data_dir: Path, tmp_path: Path
) -> None:
    from hrt_ray.train.trainer import fit

    cfg = tiny_config(
        data_dir, str(tmp_path / "runs"), "killed", "failure.max_failures=1", "optim.max_iters=5"
    )
    summary = fit(cfg, callbacks=[CrashAt(4, tmp_path / "crashed")])
    assert (tmp_path / "crashed").exists(), "the fault was injected"
    # Checkpoints every iteration. Ray registers a checkpoint when its controller collects the
    # round's reports from every worker (one queued report per worker, polled every 2 s, and a
    # dead worker's pending report is lost), and the newest complete one on storage may still be
    # uploading: resuming from 1, 2 or 3 is right, from 0 is not.
    assert summary.resumed_from in (1, 2, 3)
    assert summary.iteration == 5
    states = checkpoints(Path(summary.run_dir))
    assert max(s["iteration"] for s in states) == 5


def test_unsatisfiable_request_fails_before_fit_with_the_numbers(
    ray_session: None, data_dir: Path, tmp_path: Path
) -> None:
    from hrt_ray.train.trainer import ResourceError, check_resources, fit

    cfg = tiny_config(
        data_dir, str(tmp_path / "runs"), "toobig", "scaling.num_workers=8", "data.batch_size=8"
    )
    with pytest.raises(ResourceError, match=r"8 worker\(s\) x \{CPU: 1\}.*\{CPU: 9\}.*has \{CPU: 4\}"):
        fit(cfg)
    assert not (tmp_path / "runs" / "toobig").exists()
    gpu = tiny_config(data_dir, str(tmp_path / "runs"), "gpu", "scaling.use_gpu=true")
    with pytest.raises(ResourceError, match=r"GPU: 2.*GPU: 0"):
        check_resources(gpu)
    check_resources(tiny_config(data_dir, str(tmp_path / "runs"), "fits"))  # 2 workers + data fit in 4 CPUs
