"""Resuming a run safely: same model, an agreed config, the newest complete checkpoint.

Re-running a name resumes it. Before this module, a changed config was silently mixed with the
restored state (the old optimiser/scheduler lr kept, the new ``max_iters`` applied, the new
config recorded). Now:

- The driver compares the config of the newest complete checkpoint on storage with the current
  one *before* any worker starts (:func:`check_resume`). Changes to resume-safe keys (more
  iterations, eval/checkpoint intervals, failure handling, storage retries, worker count on an
  elastic run...) pass; any other change is refused with the list ``key: old -> new`` unless
  the caller accepts changes (``hrt-ray train --accept-config-change``). A different model
  (arch, classes, window) is always refused: its weights cannot be loaded.
- The worker restores optimiser and scheduler and then applies the *current* config to them
  (:func:`apply_optim_config`), so an accepted new learning rate really trains.
- The worker resumes from the newest complete checkpoint on storage, or Ray's registered one if
  that is newer (:func:`resume_state`): after a failed snapshot write, Ray's snapshot can lag
  behind checkpoints that are fully in the bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from hrt_ray import storage
from hrt_ray.config import ConfigError, ExperimentConfig
from hrt_ray.data import resolve_num_classes
from hrt_ray.train.paths import run_uri, worker_config
from hrt_ray.train.state import complete_checkpoints, load_reported_state, read_stored_state

logger = logging.getLogger(__name__)

#: Keys that can change between a run and its resume without changing what is trained.
RESUME_SAFE = frozenset(
    {
        "checkpoint.every",
        "checkpoint.keep",
        "checkpoint.upload",
        "data.prefetch_batches",
        "model.compile",
        "model.channels_last",
        "model.activation_checkpointing",
        "scaling.cpus_per_worker",
        "scaling.cpus_per_data_worker",
        "scaling.resources_per_worker",
        "scaling.check_resources",
        "scaling.gpus_per_worker",
        "scaling.resource_wait_s",
        "scaling.resource_report_interval_s",
        "scaling.autoscaler_config",
        "storage.endpoint",
        "storage.retries",
        "storage.retry_backoff_s",
        "storage.lock_stale_s",
    }
)
#: Whole sections that only say how the run is watched, evaluated or kept alive.
RESUME_SAFE_SECTIONS = ("eval.", "failure.", "target.")
#: The run's identity: the same by construction (the run directory is ``storage.path/name``).
IGNORED = frozenset({"name", "storage.path"})
#: Keys that change the model's parameter shapes: a checkpoint of the old model cannot load.
MODEL_KEYS = ("model.arch", "model.num_classes", "model.window_size")


class ResumeConfigError(ConfigError):
    """Resuming would mix two configs (or two models); the message lists each change."""


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and not path.endswith("resources_per_worker"):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every key whose value differs. A key the old config lacks (an option added since) counts
    only if it is not at its value in ``new``... which cannot be known, so it is skipped."""
    flat_old, flat_new = flatten(old), flatten(new)
    return [
        Change(key, flat_old[key], value)
        for key, value in sorted(flat_new.items())
        if key in flat_old and key not in IGNORED and _differs(flat_old[key], value)
    ]


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) != float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b, strict=True))
    return a != b


