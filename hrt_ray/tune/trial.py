"""One sweep trial: a whole Ray Train run (its own ``TorchTrainer`` and worker group) inside Tune.

This is the Tune + Train integration Ray 2.60 supports: the trial is a function that builds and
fits a trainer, whose ``RunConfig`` carries a ``TuneReportCallback`` forwarding the training
reports to Tune. A trial can therefore span GPUs and nodes like any training run; the trial
function itself only holds a fraction of a CPU on one node.

Resuming: a trial's Train run is named after the Tune trial id and lives under the sweep
directory, so a trial restarted by ``Tuner.restore`` calls ``fit()`` again with the same
``RunConfig(name, storage_path)`` and Ray Train resumes it from its latest checkpoint. An
interruption can fall between that checkpoint and Tune's receipt of its report: the resumed
run would then continue past a rung ASHA never saw it at. So a resumed trial first hands Tune
the report its newest checkpoint was saved with (:func:`checkpointed_report`); a report Tune
already has changes nothing (ASHA decides once per trial and rung).
"""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from hrt_ray import storage
from hrt_ray.config import ExperimentConfig
from hrt_ray.data import build_datasets
from hrt_ray.infer.visualize import add_tensorboard_panel
from hrt_ray.train.meter import is_finite_number
from hrt_ray.train.paths import run_uri
from hrt_ray.train.state import complete_checkpoints
from hrt_ray.train.trainer import TrainError, build_trainer
from hrt_ray.tune.config import sweep_from_saved, trial_run_name

#: The CPU the trial function holds (Tune rejects 0); the training run asks for its own.
TRIAL_CPU = 0.1


class ValidationReportCallback(TuneReportCallback):
    """Forward to Tune only the reports that carry a fresh value of the sweep's metric.

    The training loop reports at every checkpoint, validating only every ``eval.interval``
    iterations; a report without validation carries a worst-possible sentinel for the checkpoint
    metric so that Ray never ranks its checkpoint first. ASHA would read that filler as a real
    value at a rung and stop the trial, so such reports stay out of Tune (their checkpoints
    still count for resuming the run).
    """

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and is_finite_number(metrics[0].get(self.metric)):
            super().after_report(run_context, metrics, checkpoint)


def checkpointed_report(cfg: ExperimentConfig, metric: str) -> dict[str, Any] | None:
    """The report (with its checkpoint's path) of the run's newest complete checkpoint that
    carries a fresh value of ``metric``; ``None`` when the run has none (a trial's first start).

    Read from the checkpoints' manifests (hrt_ray.train.state), never the weights.
    """
    loc = storage.resolve(run_uri(cfg), cfg.storage.endpoint, storage.RetryPolicy.from_config(cfg.storage))
    for ckpt in reversed(complete_checkpoints(loc.filesystem, loc.path)):
        metrics = ckpt.manifest.get("metrics") or {}
        if is_finite_number(metrics.get(metric)) and is_finite_number(metrics.get("iteration")):
            return {**metrics, CHECKPOINT_PATH_KEY: ckpt.path}
    return None


def run_trial(params: dict[str, Any], *, sweep_data: dict[str, Any]) -> None:
    """Tune's trainable: build this trial's experiment from the sweep and fit its ``TorchTrainer``."""
    sweep = sweep_from_saved(sweep_data)
    trial_id = tune.get_context().get_trial_id()
    cfg = sweep.trial_config(params, trial_run_name(trial_id, params))
    # A resumed trial: Tune may have missed its newest checkpoint's report (module docstring).
    missed = checkpointed_report(cfg, sweep.config.metric)
    if missed is not None:
        tune.report(missed)
    # The driver generated the synthetic data (if any) and checked resources before any trial.
    trainer = build_trainer(
        cfg,
        build_datasets(cfg),
        callbacks=[ValidationReportCallback(sweep.config.metric)],
        val_panel=add_tensorboard_panel,
    )
    try:
        trainer.fit()
    except Exception as exc:
        raise TrainError(f"trial {cfg.name}: training failed: {exc}") from exc
