"""Driver side of training: check the request (``preflight``), build the ``TorchTrainer``, fit.

Kept apart from the worker function (``loop.py``) as Ray's own examples do: the driver builds
the datasets and the trainer, the worker only trains. The run's name comes from the config, so
running the same config again against the same storage *resumes* it (Ray 2.60: ``fit()`` again
with the same ``RunConfig(name, storage_path)``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from hrt_ray import storage
from hrt_ray.config import ExperimentConfig, TargetComparison, TargetConfig, check_batch_split
from hrt_ray.data import build_datasets, ensure_synthetic, skipped_records
from hrt_ray.train.distributed import BoundStoreTorchConfig
from hrt_ray.train.failures import FailFast, describe, deterministic_cause
from hrt_ray.train.loop import train_loop_per_worker
from hrt_ray.train.paths import checkpoint_uri, ray_storage, run_uri, worker_config
from hrt_ray.train.pg_cleaner import with_confirming_cleaner
from hrt_ray.train.preflight import Hold, preflight, worker_bundle

# The preflight lives in its own module; callers of ``trainer`` keep importing these names here.
from hrt_ray.train.preflight import ResourceError as ResourceError
from hrt_ray.train.preflight import check_resources as check_resources
from hrt_ray.train.resume import check_resume
from hrt_ray.train.runlock import RunLock


class TrainError(RuntimeError):
    """Training failed; the message carries Ray's error (the driver exits non-zero)."""


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


class _TorchTrainer(TorchTrainer):
    """``TorchTrainer`` whose placement-group cleaner removes a run's group only once its
    controller is known to be dead (``pg_cleaner.py``: Ray's takes a State API reply that comes
    back empty on a loaded head for death, and tears the live run down)."""

    def _create_default_callbacks(self) -> list[Any]:
        return with_confirming_cleaner(super()._create_default_callbacks())


def build_trainer(
    cfg: ExperimentConfig,
    datasets: dict[str, Any],
    *,
    loop: Any = None,
    name: str | None = None,
    extra_config: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    val_panel: Callable[..., Any] | None = None,
) -> Any:
    """The ``TorchTrainer`` for ``cfg`` (``loop`` defaults to the training loop).

    ``callbacks`` go into the ``RunConfig`` (a Tune sweep passes its ``TuneReportCallback``),
    after :class:`~hrt_ray.train.failures.FailFast`, which ends the run on a deterministic
    worker failure instead of spending ``failure.max_failures`` retries on it. Ray runs a
    ``WorkerCallback`` among them in every worker process (tests inject faults that way).
    """
    bundle = worker_bundle(cfg)
    scaling = ScalingConfig(
        num_workers=(
            (cfg.scaling.min_workers, cfg.scaling.num_workers)
            if cfg.scaling.min_workers is not None
            else cfg.scaling.num_workers
        ),
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=bundle,
    )
    storage_path, storage_filesystem = ray_storage(cfg)
    run_config = RunConfig(
        name=name or cfg.name,
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
        callbacks=[FailFast(), *(callbacks or [])],
        failure_config=FailureConfig(
            max_failures=cfg.failure.max_failures,
            max_preemption_failures=cfg.failure.max_preemption_failures,
        ),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.checkpoint.keep,
            checkpoint_score_attribute=cfg.checkpoint.metric,
            checkpoint_score_order=cfg.checkpoint.mode,
        ),
    )
    # The process-group timeout bounds every collective: a stalled all-reduce fails the run.
    # Rank 0's store listens on the advertised address only, not on every interface.
    torch_config = BoundStoreTorchConfig(
        backend="nccl" if cfg.scaling.use_gpu else "gloo",
        timeout_s=max(1, int(cfg.failure.stall_timeout_s)),
    )
    return _TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config={
            "cfg": worker_config(cfg),
            "run_uri": run_uri(cfg),
            "val_panel": val_panel,
            **(extra_config or {}),
        },
        torch_config=torch_config,
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
    )


