"""Driver side of training: check the request, build the ``TorchTrainer`` from the config, fit.

Kept apart from the worker function (``loop.py``) as Ray's own examples do: the driver builds
the datasets and the trainer, the worker only trains. The run's name comes from the config, so
running the same config again against the same storage *resumes* it (Ray 2.60: ``fit()`` again
with the same ``RunConfig(name, storage_path)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hrt_ray.config import ExperimentConfig, check_batch_split, to_dict


class ResourceError(RuntimeError):
    """The cluster can never satisfy the scaling request (raised before ``fit()``)."""


class TrainError(RuntimeError):
    """Training failed; the message carries Ray's error (the driver exits non-zero)."""


# --------------------------------------------------------------------------------------------
# Where things go
# --------------------------------------------------------------------------------------------


def storage_root(cfg: ExperimentConfig) -> str:
    """``storage.path`` as an absolute local path or a URI (Ray needs absolute paths)."""
    from hrt_ray import storage

    if storage.is_remote(cfg.storage.path):
        return cfg.storage.path.rstrip("/")
    return str(Path(cfg.storage.path).expanduser().resolve())


def run_uri(cfg: ExperimentConfig) -> str:
    """The run's directory: ``<storage.path>/<name>`` (checkpoints, TensorBoard, results)."""
    return f"{storage_root(cfg)}/{cfg.name}"


def ray_storage_path(cfg: ExperimentConfig) -> str:
    """``storage_path`` for Ray: with ``storage.endpoint``, the endpoint goes into the URI query
    (an ``s3://`` URI combined with ``storage_filesystem`` fails in Ray 2.60); without it Ray
    reads ``AWS_ENDPOINT_URL`` from the environment."""
    root = storage_root(cfg)
    if root.startswith("s3://") and cfg.storage.endpoint:
        parts = urlsplit(
            cfg.storage.endpoint if "://" in cfg.storage.endpoint else f"http://{cfg.storage.endpoint}"
        )
        return f"{root}?endpoint_override={parts.netloc}&scheme={parts.scheme or 'http'}"
    return root


def worker_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """``to_dict(cfg)`` with local paths made absolute: workers do not share the driver's cwd."""
    from hrt_ray import storage

    data = to_dict(cfg)
    for section, key in (
        ("data", "train_uri"),
        ("data", "val_uri"),
        ("model", "pretrained"),
        ("model", "init_checkpoint"),
    ):
        value = data[section][key]
        if value and not storage.is_remote(value):
            data[section][key] = str(Path(value).expanduser().resolve())
    data["storage"]["path"] = storage_root(cfg)
    return data


def checkpoint_uri(cfg: ExperimentConfig, checkpoint: Any) -> str:
    """A URI for a Ray ``Checkpoint`` (its ``path`` has no scheme on object storage)."""
    root = storage_root(cfg)
    path = str(checkpoint.path)
    if "://" in root and "://" not in path:
        return f"{urlsplit(root).scheme}://{path.lstrip('/')}"
    return path


# --------------------------------------------------------------------------------------------
# Resource check: a request the cluster can never satisfy would otherwise retry forever
# --------------------------------------------------------------------------------------------


def worker_bundle(cfg: ExperimentConfig) -> dict[str, float]:
    bundle = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        bundle["GPU"] = cfg.scaling.gpus_per_worker
    bundle.update(cfg.scaling.resources_per_worker)
    return {k: v for k, v in bundle.items() if v > 0}


def check_resources(cfg: ExperimentConfig, num_workers: int | None = None) -> None:
    """Fail now, with the numbers, if the workers (+ one data CPU) can never be placed.

    Counts how many worker bundles fit on each alive node (a bundle cannot span nodes) and
    requires ``cpus_per_data_worker`` CPUs left over for Ray Data, which Ray Train's workers'
    CPUs are excluded from.
    """
    import ray

    # An elastic run starts once its minimum group fits.
    n = (cfg.scaling.min_workers or cfg.scaling.num_workers) if num_workers is None else num_workers
    bundle = worker_bundle(cfg)
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    total = ray.cluster_resources()
    fits = 0
    for res in nodes:
        counts = [math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()]
        fits += min(counts) if counts else n
    asked = {k: v * n for k, v in bundle.items()}
    asked["CPU"] = asked.get("CPU", 0.0) + cfg.scaling.cpus_per_data_worker
    short = {k: v for k, v in asked.items() if total.get(k, 0.0) + 1e-9 < v}
    if fits < n or short:
        have = {k: total.get(k, 0.0) for k in asked}
        raise ResourceError(
            f"scaling asks for {n} worker(s) x {_fmt(bundle)} plus {cfg.scaling.cpus_per_data_worker:g} CPU "
            f"for Ray Data = {_fmt(asked)}, but the cluster has {_fmt(have)} "
            f"({len(nodes)} node(s); {fits} worker bundle(s) fit). Lower scaling.num_workers / "
            f"scaling.cpus_per_worker / scaling.gpus_per_worker, or add nodes "
            f"(scaling.check_resources=false skips this check on an autoscaling cluster)"
        )


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


def build_trainer(
    cfg: ExperimentConfig,
    datasets: dict[str, Any],
    *,
    fault: dict[str, Any] | None = None,
    loop: Any = None,
    name: str | None = None,
    extra_config: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """The ``TorchTrainer`` for ``cfg`` (``loop`` defaults to the training loop).

    ``callbacks`` go into the ``RunConfig`` (a Tune sweep passes its ``TuneReportCallback``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hrt_ray.train.distributed import BoundStoreTorchConfig
    from hrt_ray.train.loop import train_loop_per_worker

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
    run_config = RunConfig(
        name=name or cfg.name,
        storage_path=ray_storage_path(cfg),
        callbacks=callbacks,
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
    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config={
            "cfg": worker_config(cfg),
            "run_uri": run_uri(cfg),
            "fault": fault or {},
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
    from hrt_ray.data import build_datasets, ensure_synthetic

    if cfg.data.dataset == "synthetic":
        ensure_synthetic(cfg)
    return build_datasets(cfg)


def fit(cfg: ExperimentConfig, *, fault: dict[str, Any] | None = None) -> TrainSummary:
    """Train (or resume) the run of ``cfg`` on the connected Ray cluster; raise :class:`TrainError`."""
    check_batch_split(cfg)
    if cfg.scaling.check_resources:
        check_resources(cfg)
    datasets = prepare_data(cfg)
    trainer = build_trainer(cfg, datasets, fault=fault)
    try:
        result = trainer.fit()
    except Exception as exc:
        raise TrainError(f"training run {cfg.name!r} failed: {exc}") from exc
    if result.error is not None:
        raise TrainError(f"training run {cfg.name!r} failed: {result.error}")
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
    from hrt_ray.data import skipped_records

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
