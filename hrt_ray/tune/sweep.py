"""Run (or resume) a sweep on the connected Ray cluster with Ray Tune, then write its report.

Order matters: everything that can fail fails before the first trial starts: the sweep
config (already validated on load), an existing sweep of the same name, the per-trial resource
request (a request the cluster can never place would leave Ray Train retrying forever), and the
synthetic dataset is generated once here rather than raced by concurrent trials.

Early stopping relies on Ray Train's placement-group cleaner, which watches the trial's
controller through the State API: the cluster must run the dashboard (``ray[default]``),
otherwise an ASHA-stopped trial keeps its workers' placement group and later trials wait
forever (see ``/work/shared/notes/ray-2.60.md``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util import remove_placement_group
from ray.util.placement_group import PlacementGroup, PlacementGroupID
from ray.util.state import list_placement_groups

from hrt_ray import storage
from hrt_ray.config import ExperimentConfig
from hrt_ray.data import ensure_synthetic
from hrt_ray.train.trainer import ResourceError, check_resources, worker_bundle
from hrt_ray.tune.config import SEARCH_KEYS, SWEEP_FILE, Sweep, trial_run_name
from hrt_ray.tune.results import UNFINISHED, Report, tune_storage, write_report
from hrt_ray.tune.scheduler import ResumableASHA
from hrt_ray.tune.trial import TRIAL_CPU, run_trial


class SweepError(RuntimeError):
    """The sweep cannot start or resume (the message says why and what to do)."""


@dataclass
class SweepOutcome:
    report: Report
    directory: str
    wall_s: float
    concurrency: int
    #: Trials neither finished nor errored: the sweep was interrupted and can be resumed.
    interrupted: bool


def first_trial_config(sweep: Sweep) -> ExperimentConfig:
    """A representative trial's experiment (all trials share scaling and data)."""
    point = next(sweep.config.search.grid_points(), {})
    if sweep.config.search.lr.loguniform:
        point = {**point, "lr": sweep.config.search.lr.loguniform[0]}
    return sweep.trial_config(point, trial_run_name("check", point))


def trial_request(cfg: ExperimentConfig) -> dict[str, float]:
    """What one trial holds while it trains: its workers, Ray Data's CPU and the trial's own CPU."""
    n = cfg.scaling.num_workers
    asked = {k: v * n for k, v in worker_bundle(cfg).items()}
    asked["CPU"] = asked.get("CPU", 0.0) + cfg.scaling.cpus_per_data_worker + TRIAL_CPU
    return asked


def check_trial_resources(cfg: ExperimentConfig) -> None:
    """Raise ``ResourceError`` if one trial can never be placed on this cluster."""
    if not cfg.scaling.check_resources:
        return
    # The trial function's CPU sits beside the run's data CPU: count it there.
    data_cpus = cfg.scaling.cpus_per_data_worker + TRIAL_CPU
    probe = replace(cfg, scaling=replace(cfg.scaling, cpus_per_data_worker=data_cpus))
    try:
        # Only what can never fit: each trial's own placement group makes the autoscaler scale.
        check_resources(probe, wait=False)
    except ResourceError as exc:
        raise ResourceError(
            f"one sweep trial is a whole training run plus {TRIAL_CPU:g} CPU for the Tune trial itself "
            f"(counted with Ray Data's CPU below): {exc}"
        ) from None


def concurrency(sweep: Sweep, cfg: ExperimentConfig) -> int:
    """``max_concurrent_trials``, or (0) as many whole trials as the cluster's resources hold.

    Starting more trials than fit would only make their training runs wait for each other's
    placement groups (and starve Ray Data of CPUs).
    """
    if sweep.config.max_concurrent_trials:
        return sweep.config.max_concurrent_trials
    total = ray.cluster_resources()
    fits = [math.floor(total.get(k, 0.0) / v + 1e-9) for k, v in trial_request(cfg).items() if v > 0]
    return max(1, min(fits) if fits else 1)


#: ASHA's rung records in the sweep directory (see hrt_ray.tune.scheduler).
ASHA_STATE_FILE = "asha-state.json"