@dataclass
class TrainSummary:
    name: str
    run_dir: str
    iteration: int
    final_miou: float | None
    start_miou: float | None
    best_miou: float | None
    checkpoint: str | None
    best_checkpoint: str | None
    tensorboard: str
    resumed_from: int | None = None
    history: list[list[float]] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    #: Records skipped under ``data.max_bad_records`` (bad records, records of unreadable shards).
    skipped_records: int = 0
    #: The config's published result (``target:``): the summary holds ours against it.
    target: TargetConfig | None = None

    def target_comparisons(self) -> list[TargetComparison]:
        """Ours against each figure the config's row publishes (none when it publishes none).

        Single-scale: the evaluation when it was single-scale, else the final validation
        (always scale 1.0 without flip). Multi-scale: the evaluation when it was multi-scale.
        """
        if self.target is None:
            return []
        eval_scales = self.eval["scales"] if self.eval is not None else None
        ss = self.eval["mIoU"] if eval_scales == "ss" else self.final_miou
        found = [self.target.compare(ss, "ss")]
        if eval_scales == "ms":
            found.append(self.target.compare(self.eval["mIoU"], "ms"))
        return [c for c in found if c is not None]

    def as_json(self) -> dict[str, Any]:
        """What ``summary.json`` holds: every field, the target with ours against it."""
        data = asdict(self)
        if self.target is not None and (self.target.miou_ss is not None or self.target.miou_ms is not None):
            data["target"]["compared"] = [c.as_json() for c in self.target_comparisons()]
        else:
            data["target"] = None
        return data

    def lines(self) -> list[str]:
        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.2f}"

        out = [
            f"run            {self.name} ({self.iteration} iterations"
            + (f", resumed at iteration {self.resumed_from})" if self.resumed_from else ")"),
            f"val mIoU       start {pct(self.start_miou)} -> final {pct(self.final_miou)} "
            f"(best {pct(self.best_miou)})",
        ]
        if self.eval is not None:
            out.append(
                f"eval mIoU      {pct(self.eval['mIoU'])} ({self.eval['setting']}) -> {self.eval['json']}"
            )
        out += [c.line() for c in self.target_comparisons()]
        out += [
            f"checkpoint     {self.checkpoint}",
            f"best           {self.best_checkpoint}",
            f"tensorboard    {self.tensorboard}",
            f"skipped        {self.skipped_records} record(s) under data.max_bad_records",
            f"run directory  {self.run_dir}",
        ]
        return out


def prepare_data(cfg: ExperimentConfig) -> dict[str, Any]:
    """Generate the synthetic dataset if it is missing, then build the Ray datasets."""
    if cfg.data.dataset == "synthetic":
        ensure_synthetic(cfg)
    return build_datasets(cfg)


def fit(
    cfg: ExperimentConfig,
    *,
    callbacks: list[Any] | None = None,
    accept_config_change: bool = False,
    val_panel: Callable[..., Any] | None = None,
    finish: Callable[[TrainSummary], TrainSummary] | None = None,
) -> TrainSummary:
    """Train (or resume) the run of ``cfg`` on the connected Ray cluster; raise :class:`TrainError`.

    Holds the run lock for the whole run (a second run of the same name refuses, naming the
    holder) and, on a resume, refuses a changed config before anything is scheduled unless
    ``accept_config_change`` (see :mod:`hrt_ray.train.resume`). ``finish`` (the CLI's evaluation
    of the final checkpoint and its ``summary.json``) runs on the summary before the lock is
    released, so no second run of the same name writes into the directory in between.

    A deterministic worker failure (see :mod:`hrt_ray.train.failures`) is not retried: an input
    error (config, data, spec, checkpoint) is raised as itself, others as :class:`TrainError`.
    """
    check_batch_split(cfg)
    lock = RunLock(
        run_uri(cfg),
        endpoint=cfg.storage.endpoint,
        stale_s=cfg.storage.lock_stale_s,
        retry=storage.RetryPolicy.from_config(cfg.storage),
    ).acquire()
    try:
        check_resume(cfg, accept_changes=accept_config_change)
        summary = _fit(cfg, callbacks=callbacks, val_panel=val_panel)
        return finish(summary) if finish is not None else summary
    finally:
        lock.release()


def _fit(
    cfg: ExperimentConfig,
    *,
    callbacks: list[Any] | None = None,
    val_panel: Callable[..., Any] | None = None,
) -> TrainSummary:
    with preflight(cfg) if cfg.scaling.check_resources else contextlib.nullcontext(Hold()) as hold:
        datasets = prepare_data(cfg)
        trainer = build_trainer(cfg, datasets, callbacks=callbacks, val_panel=val_panel)
        hold.release()  # Train's own placement group takes the nodes over
        try:
            result = trainer.fit()
            if result.error is not None:
                raise result.error
        except Exception as exc:
            cause = deterministic_cause(exc)
            if cause is not None and not isinstance(cause, RuntimeError):
                raise cause from None  # ConfigError, DataError, SpecError, CheckpointError: the user's input
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else describe(exc)
            raise TrainError(f"training run {cfg.name!r} failed: {detail}") from exc
    value = result.return_value or {}
    history = value.get("history") or []
    best_ckpt = None
    if result.best_checkpoints:
        sign = 1 if cfg.checkpoint.mode == "max" else -1
        ranked = sorted(
            result.best_checkpoints,
            key=lambda cm: sign * float(cm[1].get(cfg.checkpoint.metric, -math.inf * sign)),
            reverse=True,
        )
        best_ckpt = checkpoint_uri(cfg, ranked[0][0])
    final_val = [h for h in history if h[0] == value.get("iteration")]
    return TrainSummary(
        name=cfg.name,
        run_dir=run_uri(cfg),
        iteration=int(value.get("iteration", 0)),
        final_miou=final_val[-1][1] if final_val else (history[-1][1] if history else None),
        start_miou=history[0][1] if history and history[0][0] == 0 else None,
        best_miou=value.get("best") if cfg.checkpoint.metric == "val/mIoU" else None,
        checkpoint=checkpoint_uri(cfg, result.checkpoint) if result.checkpoint else None,
        best_checkpoint=best_ckpt,
        tensorboard=f"{run_uri(cfg)}/tensorboard",
        resumed_from=value.get("resumed_from"),
        history=history,
        skipped_records=skipped_records(datasets),
    )
