"""Sweep configs, their pre-flight errors, and the results table/plot: no Ray needed.

Every bad input here must fail at load time with the key path in the message, i.e. before
``hrt-ray tune`` connects to a cluster or starts a trial.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hrt_ray.config import ConfigError
from hrt_ray.tune.config import (
    STEP_METRICS,
    VALIDATION_METRICS,
    Sweep,
    load_saved_sweep,
    load_sweep,
    sweep_from_saved,
    trial_run_name,
)

REPO = Path(__file__).resolve().parent.parent
ABLATIONS = REPO / "jobs" / "ablations"
TINY = ABLATIONS / "synthetic-tiny-window-lr.yaml"


def write_sweep(tmp_path: Path, data: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def minimal(**extra) -> dict:
    return {"name": "s", "search": {"window_size": [7, 13]}, "scheduler": {"grace_period": 10}, **extra}


# --------------------------------------------------------------------------------------------
# The shipped sweeps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, base_arch, dataset, max_iters, trials",
    [
        ("cityscapes-hrt_b-window-lr", "hrt_base_ocr", "cityscapes", 80000, 9),
        ("ade20k-hrt_b-window-lr", "hrt_base_ocr", "ade20k", 150000, 9),
        ("synthetic-tiny-window-lr", "hrt_tiny_ocr", "synthetic", 8, 4),
    ],
)
def test_shipped_ablation_sweeps_load_and_cross_window_with_lr(name, base_arch, dataset, max_iters, trials):
    sweep = load_sweep(ABLATIONS / f"{name}.yaml")
    assert sweep.config.name == name
    assert sweep.base.model.arch == base_arch and sweep.base.data.dataset == dataset
    assert sweep.max_t == max_iters and sweep.config.metric == "val/mIoU" and sweep.config.mode == "max"
    points = list(sweep.config.search.grid_points())
    assert len(points) == trials
    assert {p["window_size"] for p in points} == ({7, 13, 15} if trials == 9 else {7, 13})
    assert len({p["lr"] for p in points}) == (3 if trials == 9 else 2)
    assert sweep.config.scheduler.kind == "asha"
    # Local paths are absolute: trials run in other processes and other directories.
    assert Path(sweep.base.data.train_uri).is_absolute() and Path(sweep.directory).is_absolute()
    cfg = sweep.trial_config(points[-1], trial_run_name("abc_00001", points[-1]))
    assert cfg.model.window_size == points[-1]["window_size"] and cfg.optim.lr == points[-1]["lr"]
    assert cfg.storage.path == f"{sweep.directory}/runs" and cfg.checkpoint.metric == "val/mIoU"


def test_paper_sweeps_keep_the_paper_schedule_and_validate_often_enough_for_asha():
    for name in ("cityscapes-hrt_b-window-lr", "ade20k-hrt_b-window-lr"):
        sweep = load_sweep(ABLATIONS / f"{name}.yaml")
        assert sweep.base.data.batch_size == 8 and sweep.base.model.pretrained
        assert sweep.config.scheduler.grace_period % sweep.base.eval.interval == 0
        assert sweep.base.scaling.use_gpu and sweep.base.scaling.num_workers == 8


def test_overrides_reach_sweep_and_experiment_keys():
    sweep = load_sweep(
        TINY,
        [
            "num_samples=3",
            "scheduler.kind=fifo",
            "search.lr.grid=[1e-3]",
            "experiment.optim.max_iters=6",
            "name=other",
        ],
    )
    assert sweep.config.num_samples == 3 and sweep.config.scheduler.kind == "fifo"
    assert sweep.config.search.lr.grid == [1e-3] and sweep.base.optim.max_iters == 6
    assert sweep.directory.endswith("/sweeps/other")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_sample=2", "num_sample: unknown key; did you mean 'num_samples'?"),
        ("scheduler.grace=5", "scheduler.grace: unknown key; did you mean 'grace_period'?"),
        ("experiment.optim.lrr=1e-3", "optim.lrr: unknown key; did you mean 'lr'?"),
    ],
)
def test_sweep_overrides_are_checked_like_experiment_overrides(override: str, message: str):
    """One override parser serves experiments and sweeps: the same key check and suggestion."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_sweep(TINY, [override])