def is_resume_safe(change: Change, old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether ``change`` leaves the trained state meaning the same thing."""
    if change.key in RESUME_SAFE or change.key.startswith(RESUME_SAFE_SECTIONS):
        return True
    if change.key == "optim.max_iters":  # more iterations; fewer would end before the schedule does
        return change.new >= change.old
    if change.key in ("scaling.num_workers", "scaling.min_workers"):
        elastic = (old.get("scaling") or {}).get("min_workers") is not None or (new.get("scaling") or {}).get(
            "min_workers"
        ) is not None
        return elastic
    return False


@dataclass(frozen=True)
class ResumePlan:
    """What :func:`check_resume` found: the checkpoint a resume starts from and what changed."""

    checkpoint: str
    iteration: int
    accepted: list[Change]
    safe: list[Change]


def check_resume(cfg: ExperimentConfig, *, accept_changes: bool = False) -> ResumePlan | None:
    """Compare the run's newest complete checkpoint's config with ``cfg``; ``None`` if no resume.

    Raises :class:`ResumeConfigError` naming every refused change (old -> new). Runs on the
    driver before anything is scheduled.
    """
    loc = storage.resolve(run_uri(cfg), cfg.storage.endpoint, storage.RetryPolicy.from_config(cfg.storage))
    found = complete_checkpoints(loc.filesystem, loc.path)
    if not found:
        return None
    newest = found[-1]
    where = f"{loc.uri}/{newest.path.rsplit('/', 1)[-1]}"
    saved = newest.manifest.get("config")
    if not isinstance(saved, Mapping):
        raise ResumeConfigError(f"{where}: the checkpoint records no config; cannot check the resume")
    current = worker_config(cfg)
    changes = config_changes(saved, current)
    # The class count that decides the weights' shapes is the resolved one: num_classes=None and
    # num_classes=5 are the same model on a 5-class dataset.
    classes = newest.manifest.get("num_classes")
    model = [c for c in changes if c.key in MODEL_KEYS and (c.key != "model.num_classes" or classes is None)]
    if classes is not None:
        now = resolve_num_classes(cfg)
        if int(now) != int(classes):
            label = "model.num_classes" if current["model"]["num_classes"] is not None else (
                "num_classes (from data.dataset)"
            )
            model.append(Change(label, classes, now))
    if model:
        raise ResumeConfigError(
            f"run {cfg.name!r} resumes from {where} (iteration {newest.iteration}), which holds a "
            f"different model: {'; '.join(map(str, model))}. Its weights cannot be loaded into this "
            f"one; start a new run (another name) with model.init_checkpoint={where} to fine-tune it"
        )
    safe = [c for c in changes if is_resume_safe(c, saved, current)]
    other = [c for c in changes if c not in safe]
    if other and not accept_changes:
        raise ResumeConfigError(
            f"run {cfg.name!r} resumes from {where} (iteration {newest.iteration}) with a different "
            f"config: {'; '.join(map(str, other))}. Resuming would mix two configs. Use the saved "
            "values, pick another name for a new run, or accept the change "
            "(hrt-ray train --accept-config-change): the restored optimiser and schedule then "
            "continue with the new values"
        )
    for change in other:
        logger.warning("resume of %s: accepted config change %s", cfg.name, change)
    return ResumePlan(where, newest.iteration, other, safe)


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def resume_state(
    ray_checkpoint: Any, run_uri: str, cfg: ExperimentConfig
) -> tuple[dict[str, Any] | None, str]:
    """The state to resume from and where it came from, the same on every rank.

    Rank 0 chooses between Ray's registered checkpoint and the newest complete one on storage
    (the later iteration wins) and broadcasts the choice, so all ranks load the same one.
    """
    loc = storage.resolve(run_uri, cfg.storage.endpoint, storage.RetryPolicy.from_config(cfg.storage))
    choice: list[Any] = [None]
    if _rank() == 0:
        stored = complete_checkpoints(loc.filesystem, loc.path)
        ray_iteration = _ray_iteration(ray_checkpoint, stored)
        if stored and (ray_checkpoint is None or stored[-1].iteration > ray_iteration):
            choice[0] = ("stored", stored[-1])
        elif ray_checkpoint is not None:
            choice[0] = ("ray", None)
    _broadcast(choice)
    if choice[0] is None:
        return None, ""
    kind, stored_ckpt = choice[0]
    if kind == "ray":
        return load_reported_state(ray_checkpoint), str(ray_checkpoint.path)
    return read_stored_state(loc.filesystem, stored_ckpt), stored_ckpt.path


def _ray_iteration(ray_checkpoint: Any, stored: list[Any]) -> int:
    """The iteration of Ray's registered checkpoint, from its manifest when storage lists it."""
    if ray_checkpoint is None:
        return -1
    path = str(ray_checkpoint.path).rstrip("/")
    for ckpt in stored:
        if ckpt.path.rstrip("/") == path:
            return ckpt.iteration
    return -1  # not complete by manifest (older format): any complete stored one is preferred


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _broadcast(box: list[Any]) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)


def apply_optim_config(optimizer: Any, scheduler: Any, cfg: ExperimentConfig) -> None:
    """Make a restored optimiser and scheduler follow ``cfg``: base lr, weight decay, betas.

    ``LambdaLR.load_state_dict`` restores the old ``base_lrs`` and the param groups keep their old
    ``lr``/``initial_lr``; the schedule's shape (warmup, ``max_iters``) comes from the rebuilt
    lambda. Without this, a resumed run trains at the old rate while recording the new config.
    """
    decays = [cfg.optim.weight_decay, 0.0]  # hrt_ray.train.optim.param_groups: decay, no-decay
    scheduler.base_lrs = [cfg.optim.lr for _ in optimizer.param_groups]
    lrs = []
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = cfg.optim.lr
        group["betas"] = tuple(cfg.optim.betas)
        if i < len(decays):
            group["weight_decay"] = decays[i]
        group["lr"] = cfg.optim.lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
        lrs.append(group["lr"])
    scheduler._last_lr = lrs
