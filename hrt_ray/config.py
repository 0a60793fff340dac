"""Typed experiment configuration: dataclasses, YAML files and dotted command-line overrides.

Why this shape:
- Defaults live in one place, the dataclasses below, and they *are* the embedded default run
  (tiny model, synthetic data, 2 CPU workers). A paper config under ``jobs/`` states only what
  differs.
- Everything is checked before a single cluster resource is requested: an unknown key, a
  wrong type or an impossible value raises :class:`ConfigError` naming the key path (and the
  file), with the closest valid key for a typo.
- ``hrt-ray config show`` prints :func:`to_dict` of exactly the object the run uses.
- Every config dataclass is frozen: once loaded and validated, a config is not changed in
  place (a changed copy is made with :func:`dataclasses.replace`, section then parent), so
  what was validated is what runs, and no caller sees another's edits.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the file and key path."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build (see ``hrt_ray.models.build_model``)."""

    arch: str = "hrt_tiny_ocr"
    #: Overrides the arch's window size (ablations); ``None`` keeps the published one.
    window_size: int | None = None
    #: ``None`` takes the dataset spec's number of classes.
    num_classes: int | None = None
    #: URI of an ImageNet-pretrained backbone checkpoint (official layout), or ``None``.
    pretrained: str | None = None
    #: URI of a full checkpoint (ours or official segmentation) to start a *new* run from.
    init_checkpoint: str | None = None
    drop_path_rate: float | None = None
    #: Recompute transformer blocks in backward: less memory at 1024x2048 for more compute.
    activation_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False

    def validate(self, path: str) -> None:
        if self.window_size is not None and self.window_size < 1:
            raise ConfigError(f"{path}.window_size: must be a positive integer, got {self.window_size}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"{path}.num_classes: must be >= 1, got {self.num_classes}")
        if self.drop_path_rate is not None and not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"{path}.drop_path_rate: must be in [0, 1), got {self.drop_path_rate}")