def test_trial_run_names_are_unique_readable_and_valid():
    name = trial_run_name(
        "4c980_00003", {"window_size": 13, "lr": 2e-4, "backbone": "hrt_base_ocr", "ohem_thresh": 0.7}
    )
    assert name == "4c980_00003-w13-lr2.0e-04-hrt_base_ocr-ohem0.7"


def test_saved_sweep_round_trips(tmp_path: Path):
    sweep = load_sweep(TINY, [f"storage={tmp_path}"])
    again = sweep_from_saved(yaml.safe_load(yaml.safe_dump(sweep.saved())))
    assert again.saved() == sweep.saved() and again.directory == sweep.directory
    (tmp_path / sweep.config.name).mkdir()
    (tmp_path / sweep.config.name / "sweep.yaml").write_text(yaml.safe_dump(sweep.saved()))
    assert load_saved_sweep(sweep.directory).saved() == sweep.saved()
    with pytest.raises(ConfigError, match="no saved sweep here"):
        load_saved_sweep(str(tmp_path / "nothing"))


def test_metric_lists_match_what_the_training_loop_reports():
    from hrt_ray.eval.metrics import SegMetrics
    from hrt_ray.train.meter import Meter

    reported = SegMetrics(miou=0.5, pixel_acc=0.5, mean_acc=0.5, iou=[0.5, 0.5], support=[1, 1]).as_report(
        "val/"
    )
    assert set(VALIDATION_METRICS) == {k for k in reported if "/IoU/" not in k}
    assert set(STEP_METRICS) == set(Meter().summary(1)) | {"train/lr"}
    assert {"val/IoU/0", "val/IoU/1"} <= set(reported)


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the key, before anything runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"name": "s", "search": {}},
            r"search: the search space is empty; set at least one of search.window_size",
        ),
        ({"name": "s"}, r"search: the search space is empty"),
        (minimal(search={"window_size": []}), r"search.window_size: an empty grid"),
        (minimal(search={"lr": {"grid": []}}), r"search.lr.grid: an empty grid"),
        (minimal(search={"window_size": [7, 7]}), r"search.window_size: repeated values"),
        (minimal(search={"window_size": [0]}), r"search.window_size\[0\]: must be a positive integer"),
        (minimal(search={"lr": {"grid": [1e-4], "loguniform": [1e-5, 1e-3]}}), r"search.lr: give either"),
        (
            minimal(search={"lr": {"loguniform": [1e-3, 1e-5]}}),
            r"search.lr.loguniform: must be \[low, high\]",
        ),
        (minimal(search={"ohem_thresh": [1.5]}), r"search.ohem_thresh\[0\]: must be in \(0, 1\]"),
        (minimal(metric="val/miou"), r"metric: training never reports 'val/miou'; did you mean 'val/mIoU'"),
        (minimal(metric="val/accuracy"), r"metric: training never reports 'val/accuracy'"),
        (minimal(schedulr={"kind": "asha"}), r"schedulr: unknown key; did you mean 'scheduler'"),
        (minimal(scheduler={"kind": "hyperband"}), r"scheduler.kind: 'hyperband' is not allowed"),
        (minimal(scheduler={"reduction_factor": 1}), r"scheduler.reduction_factor: must be > 1"),
        (minimal(num_samples=0), r"num_samples: must be >= 1"),
        (minimal(name="a b"), r"name: must be a non-empty name"),
        (minimal(search={"window_size": "7"}), r"search.window_size: expected a list"),
        (minimal(max_concurrent_trials=-1), r"max_concurrent_trials: must be >= 0"),
    ],
)
def test_bad_sweep_configs_fail_with_the_key_path(tmp_path: Path, data: dict, message: str):
    with pytest.raises(ConfigError, match=message) as info:
        load_sweep(write_sweep(tmp_path, data))
    assert str(tmp_path / "sweep.yaml") in str(info.value)


