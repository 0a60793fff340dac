"""The sweep config: which experiment to start from, what to search, how to stop trials early.

Why this shape:
- A sweep names a *base* experiment YAML (a paper config under ``jobs/``) and states only what
  it varies, so a sweep trial is exactly a training run of that config with a few keys changed.
- ``experiment:`` holds keys merged over the base (e.g. a shorter schedule for the ablation);
  on the command line they are ``experiment.optim.max_iters=...``.
- Everything is checked before a trial starts, with the key path in the message: an empty
  search space, a metric that training never reports, an impossible combination (every grid
  trial's experiment config is built and validated up front).
- The resolved sweep (sweep keys + the full base experiment, with absolute paths) is saved in
  the sweep directory, so ``hrt-ray tune --resume DIR`` continues exactly what was started even
  if the YAML files changed since.

At module level this imports :mod:`yaml`, the experiment config and the storage layer
(pyarrow), not torch or Ray: the CLI validates a sweep file in well under a second. Only the
cross-check against the model registry (which imports torch) defers its import until the
file's own checks passed.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hrt_ray import storage
from hrt_ray.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    build_checked,
    deep_merge,
    from_dict,
    key_prefix,
    load_config,
    read_mapping,
    suggest,
    to_dict,
)
from hrt_ray.train.paths import worker_config

#: File in the sweep directory holding the resolved sweep (what ``--resume`` runs).
SWEEP_FILE = "sweep.yaml"

#: Metrics every validation report of the training loop carries (``SegMetrics.as_report``), plus
#: what every report carries (``Meter.summary`` and the learning rate). Per-class IoU is
#: ``val/IoU/<class index>``. A test keeps this list in step with the training loop.
VALIDATION_METRICS = ("val/mIoU", "val/pixel_acc", "val/mean_acc")
STEP_METRICS = (
    "train/loss",
    "train/lr",
    "train/skipped_steps",
    "perf/images_per_s",
    "perf/images_per_s_per_worker",
    "perf/data_wait_frac",
    "perf/step_time_s",
)
_PER_CLASS = re.compile(r"^val/IoU/\d+$")


@dataclass(frozen=True)
class SearchKey:
    """One searchable key: where it goes in the experiment and how it is written.

    This table is the one place that knows the mapping; the search space, the trial configs,
    the trial run names, Tune's param space and the results table all read it.
    """

    #: The key under ``search:`` and in a trial's params.
    name: str
    #: Dotted path of the experiment config key it sets.
    path: str
    #: Type a trial's value is converted to before it goes into the config.
    kind: type
    #: Its part of a trial run name (``w13``, ``lr2.0e-04``).
    run_label: Callable[[Any], str]
    #: Its cell in the results table.
    cell: Callable[[Any], str]


SEARCH_KEYS: tuple[SearchKey, ...] = (
    SearchKey("window_size", "model.window_size", int, lambda v: f"w{int(v)}", str),
    SearchKey("lr", "optim.lr", float, lambda v: f"lr{float(v):.1e}", lambda v: f"{float(v):.2e}"),
    SearchKey("backbone", "model.arch", str, str, str),
    SearchKey(
        "ohem_thresh", "loss.ohem_thresh", float, lambda v: f"ohem{float(v):g}", lambda v: f"{float(v):g}"
    ),
)
SEARCH_KEY = {k.name: k for k in SEARCH_KEYS}


def config_value(data: Mapping[str, Any], path: str) -> Any:
    """``data["model"]["arch"]`` for ``path="model.arch"``."""
    node: Any = data
    for part in path.split("."):
        node = node[part]
    return node


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[leaf] = value


@dataclass(frozen=True)
class LrSpace:
    """The learning rate (``optim.lr``): a grid, or log-uniform samples, or neither."""

    #: Every value is tried (in every one of ``num_samples`` repeats).
    grid: list[float] | None = None
    #: ``[low, high]``: one log-uniform draw per trial, ``num_samples`` trials.
    loguniform: list[float] | None = None

    def validate(self, path: str) -> None:
        if self.grid is not None and self.loguniform is not None:
            raise ConfigError(f"{path}: give either grid or loguniform, not both")
        if self.grid is not None:
            _check_grid(self.grid, f"{path}.grid")
            for i, lr in enumerate(self.grid):
                if lr <= 0:
                    raise ConfigError(f"{path}.grid[{i}]: a learning rate must be > 0, got {lr}")
        if self.loguniform is not None:
            lo_hi = self.loguniform
            if len(lo_hi) != 2 or not 0 < lo_hi[0] < lo_hi[1]:
                raise ConfigError(f"{path}.loguniform: must be [low, high] with 0 < low < high, got {lo_hi}")

    @property
    def searched(self) -> bool:
        return self.grid is not None or self.loguniform is not None


@dataclass(frozen=True)
class SearchSpace:
    """What varies between trials; a key left out keeps the base experiment's value."""

    #: Attention window sizes (``model.window_size``), a grid: the paper's 7 / 13 / 15.
    window_size: list[int] | None = None
    lr: LrSpace = field(default_factory=LrSpace)
    #: Model names (``model.arch``, see ``hrt_ray.models.list_models``), a grid.
    backbone: list[str] | None = None
    #: OHEM probability thresholds (``loss.ohem_thresh``), a grid.
    ohem_thresh: list[float] | None = None
    #: ``model.pretrained`` per backbone when ``backbone`` varies (an HRT-S checkpoint does not
    #: load into HRT-B); backbones not listed keep the base's.
    pretrained: dict[str, str] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        if self.window_size is not None:
            _check_grid(self.window_size, f"{path}.window_size")
            for i, w in enumerate(self.window_size):
                if w < 1:
                    raise ConfigError(f"{path}.window_size[{i}]: must be a positive integer, got {w}")
        self.lr.validate(f"{path}.lr")
        if self.backbone is not None:
            _check_grid(self.backbone, f"{path}.backbone")
        if self.ohem_thresh is not None:
            _check_grid(self.ohem_thresh, f"{path}.ohem_thresh")
            for i, t in enumerate(self.ohem_thresh):
                if not 0 < t <= 1:
                    raise ConfigError(f"{path}.ohem_thresh[{i}]: must be in (0, 1], got {t}")
        if not self.dimensions():
            raise ConfigError(
                f"{path}: the search space is empty; set at least one of {path}.window_size, "
                f"{path}.lr.grid, {path}.lr.loguniform, {path}.backbone, {path}.ohem_thresh"
            )

    def grid(self, name: str) -> list[Any] | None:
        """The grid of search key ``name`` (``None``: not searched on a grid)."""
        return self.lr.grid if name == "lr" else getattr(self, name)

    def searched(self, name: str) -> bool:
        return self.lr.searched if name == "lr" else self.grid(name) is not None

    def dimensions(self) -> list[str]:
        """The searched keys, in table order."""
        return [k.name for k in SEARCH_KEYS if self.searched(k.name)]

    def grid_points(self) -> Iterator[dict[str, Any]]:
        """Every combination of the grid dimensions (the log-uniform lr left out)."""
        grids = {k.name: self.grid(k.name) for k in SEARCH_KEYS if self.grid(k.name) is not None}
        for values in itertools.product(*grids.values()):
            yield dict(zip(grids, values, strict=True))