@dataclass(frozen=True)
class SynthConfig:
    """The generated dataset of the embedded default (written when ``data.*_uri`` is missing)."""

    num_train: int = 256
    num_val: int = 16
    size: list[int] = field(default_factory=lambda: [128, 128])
    classes: int = 5
    seed: int = 0
    #: Generate missing shards at ``data.train_uri``/``val_uri`` even though they are not the
    #: embedded default's own paths (there a missing set is always generated). Off by default:
    #: a mistyped URI must be an error, not a freshly generated dataset.
    generate: bool = False

    def validate(self, path: str) -> None:
        _check_hw(self.size, f"{path}.size")
        if self.num_train < 1 or self.num_val < 1:
            raise ConfigError(f"{path}: num_train and num_val must be >= 1")
        if self.classes < 2:
            raise ConfigError(f"{path}.classes: must be >= 2, got {self.classes}")


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how crops are made (see ``hrt_ray.data``)."""

    #: A built-in dataset name (cityscapes, ade20k, pascal_context, coco_stuff, synthetic)
    #: or the path of a dataset spec YAML.
    dataset: str = "synthetic"
    train_uri: str = "data/synthetic/train"
    val_uri: str = "data/synthetic/val"
    #: Crop (H, W); ``None`` takes the dataset spec's crop size.
    crop_size: list[int] | None = field(default_factory=lambda: [64, 64])
    #: Global batch size, split evenly over the training workers.
    batch_size: int = 8
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    aspect_range: list[float] = field(default_factory=lambda: [0.9, 1.1])
    hflip: bool = True
    brightness_shift: float = 10.0
    #: Skip up to this many undecodable/mismatched records (each one is logged); 0 = fail.
    max_bad_records: int = 0
    #: Batches prefetched ahead of the training step on each worker.
    prefetch_batches: int = 2
    #: Crops held in each worker's local shuffle buffer (reseeded every epoch); 0 = 4 x batch.
    shuffle_buffer: int = 0
    #: Channel order fed to the model. The official HRFormer segmentation checkpoints were trained
    #: on BGR (cv2) input with the RGB-ordered ImageNet mean/std; evaluate those with "BGR".
    channel_order: Literal["RGB", "BGR"] = "RGB"
    synth: SynthConfig = field(default_factory=SynthConfig)

    def validate(self, path: str) -> None:
        if not self.dataset:
            raise ConfigError(f"{path}.dataset: must name a dataset or a spec file")
        for key in ("train_uri", "val_uri"):
            if not getattr(self, key):
                raise ConfigError(f"{path}.{key}: must be a local path, s3:// or gs:// URI")
        if self.crop_size is not None:
            _check_hw(self.crop_size, f"{path}.crop_size")
        if self.batch_size < 1:
            raise ConfigError(f"{path}.batch_size: must be >= 1, got {self.batch_size}")
        _check_range(self.scale_range, f"{path}.scale_range")
        _check_range(self.aspect_range, f"{path}.aspect_range")
        if self.max_bad_records < 0:
            raise ConfigError(f"{path}.max_bad_records: must be >= 0")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"{path}.shuffle_buffer: must be >= 0 (0 = 4 x the per-worker batch)")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then poly decay, by iteration, as the official HRT scripts.

    The defaults are the embedded default's short schedule; every paper config under ``jobs/``
    states its own (lr 1e-4, 1500 warmup iterations, 60k-150k iterations, bf16).
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_iters: int = 10
    #: LR at iteration 0 as a fraction of ``lr`` during warmup.
    warmup_ratio: float = 1e-6
    poly_power: float = 0.9
    max_iters: int = 150
    #: Mixed precision (autocast) on GPU and CPU: bf16, fp16 (with a grad scaler) or off (fp32).
    amp: Literal["bf16", "fp16", "off"] = "off"
    grad_clip: float | None = None

    def validate(self, path: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{path}.lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay: must be >= 0")
        if self.max_iters < 1:
            raise ConfigError(f"{path}.max_iters: must be >= 1, got {self.max_iters}")
        if not 0 <= self.warmup_iters < self.max_iters:
            raise ConfigError(
                f"{path}.warmup_iters: must be in [0, max_iters={self.max_iters}), got {self.warmup_iters}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{path}.betas: must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(
                f"{path}.warmup_ratio: the warmup's starting fraction of lr, in [0, 1], "
                f"got {self.warmup_ratio}"
            )
        if not 0 <= self.poly_power <= 10:
            raise ConfigError(
                f"{path}.poly_power: must be in [0, 10] (0.9 in the papers, 0 = constant), "
                f"got {self.poly_power}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(
                f"{path}.grad_clip: a max gradient norm > 0, or null for none; got {self.grad_clip}"
            )


@dataclass(frozen=True)
class LossConfig:
    """OHEM cross-entropy on the main head + weighted cross-entropy on the auxiliary head."""

    ohem: bool = True
    #: Keep pixels whose probability of the true class is below this...
    ohem_thresh: float = 0.7
    #: ...but at least this many pixels per batch (per worker). The paper configs keep 100000
    #: of a 512x1024 crop; the embedded default's 64x64 crops keep 10000.
    ohem_min_kept: int = 10000
    aux_weight: float = 0.4
    class_weights: list[float] | None = None
    ignore_index: int = 255

    def validate(self, path: str) -> None:
        if not 0 < self.ohem_thresh <= 1:
            raise ConfigError(f"{path}.ohem_thresh: must be in (0, 1], got {self.ohem_thresh}")
        if self.ohem_min_kept < 0:
            raise ConfigError(f"{path}.ohem_min_kept: must be >= 0")
        if self.aux_weight < 0:
            raise ConfigError(f"{path}.aux_weight: must be >= 0")
        # Masks are 8-bit: an ignore label outside 0..255 never matches a pixel, so ignored pixels
        # would reach the loss as class ids.
        if not 0 <= self.ignore_index <= 255:
            raise ConfigError(
                f"{path}.ignore_index: must be the 8-bit mask value of ignored pixels, in 0..255 "
                f"(255 for every built-in dataset), got {self.ignore_index}"
            )
        if self.class_weights is not None and any(w < 0 for w in self.class_weights):
            raise ConfigError(f"{path}.class_weights: must be >= 0, got {self.class_weights}")


@dataclass(frozen=True)
class EvalConfig:
    """Validation during training and ``hrt-ray eval``.

    Validation during training runs at scale 1.0 without flip (fast, comparable across runs);
    ``scales`` and ``flip`` apply to ``hrt-ray eval`` and the evaluation after training.
    """

    #: Validate every this many iterations (and at the end).
    interval: int = 50
    mode: Literal["whole", "slide"] = "whole"
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    #: Sliding-window crop and stride (H, W); ``None`` takes the training crop / 2/3 of it.
    crop_size: list[int] | None = None
    stride: list[int] | None = None
    #: Images per inference batch on each worker (validation images of different sizes need 1).
    batch_size: int = 1
    #: Validate once before the first step too, so the curve shows where it started.
    at_start: bool = True

    def validate(self, path: str) -> None:
        if self.interval < 1:
            raise ConfigError(f"{path}.interval: must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"{path}.batch_size: must be >= 1, got {self.batch_size}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"{path}.scales: must be a non-empty list of positive numbers")
        if self.crop_size is not None:
            _check_hw(self.crop_size, f"{path}.crop_size")
        if self.stride is not None:
            _check_hw(self.stride, f"{path}.stride")


@dataclass(frozen=True)
class ScalingConfig:
    """How many Ray Train workers and what each one gets."""

    num_workers: int = 2
    #: Elastic training: the smallest group the run continues with after losing nodes.
    min_workers: int | None = None
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    #: CPUs for each Ray Data decode/augment task; keep headroom so data is not starved.
    cpus_per_data_worker: float = 1.0
    #: Extra resources each worker asks for (e.g. ``{"node_slot": 1}`` to spread over nodes).
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    #: Preflight before ``fit()`` (``hrt_ray.train.preflight``): fail at once when no running
    #: or launchable node can ever place the workers (Ray would wait forever); on an
    #: autoscaling cluster, wait for the nodes the request needs.
    check_resources: bool = True
    #: Autoscaling cluster: how long the preflight waits for nodes it could get (launching, or
    #: a node type at max_workers / out of quota or spot capacity) before failing.
    resource_wait_s: float = 1800.0
    #: Autoscaling cluster: print the autoscaler's report this often while waiting.
    resource_report_interval_s: float = 30.0
    #: The autoscaling config listing the node types the autoscaler may launch, where the
    #: cluster publishes none to the GCS; ``None``: ``~/ray_bootstrap_config.yaml`` if present
    #: (``ray up`` writes it on the head, where ``ray job submit`` runs the driver).
    autoscaler_config: str | None = None

    def validate(self, path: str) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers: must be >= 0, got {self.num_workers}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ConfigError(
                f"{path}.min_workers: must be in [1, num_workers={self.num_workers}], got {self.min_workers}"
            )
        if self.cpus_per_worker < 0 or self.cpus_per_data_worker <= 0:
            raise ConfigError(f"{path}: cpus_per_worker must be >= 0 and cpus_per_data_worker > 0")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ConfigError(f"{path}.gpus_per_worker: must be > 0 when use_gpu is true")
        if self.resource_wait_s < 0:
            raise ConfigError(f"{path}.resource_wait_s: must be >= 0, got {self.resource_wait_s}")
        if self.resource_report_interval_s <= 0:
            raise ConfigError(
                f"{path}.resource_report_interval_s: must be > 0, got {self.resource_report_interval_s}"
            )


@dataclass(frozen=True)
class StorageConfig:
    """Where the run's checkpoints, metrics and logs go: a local path, s3:// or gs://."""

    path: str = "runs"
    #: S3-compatible endpoint override (``http://host:port``); else ``AWS_ENDPOINT_URL``.
    endpoint: str | None = None
    #: Retries of a checkpoint/snapshot/log write or read that failed on a transient error
    #: (connection refused or dropped, timeout, 5xx), with exponential backoff starting at
    #: ``retry_backoff_s`` and capped at 30 s per wait: the defaults ride out ~1 min of outage.
    retries: int = 6
    retry_backoff_s: float = 1.0
    #: A run lock whose heartbeat is older than this is stale (its run died) and is taken over.
    lock_stale_s: float = 300.0

    def validate(self, path: str) -> None:
        if not self.path:
            raise ConfigError(f"{path}.path: must be a local path, s3:// or gs:// URI")
        if self.retries < 0:
            raise ConfigError(f"{path}.retries: must be >= 0 (0 = no retries), got {self.retries}")
        if self.retry_backoff_s < 0:
            raise ConfigError(f"{path}.retry_backoff_s: must be >= 0, got {self.retry_backoff_s}")
        if self.lock_stale_s <= 0:
            raise ConfigError(f"{path}.lock_stale_s: must be > 0, got {self.lock_stale_s}")