@pytest.mark.parametrize(
    "data, message",
    [
        # The default experiment trains 150 iterations: a first rung at 200 never comes.
        (
            minimal(scheduler={"grace_period": 200}),
            r"scheduler.grace_period: 200 iterations is beyond the last rung",
        ),
        (minimal(scheduler={"grace_period": 10, "max_t": 500}), r"scheduler.max_t: 500 is beyond"),
        (minimal(experiment={"optim": {"lr": -1}}), r"optim.lr: must be > 0.*keys under 'experiment'"),
        (minimal(experiment={"optim": {"lrr": 1}}), r"optim.lrr: unknown key; did you mean 'lr'"),
        (
            minimal(search={"backbone": ["hrt_huge_ocr"]}),
            r"search.backbone\[0\]: unknown model 'hrt_huge_ocr'",
        ),
        (
            minimal(
                search={"backbone": ["hrt_small_ocr"]}, experiment={"model": {"pretrained": "p/hrt_tiny.pth"}}
            ),
            r"search.backbone: \['hrt_small_ocr'\] would load the base's model.pretrained",
        ),
        (
            minimal(experiment={"eval": {"interval": 1000}}),
            r"metric: 'val/mIoU' is reported at validation only",
        ),
        # A trial's experiment must be valid for every grid point (window 0 via a model override).
        (
            minimal(search={"ohem_thresh": [0.7]}, experiment={"data": {"batch_size": 3}}),
            r"data.batch_size: 3 does not split evenly",
        ),
    ],
)
def test_sweeps_inconsistent_with_their_base_experiment_fail_before_trials(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, data))


def test_base_path_is_relative_to_the_sweep_file(tmp_path: Path):
    (tmp_path / "exp.yaml").write_text(
        yaml.safe_dump({"name": "x", "optim": {"max_iters": 60, "warmup_iters": 2}})
    )
    (tmp_path / "sub").mkdir()
    sweep = load_sweep(write_sweep(tmp_path / "sub", minimal(base="../exp.yaml")))
    assert sweep.base.optim.max_iters == 60 and sweep.config.base == str((tmp_path / "exp.yaml").resolve())
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config"):
        load_sweep(write_sweep(tmp_path / "sub", minimal(base="missing.yaml")))


