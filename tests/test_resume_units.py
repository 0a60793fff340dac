"""Resume decisions without Ray: which checkpoint is complete, which config change is refused, and
that a restored optimiser follows the new config. Checkpoints are written by the real writer
(``save_state``) into a run directory laid out as Ray lays it out (``checkpoint_<timestamp>``).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from torch import nn

from hrt_ray.config import load_config
from hrt_ray.train.optim import build_optimizer, build_scheduler, warmup_poly_factor
from hrt_ray.train.paths import worker_config
from hrt_ray.train.resume import ResumeConfigError, apply_optim_config, check_resume
from hrt_ray.train.state import CHECKPOINT_FILE, complete_checkpoints, save_state


def run_config(tmp_path: Path, *overrides: str):
    # Data under tmp_path too: the default data/synthetic of the checkout (what `make train`
    # writes) holds a manifest whose class count the resume check would read instead.
    data = tmp_path / "data"
    return load_config(
        None,
        ["name=r", f"storage.path={tmp_path / 'runs'}", f"data.train_uri={data}/train",
         f"data.val_uri={data}/val", *overrides],
    )  # fmt: skip


def write_checkpoint(run_dir: Path, stamp: str, iteration: int, cfg) -> Path:
    directory = run_dir / f"checkpoint_2026-12-01_12-00-{stamp}"
    save_state(
        directory,
        {"model": {"w": torch.zeros(2)}, "iteration": iteration, "arch": cfg.model.arch, "num_classes": 5,
         "config": worker_config(cfg)},
    )
    return directory


def test_newest_complete_checkpoint_skips_partial_and_unlabelled_ones(tmp_path: Path) -> None:
    cfg = run_config(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    write_checkpoint(run_dir, "01", 2, cfg)
    write_checkpoint(run_dir, "02", 5, cfg)
    partial = write_checkpoint(run_dir, "03", 7, cfg)  # upload cut short: the file is truncated
    data = (partial / CHECKPOINT_FILE).read_bytes()
    (partial / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    bare = run_dir / "checkpoint_2026-12-01_12-00-04"  # no manifest: still being copied
    bare.mkdir()
    (bare / CHECKPOINT_FILE).write_bytes(data)
    found = complete_checkpoints(pafs.LocalFileSystem(), str(run_dir))
    assert [c.iteration for c in found] == [2, 5]


def test_config_changes_are_listed_and_safe_ones_pass(tmp_path: Path) -> None:
    old = run_config(tmp_path)
    write_checkpoint(tmp_path / "runs" / "r", "01", 3, old)
    assert check_resume(run_config(tmp_path)).iteration == 3  # same config: a plain resume
    safe = run_config(tmp_path, "optim.max_iters=300", "eval.interval=10", "checkpoint.every=5",
                      "failure.max_failures=1", "storage.retries=2", "checkpoint.upload=sync",
                      "scaling.resource_wait_s=60")
    plan = check_resume(safe)
    assert plan is not None and not plan.accepted and len(plan.safe) == 7
    changed = run_config(tmp_path, "optim.lr=0.5", "seed=3", "optim.max_iters=300")
    with pytest.raises(ResumeConfigError) as info:
        check_resume(changed)
    assert "optim.lr: 0.001 -> 0.5; seed: 0 -> 3" in str(info.value)
    assert check_resume(changed, accept_changes=True).accepted[0].key == "optim.lr"
    # Fewer iterations than planned is not "more iterations"; nor is a fixed-size worker count.
    with pytest.raises(ResumeConfigError, match="optim.max_iters: 150 -> 100"):
        check_resume(run_config(tmp_path, "optim.max_iters=100"))
    with pytest.raises(ResumeConfigError, match="scaling.num_workers: 2 -> 1"):
        check_resume(run_config(tmp_path, "scaling.num_workers=1"))


def test_worker_count_may_change_on_an_elastic_run(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "runs" / "r", "01", 3, run_config(tmp_path, "scaling.min_workers=1"))
    elastic = run_config(tmp_path, "scaling.min_workers=1", "scaling.num_workers=4", "data.batch_size=8")
    plan = check_resume(elastic)
    assert plan is not None and {c.key for c in plan.safe} == {"scaling.num_workers"}


def test_another_model_is_refused_even_when_changes_are_accepted(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "runs" / "r", "01", 3, run_config(tmp_path))
    with pytest.raises(ResumeConfigError, match=r"different model: model.num_classes: 5 -> 3"):
        check_resume(run_config(tmp_path, "model.num_classes=3", "data.synth.classes=3"), accept_changes=True)
    # Naming the count the dataset already gives is the same model: a config change, not a model change.
    assert check_resume(run_config(tmp_path, "model.num_classes=5"), accept_changes=True) is not None
    # The same through the dataset: 5 synthetic classes become 3.
    with pytest.raises(ResumeConfigError, match=r"model: num_classes \(from data.dataset\): 5 -> 3"):
        check_resume(run_config(tmp_path, "data.synth.classes=3"), accept_changes=True)


def test_restored_optimiser_and_schedule_follow_the_new_lr() -> None:
    def build(lr: float):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        opt = build_optimizer(model, lr, 0.01)
        return model, opt, build_scheduler(opt, 10, 2)

    model, opt, sched = build(1e-3)
    for _ in range(3):
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    cfg = load_config(None, ["optim.lr=0.5", "optim.max_iters=10", "optim.warmup_iters=2"])
    _, opt2, sched2 = build(cfg.optim.lr)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * warmup_poly_factor(3, 10, 2, 1e-6))  # the bug
    apply_optim_config(opt2, sched2, cfg)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5 * warmup_poly_factor(3, 10, 2, 1e-6))
    opt2.step()
    sched2.step()
    expected = 0.5 * warmup_poly_factor(4, 10, 2, 1e-6)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([expected, expected])
    assert opt2.param_groups[1]["weight_decay"] == 0.0 and opt2.param_groups[0]["weight_decay"] == 0.01


def test_cli_refuses_a_changed_config_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import ray

    from hrt_ray.cli import main

    monkeypatch.chdir(tmp_path)  # no jobs/default.yaml here: the built-in defaults
    write_checkpoint(tmp_path / "runs" / "r", "01", 3, run_config(tmp_path))
    # Any Ray start is recorded (the suite's own Ray may already be up, so is_initialized
    # cannot tell): the refusal must come before the CLI asks for a Ray instance at all.
    starts: list[object] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: starts.append((a, k)))
    assert main(["train", "name=r", f"storage.path={tmp_path / 'runs'}", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.001 -> 0.5" in err and "--accept-config-change" in err
    assert starts == [], "refused before Ray started"