@dataclass(frozen=True)
class CheckpointConfig:
    #: Report metrics and a checkpoint every this many iterations.
    every: int = 25
    #: Keep this many best checkpoints (by ``metric``) besides the latest.
    keep: int = 2
    metric: str = "val/mIoU"
    mode: Literal["max", "min"] = "max"
    #: ``async``: training continues while Ray uploads the checkpoint in the background (it is
    #: registered only once complete); ``sync``: every worker waits for the upload at each report.
    upload: Literal["async", "sync"] = "async"

    def validate(self, path: str) -> None:
        if self.every < 1:
            raise ConfigError(f"{path}.every: must be >= 1")
        if self.keep < 1:
            raise ConfigError(f"{path}.keep: must be >= 1")


@dataclass(frozen=True)
class FailureConfig:
    #: Worker-group restarts from the latest checkpoint before the run fails.
    max_failures: int = 3
    #: A worker that waits this long for a batch, or a collective that stalls this long, fails
    #: the run with an error naming the stage instead of hanging.
    stall_timeout_s: float = 600.0
    #: Restarts after node preemptions (spot reclaims drained as PREEMPTION), counted apart from
    #: ``max_failures`` so a spot-heavy run does not spend its failure budget (-1 = unlimited).
    max_preemption_failures: int = -1
    #: When Ray Train reports an imminent preemption, every rank reports a checkpoint at the next
    #: iteration (once per notice), so the work lost is one step, not a checkpoint interval.
    checkpoint_on_preemption: bool = True

    def validate(self, path: str) -> None:
        if self.max_failures < -1:
            raise ConfigError(f"{path}.max_failures: must be >= -1 (-1 = unlimited)")
        if self.max_preemption_failures < -1:
            raise ConfigError(f"{path}.max_preemption_failures: must be >= -1 (-1 = unlimited)")
        if self.stall_timeout_s < 1:
            raise ConfigError(f"{path}.stall_timeout_s: must be >= 1 (seconds), got {self.stall_timeout_s}")


