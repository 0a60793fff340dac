"""Driver-side checks of a run's config that need the model registry or the dataset spec.

:func:`hrt_ray.config.load_config` checks what the config alone can tell (types, ranges, finite
numbers). What needs the model list, a dataset spec or the names of the reported metrics is
checked here, still on the driver and before Ray starts: a mistake found inside the workers
costs a cluster start, a dataset build and (before this module) every retry of the worker
group, and reaches the user as a worker traceback that does not name the key.
"""

from __future__ import annotations

import difflib
import math

import torch

from hrt_ray.config import ConfigError, ExperimentConfig, check_class_settings
from hrt_ray.data import SpecError, get_spec
from hrt_ray.eval.metrics import metrics_from_confusion
from hrt_ray.models import default_window_size, list_models
from hrt_ray.train.meter import Meter

#: Stride of HRT's highest-resolution branch: every window must fit the feature map there.
FINEST_STRIDE = 4


def check_run(cfg: ExperimentConfig) -> None:
    """Raise :class:`ConfigError` naming the key for anything that would fail in the workers."""
    known = list_models()
    if cfg.model.arch not in known:
        close = difflib.get_close_matches(cfg.model.arch, known, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"model.arch: unknown model {cfg.model.arch!r}; {hint}known models: {', '.join(known)}"
        )

    synthetic = cfg.data.dataset == "synthetic"
    try:
        spec = get_spec(cfg.data.dataset, cfg.data.synth.classes if synthetic else None)
    except SpecError as exc:
        raise ConfigError(f"data.dataset: {exc}") from None
    source = "data.synth.classes" if synthetic else f"the {spec.name} dataset spec"
    labels = "the synthetic dataset" if synthetic else source
    if cfg.model.num_classes is not None and cfg.model.num_classes != spec.num_classes:
        raise ConfigError(
            f"model.num_classes: {cfg.model.num_classes} disagrees with {source} "
            f"({spec.num_classes} classes); leave model.num_classes null to take the dataset's"
        )
    if cfg.loss.ignore_index != spec.ignore_index:
        raise ConfigError(
            f"loss.ignore_index: {cfg.loss.ignore_index}, but {labels} "
            f"marks ignored pixels with {spec.ignore_index}; set loss.ignore_index={spec.ignore_index}"
        )
    check_class_settings(cfg, spec.num_classes, source)

    window = cfg.model.window_size or default_window_size(cfg.model.arch)
    crop = list(cfg.data.crop_size or spec.crop_size)
    _check_window(window, crop, "data.crop_size" if cfg.data.crop_size else f"{spec.name} spec crop_size")
    if cfg.eval.mode == "slide":
        _check_window(window, list(cfg.eval.crop_size or crop), "eval.crop_size")

    _check_metric(cfg, spec.num_classes)


def _check_window(window: int, crop: list[int], crop_key: str) -> None:
    finest = [math.ceil(c / FINEST_STRIDE) for c in crop]
    bound = min(finest)
    if window > bound:
        raise ConfigError(
            f"model.window_size: {window} does not fit the {crop[0]}x{crop[1]} crop ({crop_key}): "
            f"the highest-resolution branch (stride {FINEST_STRIDE}) is {finest[0]}x{finest[1]}, so a "
            f"window is at most {bound}; larger windows attend mostly to padding and their attention "
            f"memory grows as window^4"
        )


def reported_metrics(num_classes: int) -> list[str]:
    """Every metric name a training report can carry (per-class IoU as ``val/IoU/<class id>``)."""
    train = [*Meter().summary(1), "train/lr"]
    val = metrics_from_confusion(torch.eye(num_classes, dtype=torch.int64)).as_report("val/")
    return [*train, *val]


def _check_metric(cfg: ExperimentConfig, num_classes: int) -> None:
    names = reported_metrics(num_classes)
    metric = cfg.checkpoint.metric
    if metric not in names:
        close = difflib.get_close_matches(metric, names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        shown = [n for n in names if not n.startswith("val/IoU/")]
        raise ConfigError(
            f"checkpoint.metric: {metric!r} is not a metric this run reports; {hint}choose one of "
            f"{', '.join(shown)}, or a class's IoU as val/IoU/<class id> (0..{num_classes - 1})"
        )
    # Validation metrics are absent from reports without a validation; Ray then scores the
    # checkpoint -inf in the metric's own order, which is the best possible score under "min".
    if metric.startswith("val/") and cfg.checkpoint.mode == "min":
        raise ConfigError(
            f"checkpoint.mode: 'min' with checkpoint.metric={metric!r}; validation metrics are "
            f"accuracies (higher is better) and only some checkpoints carry them: use mode=max"
        )