def test_cli_rejects_bad_sweeps_before_connecting_to_ray(tmp_path: Path, capsys: pytest.CaptureFixture):
    from hrt_ray.cli import main

    assert main(["tune", "--config", str(TINY), "search.window_size=[]"]) == 2
    assert "search.window_size: an empty grid" in capsys.readouterr().err
    assert main(["tune", "--config", str(TINY), "metric=val/loss"]) == 2
    assert "training never reports 'val/loss'" in capsys.readouterr().err
    assert main(["tune"]) == 2
    assert "give --config" in capsys.readouterr().err
    assert main(["tune", "--resume", str(tmp_path)]) == 2
    assert "no saved sweep here" in capsys.readouterr().err
    # In a fresh process, a bad sweep must fail without even importing Ray (other tests in this
    # session may have started Ray in this one).
    code = (
        "import sys; from hrt_ray.cli import main; rc = main(['tune', '--config', sys.argv[1], "
        "'search.window_size=[]']); print('RAY', 'ray' in sys.modules); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(TINY)], capture_output=True, text=True)
    assert proc.returncode == 2 and "RAY False" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# Table and plot
# --------------------------------------------------------------------------------------------


def _rows():
    from hrt_ray.tune.results import COMPLETED, ERROR, STOPPED, TrialRow

    def row(tid, w, lr, status, best, curve, error=None):
        return TrialRow(
            tid,
            trial_run_name(tid, {"window_size": w, "lr": lr}),
            {"window_size": w, "lr": lr},
            status,
            max((c[0] for c in curve), default=0),
            best,
            None if best is None else max(curve, key=lambda c: c[1])[0],
            None if best is None else f"/x/runs/{tid}/checkpoint_000001",
            curve,
            error,
        )

    return [
        row("t_00000", 7, 2e-3, COMPLETED, 0.41, [(2, 0.2), (4, 0.3), (8, 0.41)]),
        row("t_00002", 13, 2e-3, COMPLETED, 0.38, [(2, 0.25), (4, 0.3), (8, 0.38)]),
        row("t_00001", 7, 1e-6, STOPPED, 0.12, [(2, 0.12)]),
        row("t_00003", 13, 1e-6, ERROR, None, [], error="RuntimeError: boom"),
    ]


def test_results_table_csv_markdown_and_plot(tmp_path: Path):
    from hrt_ray.tune import results

    sweep: Sweep = load_sweep(TINY, [f"storage={tmp_path}"])
    rows = _rows()
    table = results.format_table(sweep, rows).splitlines()
    assert table[0].split() == ["trial", "window_size", "lr", "iterations", "best", "val/mIoU", "status"]
    assert table[1].split()[:6] == ["t_00000", "7", "2.00e-03", "8", "41.00", "completed"]
    assert "stopped early" in table[3] and table[4].endswith("error: RuntimeError: boom")
    csv_lines = results.to_csv(sweep, rows).splitlines()
    assert csv_lines[0].startswith(
        "trial,window_size,lr,iterations,best val/mIoU,best_iteration,status,checkpoint"
    )
    assert csv_lines[1].startswith("t_00000,7,0.002,8,0.41,8,completed,/x/runs/t_00000/checkpoint_000001,")
    assert len(csv_lines) == 5
    md = results.to_markdown(sweep, rows)
    assert "| trial | window_size | lr | iterations | best val/mIoU (%) | status |" in md
    assert md.count("\n| t_") == 4
    png = results.plot(sweep, rows)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# --------------------------------------------------------------------------------------------
# ASHA's rungs across a resume (no cluster: the scheduler is plain bookkeeping)
# --------------------------------------------------------------------------------------------


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def test_asha_rungs_survive_a_restart_of_the_scheduler(tmp_path: Path):
    from hrt_ray.tune.scheduler import ResumableASHA

    def scheduler() -> ResumableASHA:
        return ResumableASHA(
            state_uri=str(tmp_path / "asha-state.json"),
            time_attr="iteration",
            metric="val/mIoU",
            mode="max",
            max_t=8,
            grace_period=2,
            reduction_factor=2,
        )

    first, good = scheduler(), _Trial("a")
    first.on_trial_add(None, good)
    assert first.on_trial_result(None, good, {"iteration": 2, "val/mIoU": 0.5}) == "CONTINUE"
    first.on_trial_complete(None, good, {"iteration": 8, "val/mIoU": 0.6})
    # What Tuner.restore hands back: the scheduler as configured at the start, rungs empty...
    again, worse = scheduler(), _Trial("b")
    again.on_trial_add(None, good)
    again.on_trial_add(None, worse)
    # ...which still stops a trial below the finished one at the first rung.
    assert again.on_trial_result(None, worse, {"iteration": 2, "val/mIoU": 0.1}) == "STOP"
    fresh = ResumableASHA(
        state_uri=str(tmp_path / "other.json"),
        time_attr="iteration",
        metric="val/mIoU",
        mode="max",
        max_t=8,
        grace_period=2,
        reduction_factor=2,
    )
    fresh.on_trial_add(None, worse)
    assert fresh.on_trial_result(None, worse, {"iteration": 2, "val/mIoU": 0.1}) == "CONTINUE"


def _asha(state_uri: str, **overrides: Any) -> Any:
    from hrt_ray.tune.scheduler import ResumableASHA

    kwargs = dict(
        time_attr="iteration", metric="val/mIoU", mode="max", max_t=8, grace_period=2, reduction_factor=2
    )
    return ResumableASHA(state_uri=state_uri, **{**kwargs, **overrides})


def test_asha_state_is_json_data_not_a_pickle(tmp_path: Path):
    """The sweep directory is shared storage: its state must be data, never code to unpickle."""
    uri = str(tmp_path / "asha-state.json")
    first, trial = _asha(uri), _Trial("a")
    first.on_trial_add(None, trial)
    first.on_trial_result(None, trial, {"iteration": 2, "val/mIoU": 0.5})
    saved = json.loads(Path(uri).read_text())
    assert saved["metric"] == "val/mIoU" and saved["trial_brackets"] == {"a": 0}
    assert [r["milestone"] for r in saved["brackets"][0]] == [8.0, 4.0, 2.0]
    assert saved["brackets"][0][-1]["recorded"] == {"a": 0.5}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (pickle.dumps({"_num_stopped": 0}), "not valid JSON"),
        (b'{"version": 1, "metric": "val/loss", "mode": "max"}', "metric: saved 'val/loss'"),
        (None, "rung milestones differ"),
    ],
)
def test_asha_refuses_state_that_does_not_fit_the_sweep(tmp_path: Path, content: Any, message: str):
    from hrt_ray.tune.scheduler import SchedulerStateError

    uri = tmp_path / "asha-state.json"
    if content is None:  # a state written by a sweep with another max_t
        other = _asha(str(uri), max_t=16)
        other.on_trial_add(None, _Trial("a"))
        other.on_trial_result(None, _Trial("a"), {"iteration": 2, "val/mIoU": 0.5})
    else:
        uri.write_bytes(content)
    with pytest.raises(SchedulerStateError, match=message) as info:
        _asha(str(uri)).on_trial_add(None, _Trial("b"))
    assert str(uri) in str(info.value)