@dataclass(frozen=True)
class TargetConfig:
    """The published result a paper config should reproduce (shown beside what we get)."""

    #: Single-scale and multi-scale mIoU in percent, as the paper prints them.
    miou_ss: float | None = None
    miou_ms: float | None = None
    #: Where the numbers come from (paper table / README row).
    source: str | None = None

    def validate(self, path: str) -> None:
        for key in ("miou_ss", "miou_ms"):
            value = getattr(self, key)
            if value is not None and not 0 <= value <= 100:
                raise ConfigError(f"{path}.{key}: a percentage in [0, 100], got {value}")

    def compare(self, achieved_miou: float | None, scales: Literal["ss", "ms"]) -> TargetComparison | None:
        """``achieved_miou`` (a fraction, as every metric of the package) against the published one.

        ``scales`` says how it was measured: single-scale results are held against ``miou_ss``,
        multi-scale ones against ``miou_ms``. ``None`` when the row publishes no figure for that
        setting or nothing was measured: there is nothing to compare.
        """
        published = self.miou_ss if scales == "ss" else self.miou_ms
        if published is None or achieved_miou is None or achieved_miou != achieved_miou:
            return None
        return TargetComparison(published, 100.0 * achieved_miou, scales, self.source)


@dataclass(frozen=True)
class TargetComparison:
    """A published mIoU beside the one a run achieved, both in percent as the papers print them."""

    published: float
    achieved: float
    scales: Literal["ss", "ms"]
    source: str | None = None

    @property
    def difference(self) -> float:
        """Achieved minus published, in percentage points (negative: short of the paper)."""
        return self.achieved - self.published

    def line(self) -> str:
        """E.g. ``target mIoU   80.00 ss (paper Table 3) -> achieved 78.12 (-1.88)``.

        The difference is taken between the two printed (2-decimal) figures, so the line adds up.
        """
        published, achieved = round(self.published, 2), round(self.achieved, 2)
        where = f" ({self.source})" if self.source else ""
        return (
            f"target mIoU   {published:.2f} {self.scales}{where} -> achieved {achieved:.2f} "
            f"({achieved - published:+.2f})"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "scales": self.scales,
            "published_miou": self.published,
            "achieved_miou": self.achieved,
            "difference": self.difference,
            "source": self.source,
        }