def _scheduler(sweep: Sweep) -> Any:
    s = sweep.config.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    # Rungs on training iterations (the loop's "iteration"), not on Tune's report count: a
    # resumed trial continues its iteration count, and rungs mean the same across configs.
    return ResumableASHA(
        state_uri=f"{sweep.directory}/{ASHA_STATE_FILE}",
        endpoint=sweep.endpoint,
        time_attr="iteration",
        max_t=sweep.max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def param_space(sweep: Sweep) -> dict[str, Any]:
    space = sweep.config.search
    out: dict[str, Any] = {}
    for key in SEARCH_KEYS:
        grid = space.grid(key.name)
        if grid is not None:
            out[key.name] = tune.grid_search(list(grid))
    if space.lr.grid is None and space.lr.loguniform is not None:
        out["lr"] = tune.loguniform(*space.lr.loguniform)
    return out


def trial_dirname(trial: Any) -> str:
    """Tune's trial directory: the same name as the trial's training run under ``runs/``."""
    return trial_run_name(trial.trial_id, trial.config)


def trainable(sweep: Sweep) -> Any:
    return tune.with_resources(tune.with_parameters(run_trial, sweep_data=sweep.saved()), {"cpu": TRIAL_CPU})


def sweep_exists(sweep: Sweep) -> bool:
    path, fs = tune_storage(sweep)
    return bool(tune.Tuner.can_restore(f"{path}/{sweep.config.name}", storage_filesystem=fs))


def prepare(sweep: Sweep, *, resume: bool) -> tuple[ExperimentConfig, int]:
    """The checks before any trial (see the module docstring); returns (a trial config, concurrency)."""
    exists = sweep_exists(sweep)
    if resume and not exists:
        raise SweepError(f"{sweep.directory}: no sweep to resume here (start it without --resume)")
    if not resume and exists:
        raise SweepError(
            f"{sweep.directory}: a sweep named {sweep.config.name!r} already exists; resume it with "
            f"`hrt-ray tune --resume {sweep.directory}`, or start another with name=<new name>"
        )
    cfg = first_trial_config(sweep)
    check_trial_resources(cfg)
    if cfg.data.dataset == "synthetic":
        ensure_synthetic(cfg)
    return cfg, concurrency(sweep, cfg)


def release_placement_groups() -> list[str]:
    """Remove the placement groups this driver's job still holds once Tune has returned.

    After ``Tuner.fit()`` no trial of this sweep runs, so any placement group of this job is
    left over: seen after a Ctrl-C, a trial's training group still CREATED minutes after the
    driver exited, holding its workers' CPUs (on a cluster, GPUs) from every later job. Other
    jobs' groups are never touched. Returns the removed groups' ids.
    """
    job = ray.get_runtime_context().get_job_id()
    address = ray.get_runtime_context().gcs_address
    removed = []
    for pg in list_placement_groups(address=address, limit=10_000, raise_on_missing_output=False):
        if pg.creator_job_id == job and pg.state != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg.placement_group_id)))
            removed.append(pg.placement_group_id)
    return removed


def run_sweep(sweep: Sweep, *, resume: bool = False) -> SweepOutcome:
    """Start (or resume) the sweep, wait for it, write and return its report."""
    _, limit = prepare(sweep, resume=resume)
    path, fs = tune_storage(sweep)
    start = time.perf_counter()
    if resume:
        tuner = tune.Tuner.restore(
            f"{path}/{sweep.config.name}",
            trainable(sweep),
            resume_unfinished=True,
            # An errored trial (e.g. its node died) gets another go; its training run resumes
            # from its own latest checkpoint.
            resume_errored=True,
            storage_filesystem=fs,
        )
    else:
        storage.write_bytes(
            f"{sweep.directory}/{SWEEP_FILE}",
            yaml.safe_dump(sweep.saved(), sort_keys=False).encode(),
            sweep.endpoint,
        )
        tuner = tune.Tuner(
            trainable(sweep),
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.config.metric,
                mode=sweep.config.mode,
                scheduler=_scheduler(sweep),
                # Tune ignores TuneConfig.max_concurrent_trials beside a given search_alg.
                search_alg=BasicVariantGenerator(random_state=sweep.config.seed, max_concurrent=limit),
                num_samples=sweep.config.num_samples,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=sweep.config.name,
                storage_path=path,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    tuner.fit()
    release_placement_groups()
    wall = time.perf_counter() - start
    # Read back from the saved experiment state: after an interruption the driver's in-memory
    # trials read "terminated", the saved state keeps them pending/running (what resume runs).
    report = write_report(sweep)
    return SweepOutcome(
        report=report,
        directory=sweep.directory,
        wall_s=wall,
        concurrency=limit,
        interrupted=any(r.status == UNFINISHED for r in report.rows),
    )