def test_reports_without_a_fresh_metric_never_reach_tune():
    """Reports without validation leave the metric out; ASHA must see only measured values."""
    from hrt_ray.train.meter import is_finite_number as fresh

    assert fresh(0.0) and fresh(0.41) and fresh(3)
    assert not any(fresh(v) for v in (float("-inf"), float("nan"), None, True))


def test_a_resumed_trial_hands_asha_the_rung_its_checkpoint_reached(tmp_path: Path):
    """Interrupted between its iteration-2 checkpoint and Tune's receipt of that report, a trial
    resumes past the rung; the report in the checkpoint's manifest is what ASHA decides on."""
    import torch

    from hrt_ray.train.paths import run_uri
    from hrt_ray.train.state import save_state
    from hrt_ray.tune.trial import checkpointed_report

    sweep = load_sweep(TINY, [f"storage={tmp_path}/sweeps"])
    cfg = sweep.trial_config({"window_size": 7, "lr": 1e-6}, "t_00001-w7-lr1.0e-06")
    assert checkpointed_report(cfg, "val/mIoU") is None  # a first start: nothing to hand over
    run = Path(run_uri(cfg))
    state = {"model": {"w": torch.zeros(2)}, "iteration": 2, "config": {}}
    report = {"iteration": 2, "val/mIoU": 0.01, "val/IoU/3": float("nan"), "train/loss": 1.5}
    save_state(run / "checkpoint_2026-12-07_10-00-00.000000", state, report)
    # A newer checkpoint without validation (e.g. a preemption's): Tune never gets those.
    save_state(run / "checkpoint_2026-12-07_10-00-05.000000", {**state, "iteration": 3}, {"iteration": 3})
    missed = checkpointed_report(cfg, "val/mIoU")
    assert missed == {
        "iteration": 2,
        "val/mIoU": 0.01,
        "train/loss": 1.5,
        "checkpoint_path": str(run / "checkpoint_2026-12-07_10-00-00.000000"),
    }
    asha, leader, resumed = _asha(str(tmp_path / "asha.json"), max_t=4), _Trial("a"), _Trial("b")
    asha.on_trial_add(None, leader)
    asha.on_trial_add(None, resumed)
    asha.on_trial_result(None, leader, {"iteration": 2, "val/mIoU": 0.12})
    assert asha.on_trial_result(None, resumed, missed) == "STOP"
    # Had Tune seen the report before the interruption, handing it over again changes nothing.
    again = _Trial("c")
    asha.on_trial_add(None, again)
    assert asha.on_trial_result(None, again, {"iteration": 2, "val/mIoU": 0.5}) == "CONTINUE"
    assert asha.on_trial_result(None, again, {"iteration": 2, "val/mIoU": 0.5}) == "CONTINUE"


def test_every_search_key_maps_to_a_config_key_of_its_type():
    """One table maps search keys to experiment keys; a renamed config key breaks it here."""
    import dataclasses

    from hrt_ray.config import ExperimentConfig, to_dict
    from hrt_ray.tune.config import SEARCH_KEYS, SearchSpace, config_value

    space_fields = {f.name for f in dataclasses.fields(SearchSpace)} - {"pretrained"}
    assert {k.name for k in SEARCH_KEYS} == space_fields
    defaults = to_dict(ExperimentConfig())
    for key in SEARCH_KEYS:
        value = config_value(defaults, key.path)  # KeyError on a path that does not exist
        assert value is None or isinstance(value, key.kind), key