@dataclass(frozen=True)
class ExperimentConfig:
    #: The run name; re-running the same name in the same storage resumes it.
    name: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    target: TargetConfig = field(default_factory=TargetConfig)

    def validate(self, path: str) -> None:
        prefix = key_prefix(path)
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(f"{prefix}name: must be a non-empty name without '/', '\\' or spaces")
        self._check_classes(path)

    def _check_classes(self, path: str) -> None:
        """Class-count checks that need no dataset spec file (the synthetic set's is in the config)."""
        prefix = key_prefix(path)
        classes: int | None = None
        source = ""
        if self.data.dataset == "synthetic":
            classes, source = self.data.synth.classes, f"{prefix}data.synth.classes"
            if self.model.num_classes is not None and self.model.num_classes != classes:
                raise ConfigError(
                    f"{prefix}model.num_classes: {self.model.num_classes} disagrees with the synthetic "
                    f"dataset's {source}={classes}; set one to the other (or leave model.num_classes "
                    f"null to take the dataset's)"
                )
        elif self.model.num_classes is not None:
            classes, source = self.model.num_classes, f"{prefix}model.num_classes"
        if classes is None:
            return
        check_class_settings(self, classes, source, path)


def key_prefix(path: str) -> str:
    """``"experiment"`` -> ``"experiment."``, ``""`` -> ``""``: a section path as a key prefix.

    Every ``validate(path)`` takes the section's path without a trailing dot (as ``_validate``
    passes it); keys are joined through here so no message runs two names together.
    """
    return f"{path}." if path else ""


def check_class_settings(cfg: ExperimentConfig, classes: int, source: str, path: str = "") -> None:
    """``loss.ignore_index`` and ``loss.class_weights`` against the run's number of classes."""
    prefix = key_prefix(path)
    if cfg.loss.ignore_index < classes:
        raise ConfigError(
            f"{prefix}loss.ignore_index: {cfg.loss.ignore_index} is a class id ({source}={classes} "
            f"classes are 0..{classes - 1}); use the dataset's ignore label (255)"
        )
    weights = cfg.loss.class_weights
    if weights is not None and len(weights) != classes:
        raise ConfigError(
            f"{prefix}loss.class_weights: {len(weights)} weights for {classes} classes ({source}); "
            f"give one weight per class"
        )


def check_batch_split(cfg: ExperimentConfig) -> None:
    """Training only: the global ``data.batch_size`` must split evenly over the workers.

    Kept out of :meth:`ExperimentConfig.validate` because evaluation and prediction batch by
    ``eval.batch_size`` per worker and must not refuse a worker count training could not use.
    """
    if cfg.scaling.num_workers and cfg.data.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} does not split evenly over "
            f"scaling.num_workers={cfg.scaling.num_workers}"
        )


# --------------------------------------------------------------------------------------------
# Loading, overrides, printing
# --------------------------------------------------------------------------------------------