@dataclass(frozen=True)
class SchedulerConfig:
    """When trials stop: ASHA stops the worse ones at rungs of iterations; FIFO runs all to the end."""

    kind: Literal["asha", "fifo"] = "asha"
    #: ASHA: iterations every trial trains before it can be stopped (the first rung).
    grace_period: int = 1000
    #: ASHA: rung ``k`` is at ``grace_period * reduction_factor**k`` iterations and keeps the top
    #: ``1 / reduction_factor`` of the trials that reached it.
    reduction_factor: float = 3.0
    #: ASHA: the last rung; ``None`` = the experiment's ``optim.max_iters``.
    max_t: int | None = None

    def validate(self, path: str) -> None:
        if self.grace_period < 1:
            raise ConfigError(f"{path}.grace_period: must be >= 1 iteration, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"{path}.reduction_factor: must be > 1, got {self.reduction_factor}")
        if self.max_t is not None and self.max_t < self.grace_period:
            raise ConfigError(f"{path}.max_t: must be >= grace_period={self.grace_period}, got {self.max_t}")


@dataclass(frozen=True)
class SweepConfig:
    #: The sweep's name: its directory is ``<storage>/<name>``; the same name resumes it.
    name: str = "sweep"
    #: The base experiment YAML, relative to this sweep file's directory (absolute also works);
    #: ``None`` = the built-in defaults.
    base: str | None = None
    #: Experiment keys merged over the base (same layout as an experiment YAML).
    experiment: dict[str, Any] = field(default_factory=dict)
    search: SearchSpace = field(default_factory=SearchSpace)
    #: Repeats of the grid; with ``lr.loguniform``, the number of lr draws per grid point.
    num_samples: int = 1
    #: What the trials are ranked and stopped by; it must be something training reports.
    metric: str = "val/mIoU"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    #: Trials running at once; 0 = as many as the cluster holds (each is a whole training run).
    max_concurrent_trials: int = 0
    #: Where the sweep directory goes (local path, s3://, gs://); ``None`` = ``<storage.path>/sweeps``
    #: of the experiment. Trial runs, metrics, checkpoints, table and plots all go under it.
    storage: str | None = None
    #: Seed of the log-uniform draws (the same seed draws the same learning rates).
    seed: int = 0

    def validate(self, path: str = "") -> None:
        prefix = key_prefix(path)  # "sweep" -> "sweep.name", "" -> "name"
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(f"{prefix}name: must be a non-empty name without '/', '\\' or spaces")
        self.search.validate(f"{prefix}search")
        self.scheduler.validate(f"{prefix}scheduler")
        if self.num_samples < 1:
            raise ConfigError(f"{prefix}num_samples: must be >= 1, got {self.num_samples}")
        if self.max_concurrent_trials < 0:
            raise ConfigError(f"{prefix}max_concurrent_trials: must be >= 0 (0 = as many as fit)")
        if self.storage is not None and not self.storage.strip():
            raise ConfigError(f"{prefix}storage: must be a local path, s3:// or gs:// URI (or left out)")
        check_metric(self.metric, f"{prefix}metric")


def check_metric(metric: str, path: str) -> None:
    """Fail unless the training loop reports ``metric`` (a sweep on it would never rank a trial)."""
    if metric in VALIDATION_METRICS or metric in STEP_METRICS or _PER_CLASS.match(metric):
        return
    hint = suggest(metric, [*VALIDATION_METRICS, *STEP_METRICS, "val/IoU/<class index>"], "Reported metrics")
    raise ConfigError(f"{path}: training never reports {metric!r}{hint}")


def _check_grid(values: Sequence[Any], path: str) -> None:
    if not values:
        raise ConfigError(f"{path}: an empty grid; list at least one value or leave the key out")
    if len(set(values)) != len(values):
        raise ConfigError(f"{path}: repeated values {list(values)}")


# --------------------------------------------------------------------------------------------
# The resolved sweep
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: its config and the base experiment every trial starts from."""

    config: SweepConfig
    #: The base experiment with ``experiment:`` merged in and local paths absolute.
    base: ExperimentConfig
    source: str

    @property
    def storage(self) -> str:
        """The parent of the sweep directory, absolute if local."""
        root = self.config.storage or f"{self.base.storage.path.rstrip('/')}/sweeps"
        return root.rstrip("/") if storage.is_remote(root) else str(Path(root).expanduser().resolve())

    @property
    def directory(self) -> str:
        return f"{self.storage}/{self.config.name}"

    @property
    def runs_root(self) -> str:
        """Each trial's Ray Train run goes to ``<sweep dir>/runs/<trial run name>``."""
        return f"{self.directory}/runs"

    @property
    def endpoint(self) -> str | None:
        return self.base.storage.endpoint

    @property
    def max_t(self) -> int:
        return self.config.scheduler.max_t or self.base.optim.max_iters

    def trial_config(self, params: Mapping[str, Any], run_name: str) -> ExperimentConfig:
        """The experiment a trial with ``params`` runs (validated), named ``run_name``."""
        data = to_dict(self.base)
        for key in SEARCH_KEYS:
            if key.name in params:
                _set_path(data, key.path, key.kind(params[key.name]))
        if params.get("backbone") in self.config.search.pretrained:
            data["model"]["pretrained"] = self.config.search.pretrained[params["backbone"]]
        data["name"] = run_name
        data["storage"]["path"] = self.runs_root
        # Each trial keeps its best checkpoints by the sweep's metric, and the training loop
        # marks reports without a fresh value of it (see hrt_ray.tune.trial).
        data["checkpoint"]["metric"] = self.config.metric
        data["checkpoint"]["mode"] = self.config.mode
        return from_dict(data, source=f"trial {run_name}")

    def saved(self) -> dict[str, Any]:
        """What goes into ``<sweep dir>/sweep.yaml``."""
        return {"sweep": dataclasses.asdict(self.config), "base_experiment": to_dict(self.base)}


def trial_run_name(trial_id: str, params: Mapping[str, Any]) -> str:
    """``<trial id>-w13-lr2.0e-04``: unique (the id) and readable; stable across resumes."""
    return "-".join([trial_id, *(k.run_label(params[k.name]) for k in SEARCH_KEYS if k.name in params)])


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Load a sweep YAML, apply ``KEY=VALUE`` overrides, resolve and validate its base experiment."""
    source = str(path)
    raw = read_mapping(path, "sweep config")
    try:
        apply_overrides(raw, overrides, SweepConfig)
        cfg: SweepConfig = build_checked(SweepConfig, raw, "")
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    base_path = None
    if cfg.base is not None:
        base_path = Path(cfg.base).expanduser()
        if not base_path.is_absolute():
            base_path = (Path(path).resolve().parent / base_path).resolve()
        cfg = dataclasses.replace(cfg, base=str(base_path))
    base = load_config(base_path)
    data = deep_merge(to_dict(base), cfg.experiment)
    try:
        merged = from_dict(data, source="experiment")
    except ConfigError as exc:
        raise ConfigError(
            f"{source}: {exc} (keys under 'experiment' merged over {base_path or 'the defaults'})"
        ) from None
    return _finish(cfg, merged, source)


def load_saved_sweep(uri: str, endpoint: str | None = None) -> Sweep:
    """The sweep saved in a sweep directory (``--resume DIR``)."""
    file_uri = f"{uri.rstrip('/')}/{SWEEP_FILE}"
    try:
        data = yaml.safe_load(storage.read_bytes(file_uri, endpoint))
    except storage.StorageError as exc:
        raise ConfigError(f"{file_uri}: no saved sweep here ({exc}); is {uri} a sweep directory?") from None
    return sweep_from_saved(data, file_uri)


def sweep_from_saved(data: Any, source: str = "saved sweep") -> Sweep:
    """Rebuild (and re-check) a :class:`Sweep` from :meth:`Sweep.saved` output."""
    if not isinstance(data, Mapping) or not {"sweep", "base_experiment"} <= set(data):
        raise ConfigError(f"{source}: not a saved sweep (expected keys 'sweep' and 'base_experiment')")
    try:
        cfg: SweepConfig = build_checked(SweepConfig, data["sweep"], "sweep")
        cfg.validate("sweep")
        base = from_dict(data["base_experiment"], source="base_experiment")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return _finish(cfg, base, source)


def _finish(cfg: SweepConfig, base: ExperimentConfig, source: str) -> Sweep:
    """Absolute local paths (trials run elsewhere), then every cross-key check."""
    base = from_dict(worker_config(base), source="experiment")
    # Saved absolute, so `--resume DIR` from another directory finds the same sweep.
    storage_root = Sweep(config=cfg, base=base, source=source).storage
    sweep = Sweep(config=dataclasses.replace(cfg, storage=storage_root), base=base, source=source)
    try:
        _check_against_base(sweep)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return sweep


def _check_against_base(sweep: Sweep) -> None:
    cfg, base = sweep.config, sweep.base
    # deferred: the model registry imports torch; a mistake in the sweep file is reported before it loads
    from hrt_ray.models import list_models

    models = list_models()
    for i, arch in enumerate(cfg.search.backbone or []):
        if arch not in models:
            raise ConfigError(f"search.backbone[{i}]: unknown model {arch!r}; known: {', '.join(models)}")
    for arch in cfg.search.pretrained:
        if arch not in (cfg.search.backbone or []):
            raise ConfigError(f"search.pretrained.{arch}: not one of search.backbone {cfg.search.backbone}")
    if cfg.search.backbone and base.model.pretrained:
        missing = [a for a in cfg.search.backbone if a != base.model.arch and a not in cfg.search.pretrained]
        if missing:
            raise ConfigError(
                f"search.backbone: {missing} would load the base's model.pretrained={base.model.pretrained} "
                f"(made for {base.model.arch}); give search.pretrained.<backbone> for each"
            )
    if cfg.scheduler.kind == "asha" and cfg.scheduler.grace_period > sweep.max_t:
        raise ConfigError(
            f"scheduler.grace_period: {cfg.scheduler.grace_period} iterations is beyond the last rung "
            f"({'scheduler.max_t' if cfg.scheduler.max_t else 'experiment optim.max_iters'}={sweep.max_t})"
        )
    if cfg.scheduler.max_t is not None and cfg.scheduler.max_t > base.optim.max_iters:
        raise ConfigError(
            f"scheduler.max_t: {cfg.scheduler.max_t} is beyond the experiment's optim.max_iters="
            f"{base.optim.max_iters}; no trial reports past it"
        )
    if cfg.metric.startswith("val/") and base.eval.interval > base.optim.max_iters:
        raise ConfigError(
            f"metric: {cfg.metric!r} is reported at validation only, and eval.interval={base.eval.interval} "
            f"> optim.max_iters={base.optim.max_iters}; only the final report would carry it"
        )
    # Every grid trial's experiment must be valid now, not when its turn comes hours later.
    lows = cfg.search.lr.loguniform or [None]
    for point in cfg.search.grid_points():
        for lr in lows:
            params = dict(point, **({"lr": lr} if lr is not None else {}))
            try:
                sweep.trial_config(params, trial_run_name("check", params))
            except ConfigError as exc:
                raise ConfigError(
                    f"search: the trial with {params} is not a valid experiment: {exc}"
                ) from None