def parse_hw(text: str) -> tuple[int, int]:
    """Sizes as people type them (an argparse type too): ``"512x1024"`` -> ``(512, 1024)`` (H x W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 512x1024, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return h, w


def _check_hw(value: Sequence[int], path: str) -> None:
    if len(value) != 2 or any(v < 1 for v in value):
        raise ConfigError(f"{path}: must be [height, width] of positive integers, got {list(value)}")


def _check_range(value: Sequence[float], path: str) -> None:
    if len(value) != 2 or not 0 < value[0] <= value[1]:
        raise ConfigError(f"{path}: must be [low, high] with 0 < low <= high, got {list(value)}")


def suggest(key: str, allowed: Sequence[str], label: str = "Allowed") -> str:
    """``"; did you mean 'lr'? Allowed: ..."``: the one "did you mean" helper of the package."""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} {label}: {', '.join(sorted(allowed))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of {_type_name(tp)} keys, got {value!r}")
        return _build(tp, value, path)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, path): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        # NaN passes every range check below (all comparisons are false) and inf overflows later
        # (``int(inf)``): no setting of this project means "not a number" or "infinitely many".
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")  # a bug in this module, not in the config


def _build(cls: type, data: Mapping[str, Any], path: str) -> Any:
    """A ``cls`` built from its defaults with ``data`` merged in, key by key, type-checked."""
    return _merge_into(cls(), data, path)


def build_checked(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Public :func:`_build` for other typed configs (the sweep config): same key/type errors."""
    return _build(cls, data, path)


def _merge_into(current: Any, data: Mapping[str, Any], path: str) -> Any:
    """A copy of ``current`` with ``data`` merged in (config objects are frozen: never changed)."""
    hints = typing.get_type_hints(type(current))
    names = [f.name for f in dataclasses.fields(current)]
    changes: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"{key_path}: unknown key{suggest(str(key), names)}")
        existing = getattr(current, key)
        if dataclasses.is_dataclass(existing) and isinstance(value, Mapping):
            changes[key] = _merge_into(existing, value, key_path)
        else:
            changes[key] = _coerce(value, hints[key], key_path)
    return dataclasses.replace(current, **changes) if changes else current


def _validate(obj: Any, path: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value, f"{path}.{f.name}" if path else f.name)
    if hasattr(obj, "validate"):
        obj.validate(path)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=2e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from exc
    return key.strip().split("."), value


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], schema: type | None = None
) -> dict[str, Any]:
    """Set dotted ``KEY=VALUE`` pairs into a raw config mapping (validated later, by type).

    Keys are checked against ``schema`` (a config dataclass; default :class:`ExperimentConfig`)
    as far as it has sections; below a free-form mapping field (a sweep's ``experiment:``),
    keys are set as given and checked when that mapping is built.
    """
    for item in overrides:
        parts, value = _parse_override(item)
        cls: Any = schema or ExperimentConfig
        node = data
        for depth, part in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            if cls is not None:
                names = [f.name for f in dataclasses.fields(cls)]
                if part not in names:
                    raise ConfigError(f"override {item!r}: {where}: unknown key{suggest(part, names)}")
            if depth == len(parts) - 1:
                node[part] = value
                break
            if cls is not None:
                cls = typing.get_type_hints(cls)[part]
                if dataclasses.is_dataclass(cls):
                    pass
                elif typing.get_origin(cls) is dict or cls is dict:
                    cls = None  # free-form below this key
                else:
                    raise ConfigError(f"override {item!r}: {where} is not a section")
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {where} is not a section")
            node = child
    return data


def read_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The top-level mapping of a YAML file, with the file named in every error."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return dict(loaded or {})


def deep_merge(into: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``data`` into ``into`` section by section (values are copied, not shared)."""
    for key, value in data.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), *, training: bool = True
) -> ExperimentConfig:
    """Load ``path`` (YAML; ``None`` = the embedded default), apply overrides, validate.

    ``training=False`` (eval, predict) skips the checks only training needs
    (:func:`check_batch_split`).
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = read_mapping(path)
    try:
        data = apply_overrides(data, overrides)
        cfg = _build(ExperimentConfig, data, "")
        _validate(cfg, "")
        if training:
            check_batch_split(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: Mapping[str, Any], source: str = "<dict>", *, training: bool = True) -> ExperimentConfig:
    """Rebuild (and re-validate) a config from :func:`to_dict` output, e.g. inside a Ray worker."""
    try:
        cfg = _build(ExperimentConfig, data, "")
        _validate(cfg, "")
        if training:
            check_batch_split(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
