"""The per-worker training function run by Ray Train's ``TorchTrainer``.

One worker: build the model, resume from ``ray.train.get_checkpoint()`` if the run has one,
wrap in DDP, then loop over its shard of the training data by iteration. Every
``checkpoint.every`` iterations (and after each validation) every rank calls
``ray.train.report`` (a barrier) and rank 0 attaches a checkpoint written atomically to a
temporary directory. Validation sums one confusion matrix over all workers.

Each of those is a named step, a method of :class:`WorkerState` (the worker's model, optimizer
and progress), so :func:`train_loop_per_worker` reads as their sequence and each step can be
tested alone. The step itself (:func:`train_step`) and the validation (:func:`validate`) are
free functions so the single-process benchmark runs exactly the same code without Ray; the loop
looks ``train_step`` up in this module at every call, which is where tests inject faults.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from hrt_ray import storage
from hrt_ray.config import ExperimentConfig, from_dict
from hrt_ray.data import LabelledPixelGuard, iter_batches, resolve_num_classes
from hrt_ray.eval.inference import autocast_dtype, confusion_over
from hrt_ray.eval.metrics import SegMetrics, metrics_from_confusion
from hrt_ray.models import build_model, load_checkpoint
from hrt_ray.storage import RetryPolicy
from hrt_ray.train.ddp_layout import align_parameter_layouts, probe_batch
from hrt_ray.train.loss import segmentation_loss
from hrt_ray.train.meter import Meter
from hrt_ray.train.optim import build_optimizer, build_scheduler
from hrt_ray.train.resume import apply_optim_config, resume_state
from hrt_ray.train.state import rng_state, seed_everything, set_rng_state, unwrap
from hrt_ray.train.upload import checkpoint_upload_mode, remove_orphaned_checkpoint_dirs, report_checkpoint
from hrt_ray.train.watchdog import iter_with_timeout


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stops before any checkpoint of the broken state."""


class NonFiniteStateError(NonFiniteLossError):
    """Parameters, buffers or optimizer state became NaN/inf (e.g. a finite but huge loss stepped
    the weights to inf); raised instead of writing the checkpoint, so none of a broken state exists."""


# --------------------------------------------------------------------------------------------
# Building blocks shared by the Ray loop and the plain-process benchmark
# --------------------------------------------------------------------------------------------


def build_grad_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A grad scaler for fp16 (whose range needs one; bf16 has fp32's range), on ``device``'s type."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def non_finite_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters, buffers and optimizer-state tensors holding a NaN or inf.

    One fused pass: the max-abs norm of every floating tensor (``torch._foreach_norm`` with
    ``ord=inf``, which is finite exactly when every element is, and no overflow of a sum of
    squares), then one ``isfinite`` over those norms; names are looked up only if one is bad.
    """
    named: list[tuple[str, torch.Tensor]] = [
        (f"model.{n}", t) for n, t in [*model.named_parameters(), *model.named_buffers()]
    ]
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    named.append((f"optimizer.{names.get(id(p), '?')}.{key}", value))
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return []
    norms = torch._foreach_norm([t.detach() for _, t in named], float("inf"))
    finite = torch.isfinite(torch.stack([n.double() for n in norms]))
    if bool(finite.all()):
        return []
    return [n for (n, _), ok in zip(named, finite.tolist(), strict=True) if not ok]


def build_training_model(
    cfg: ExperimentConfig, num_classes: int, device: torch.device, world_gpus: int
) -> nn.Module:
    """The model on ``device`` with pretrained/initial weights; SyncBN only with >1 GPU worker."""
    model = build_model(
        cfg.model.arch,
        num_classes,
        window_size=cfg.model.window_size,
        drop_path_rate=cfg.model.drop_path_rate,
        activation_checkpointing=cfg.model.activation_checkpointing,
        channels_last=cfg.model.channels_last,
    )
    if cfg.model.pretrained:
        load_checkpoint(model, cfg.model.pretrained, endpoint=cfg.storage.endpoint)
    if cfg.model.init_checkpoint:
        load_checkpoint(model, cfg.model.init_checkpoint, endpoint=cfg.storage.endpoint)
    if world_gpus > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device)


def loss_kwargs(cfg: ExperimentConfig, device: torch.device) -> dict[str, Any]:
    weights = None
    if cfg.loss.class_weights is not None:
        weights = torch.tensor(cfg.loss.class_weights, dtype=torch.float32, device=device)
    return {
        "ohem": cfg.loss.ohem,
        "ohem_thresh": cfg.loss.ohem_thresh,
        "ohem_min_kept": cfg.loss.ohem_min_kept,
        "aux_weight": cfg.loss.aux_weight,
        "ignore_index": cfg.loss.ignore_index,
        "class_weights": weights,
    }


@dataclass
class StepResult:
    loss: torch.Tensor
    skipped: bool = False


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    loss_args: dict[str, Any],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    *,
    grad_clip: float | None = None,
    channels_last: bool = False,
) -> StepResult:
    """One optimisation step. Raises :class:`NonFiniteLossError` unless a grad scaler handles it.

    The forward runs under autocast (``amp_dtype``); the loss runs outside it, in fp32. With an
    fp16 ``scaler`` a step whose gradients hold inf/NaN is skipped (weights and optimizer state
    untouched) and the scale backs off; ``StepResult.skipped`` says so.
    """
    images = batch["image"].to(device, non_blocking=True)
    masks = batch["mask"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    )
    with autocast:
        outputs = model(images)
    # The losses run in fp32 whatever the autocast dtype (segmentation_loss casts up).
    loss, _ = segmentation_loss(outputs, masks, **loss_args)
    if not bool(torch.isfinite(loss.detach())) and scaler is None:
        # scheduler.last_epoch counts the steps done; this one would be iteration last_epoch + 1.
        raise NonFiniteLossError(
            f"non-finite loss ({float(loss.detach())}) at iteration {scheduler.last_epoch + 1}; "
            "this step was not applied"
        )
    optimizer.zero_grad(set_to_none=True)
    skipped = False
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale_before
    else:
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    scheduler.step()
    return StepResult(loss=loss.detach(), skipped=skipped)


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Any,
    num_classes: int,
    cfg: ExperimentConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> SegMetrics:
    """Single-scale metrics over all workers, as validation during training reports them."""
    return metrics_from_confusion(confusion_over(model, batches, num_classes, cfg, device, amp_dtype))


# --------------------------------------------------------------------------------------------
# Metrics bookkeeping
# --------------------------------------------------------------------------------------------


def _mean_across_workers(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats).

    DDP broadcasts buffers at the start of each *training* forward, so right after a step each
    rank still holds the running stats of its own last batch; validating with those would make
    ranks disagree with each other and with the checkpoint, which holds rank 0's.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def _gather_objects(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _TensorBoard:
    """Rank 0's event files, in ``<run dir>/tensorboard`` (uploaded after each report if remote)."""

    def __init__(self, run_uri: str, endpoint: str | None, retry: Any = None) -> None:
        self.retry = retry
        self.remote = storage.is_remote(run_uri)
        self.target = f"{run_uri.rstrip('/')}/tensorboard"
        self.endpoint = endpoint
        self.local = Path(tempfile.mkdtemp(prefix="hrt-tb-")) if self.remote else Path(self.target)
        self.local.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.local))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()
        if self.remote:
            for path in self.local.iterdir():
                storage.write_bytes(
                    f"{self.target}/{path.name}", path.read_bytes(), endpoint=self.endpoint, retry=self.retry
                )

    def close(self) -> None:
        self.writer.close()
        if self.remote:  # everything is on storage after each report; the local copy is scratch
            shutil.rmtree(self.local, ignore_errors=True)


def _last_checkpoint_text(iteration: int | None) -> str:
    if iteration is None:
        return "this run has no checkpoint yet"
    return f"the last checkpoint (reported; the run resumes from it) is at iteration {iteration}"


def _any_across_workers(flag: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# --------------------------------------------------------------------------------------------
# The worker: its state and the named steps of one worker's run
# --------------------------------------------------------------------------------------------


@dataclass
class WorkerState:
    """One worker's training: what it trains with and where it is, and the named steps that move it.

    :func:`train_loop_per_worker` reads as the sequence of these steps, as Ray's examples do: set
    up, resume, distribute, then passes over the shard with a report (a barrier, with rank 0's
    checkpoint) every ``checkpoint.every`` iterations and after each validation. Each step is a
    method so it can be tested alone; those that make no Ray call need no Ray.
    """

    cfg: ExperimentConfig
    #: The config exactly as the driver passed it; every checkpoint records it.
    cfg_dict: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    num_classes: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    loss_args: dict[str, Any]
    guard: LabelledPixelGuard
    #: ``model``, or its DDP / compiled wrapper once :meth:`distribute` ran: what steps train.
    train_model: nn.Module | None = None
    iteration: int = 0
    data_epoch: int = 0
    best: float | None = None
    history: list[list[float]] = field(default_factory=list)
    resumed_from: int | None = None
    #: The iteration of the last checkpoint this run has (None: none yet), for accurate errors.
    last_checkpoint: int | None = None
    meter: Meter = field(default_factory=Meter)
    preempt_saved: bool = False  # one just-in-time checkpoint per worker group and notice
    upload_mode: Any = None  # Ray's CheckpointUploadMode (see hrt_ray.train.upload)
    pending_dir: str | None = None  # the local dir of the checkpoint whose async upload may still run
    tb: _TensorBoard | None = None  # rank 0 only
    val_shard: Any = None
    #: Pictures for TensorBoard come from the caller (``hrt_ray.infer.visualize``): passed in,
    #: because training must not import the layers built on top of it.
    val_panel: Callable[..., Any] | None = None

    # ---- set-up and resume ------------------------------------------------------------------

    @classmethod
    def set_up(
        cls, cfg: ExperimentConfig, cfg_dict: dict[str, Any], rank: int, world: int, device: torch.device
    ) -> WorkerState:
        """Model, optimizer, schedule and grad scaler on ``device``, seeded per rank."""
        if device.type == "cpu" and cfg.scaling.cpus_per_worker >= 1:
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        amp_dtype = autocast_dtype(cfg, device)
        num_classes = resolve_num_classes(cfg)
        seed_everything(cfg.seed * 1000 + rank)
        model = build_training_model(cfg, num_classes, device, world if device.type == "cuda" else 0)
        optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
        o = cfg.optim
        scheduler = build_scheduler(optimizer, o.max_iters, o.warmup_iters, o.warmup_ratio, o.poly_power)
        guard = LabelledPixelGuard(
            cfg.loss.ignore_index,
            where=f"rank {rank}: ",
            hint=f" (data.dataset={cfg.data.dataset}, shards {cfg.data.train_uri})",
        )
        return cls(
            cfg=cfg,
            cfg_dict=cfg_dict,
            rank=rank,
            world=world,
            device=device,
            amp_dtype=amp_dtype,
            num_classes=num_classes,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=build_grad_scaler(amp_dtype, device),
            loss_args=loss_kwargs(cfg, device),
            guard=guard,
        )

    def resume(self, saved: dict[str, Any] | None) -> None:
        """Continue from ``saved`` (a checkpoint's state; ``None``: start afresh)."""
        if saved is not None:
            unwrap(self.model).load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            apply_optim_config(self.optimizer, self.scheduler, self.cfg)  # an accepted change applies
            if self.scaler is not None and saved.get("scaler"):
                self.scaler.load_state_dict(saved["scaler"])
            self.iteration = int(saved["iteration"])
            # The partly seen epoch is not replayed: Ray Data's split order is not reproducible,
            # so the data continues at the next epoch boundary.
            self.data_epoch = int(saved["data_epoch"]) + 1
            self.best = saved.get("best")
            self.history = [list(h) for h in saved.get("history", [])]
            rngs = saved.get("rng") or []
            if len(rngs) == self.world:
                set_rng_state(rngs[self.rank])
            else:  # world size changed (elastic): derive fresh, distinct streams
                seed_everything(self.cfg.seed * 1000 + self.rank + 7919 * self.iteration)
            self.resumed_from = self.iteration
        self.last_checkpoint = self.resumed_from

    def distribute(self) -> None:
        """Wrap the (restored) model for training: DDP over >1 worker, then ``torch.compile``.

        After :meth:`resume`: DDP broadcasts rank 0's weights when it wraps them.
        """
        self.train_model = self.model
        if self.world > 1:
            # Parameters in their gradients' layout: no "Grad strides do not match bucket view strides".
            cfg = self.cfg
            probe = probe_batch(cfg.data.crop_size, self.num_classes, self.device, cfg.model.channels_last)
            align_parameter_layouts(self.model, *probe, self.loss_args, self.amp_dtype)
            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.train_model = DistributedDataParallel(self.model, **ddp_kwargs)
        if self.cfg.model.compile:
            self.train_model = torch.compile(self.train_model)
        self.train_model.train()

    # ---- one pass over the shard --------------------------------------------------------------

    def train_batches(self, shard: Any) -> Any:
        """This data epoch's training batches of ``shard``, each wait bounded by the stall timeout."""
        cfg = self.cfg
        return iter_with_timeout(
            iter_batches(
                shard,
                cfg.data.batch_size // max(self.world, 1),
                epoch=self.data_epoch,
                train=True,
                prefetch_batches=cfg.data.prefetch_batches,
            ),
            cfg.failure.stall_timeout_s,
            stage=f"training data (rank {self.rank}, epoch {self.data_epoch})",
        )

    def one_pass(self, batches: Any) -> int:
        """Train on ``batches`` (one data epoch) until they or ``optim.max_iters`` run out.

        Reports (see :meth:`due`) come between steps; their time counts as neither step nor data
        wait. Returns the number of steps taken.
        """
        steps = 0
        wait_started = time.perf_counter()
        for batch in batches:
            self.step(batch, wait_started)
            steps += 1
            validate_now, report_now = self.due()
            if report_now:
                self.report_window(validate_now)
            if self.iteration >= self.cfg.optim.max_iters:
                break
            wait_started = time.perf_counter()
        return steps

    def step(self, batch: dict[str, torch.Tensor], wait_started: float) -> None:
        """One optimisation step (:func:`train_step`, looked up at call time), metered."""
        t_step = time.perf_counter()
        self.guard.update(batch["mask"])
        self.meter.wait_s += t_step - wait_started
        try:
            result = train_step(
                self.train_model,
                batch,
                self.optimizer,
                self.scheduler,
                self.scaler,
                self.loss_args,
                self.device,
                self.amp_dtype,
                grad_clip=self.cfg.optim.grad_clip,
                channels_last=self.cfg.model.channels_last,
            )
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(
                f"{exc}; nothing after iteration {self.last_checkpoint or 0} was saved, "
                f"{_last_checkpoint_text(self.last_checkpoint)}. Lower optim.lr, raise "
                "optim.warmup_iters, or use optim.amp=fp16, whose grad scaler skips such steps"
            ) from None
        self.iteration += 1
        self.meter.steps += 1
        self.meter.images += int(batch["image"].shape[0])
        self.meter.loss_sum += float(result.loss)
        self.meter.skipped += int(result.skipped)
        self.meter.busy_s += time.perf_counter() - t_step

    def due(self) -> tuple[bool, bool]:
        """(validate now, report now) after a step: every rank answers the same at every iteration,
        since a report is a barrier. A preemption notice brings one just-in-time checkpoint."""
        it, cfg = self.iteration, self.cfg
        validate_now = it % cfg.eval.interval == 0 or it == cfg.optim.max_iters
        report_now = validate_now or it % cfg.checkpoint.every == 0
        if not report_now and not self.preempt_saved and cfg.failure.checkpoint_on_preemption:
            # A barrier every rank reaches at the same iterations (Ray requires that).
            notice = ray.train.get_preemption_info()
            if notice is not None:
                report_now = self.preempt_saved = True
                if self.rank == 0:
                    print(
                        f"preemption notice for ranks {notice.preempted_ranks}: "
                        f"checkpointing at iteration {it}",
                        flush=True,
                    )
        return validate_now, report_now

    # ---- report, checkpoint, validation ------------------------------------------------------

    def report_window(self, validate_now: bool) -> None:
        """Report the window's training metrics (and a validation), with a checkpoint; new window."""
        metrics: dict[str, Any] = self.meter.summary(self.world)
        metrics["train/loss"] = _mean_across_workers(metrics["train/loss"], self.device)
        metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
        if validate_now:
            metrics.update(self.validation())
            self.history.append([float(self.iteration), metrics["val/mIoU"]])
        self.report(metrics, with_checkpoint=True)
        self.meter = Meter()

    def validate_at_start(self) -> None:
        """The untrained model's validation (``eval.at_start``), reported without a checkpoint."""
        val = self.validation()
        self.history.append([0.0, val["val/mIoU"]])
        self.report(val, with_checkpoint=False)

    def validation(self) -> dict[str, float]:
        """Validation metrics over every worker's val shard (``val/`` names); rank 0 draws pictures."""
        broadcast_buffers(self.model)
        batches = iter_with_timeout(
            iter_batches(self.val_shard, self.cfg.eval.batch_size, epoch=0, train=False, prefetch_batches=1),
            self.cfg.failure.stall_timeout_s,
            stage=f"validation data (rank {self.rank}, iteration {self.iteration})",
        )
        metrics = validate(self.model, batches, self.num_classes, self.cfg, self.device, self.amp_dtype)
        if self.tb is not None and self.val_panel is not None:  # rank 0: pictures of the first val samples
            self.val_panel(
                self.tb.writer, self.model, self.cfg, self.num_classes, self.device, self.iteration
            )
        return metrics.as_report("val/")

    def report(self, metrics: dict[str, Any], with_checkpoint: bool) -> None:
        """Every rank's ``ray.train.report`` (a barrier); rank 0 attaches the checkpoint."""
        if with_checkpoint:
            self.check_finite()
        metrics = self.with_progress(metrics)
        if self.tb is not None:
            self.tb.log({k: v for k, v in metrics.items() if "/" in k}, self.iteration)
        rngs = _gather_objects(rng_state()) if with_checkpoint else None
        if self.rank == 0 and with_checkpoint:
            self.pending_dir = report_checkpoint(
                metrics,
                self.checkpoint_state(rngs),
                self.upload_mode,
                self.pending_dir,
                self.cfg.failure.stall_timeout_s,
            )
        else:
            ray.train.report(metrics, checkpoint=None)
        if with_checkpoint:
            self.last_checkpoint = self.iteration

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteStateError` if any rank's weights or optimizer state are NaN/inf.

        Every rank checks (and agrees), so no rank waits at the report barrier for a rank that
        stopped; the state is checked before anything is written.
        """
        bad = non_finite_state(unwrap(self.model), self.optimizer)
        if _any_across_workers(bool(bad), self.device):
            more = " ..." if len(bad) > 5 else ""
            which = f" ({', '.join(bad[:5])}{more} on rank {self.rank})" if bad else ""
            raise NonFiniteStateError(
                f"non-finite weights or optimizer state after iteration {self.iteration}{which}; "
                f"no checkpoint of it was saved, {_last_checkpoint_text(self.last_checkpoint)}. Lower "
                "optim.lr or raise optim.warmup_iters (or set optim.grad_clip) and run again"
            )

    def with_progress(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` plus iteration, data epoch and the best ``checkpoint.metric`` so far.

        A metric not measured in this report is absent from it (no sentinel score): Ray ranks a
        checkpoint without ``checkpoint.metric`` as -inf, below every measured one, for mode=max;
        run_checks refuses mode=min for validation metrics, which can be absent.
        """
        value = metrics.get(self.cfg.checkpoint.metric)
        better = (lambda a, b: a > b) if self.cfg.checkpoint.mode == "max" else (lambda a, b: a < b)
        if value is not None and (self.best is None or better(value, self.best)):
            self.best = float(value)
        out = {**metrics, "iteration": self.iteration, "data_epoch": self.data_epoch}
        if self.best is not None:
            out["best"] = self.best
        return out

    def checkpoint_state(self, rngs: list[Any] | None) -> dict[str, Any]:
        """What a checkpoint holds (``rngs``: every rank's RNG state, by rank)."""
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "iteration": self.iteration,
            "data_epoch": self.data_epoch,
            "best": self.best,
            "history": self.history,
            "rng": rngs,
            "arch": self.cfg.model.arch,
            "num_classes": self.num_classes,
            "config": self.cfg_dict,
        }

    def result(self) -> dict[str, Any]:
        """The worker's return value (``result.return_value`` is rank 0's)."""
        return {
            "iteration": self.iteration,
            "best": self.best,
            "history": self.history,
            "resumed_from": self.resumed_from,
        }


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. ``config``: ``{"cfg": to_dict(cfg), "run_uri": str, "val_panel": ...}``."""
    cfg = from_dict(config["cfg"], source="train_loop_config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker = WorkerState.set_up(cfg, config["cfg"], rank, world, ray.train.torch.get_device())
    # The newest complete checkpoint on storage or Ray's registered one, whichever is later.
    saved, _ = resume_state(ray.train.get_checkpoint(), config["run_uri"], cfg)
    worker.resume(saved)
    worker.upload_mode = checkpoint_upload_mode(cfg)
    if rank == 0:
        remove_orphaned_checkpoint_dirs()
    worker.distribute()

    train_shard = ray.train.get_dataset_shard("train")
    worker.val_shard = ray.train.get_dataset_shard("val")
    worker.val_panel = config.get("val_panel")
    if rank == 0:
        retry = RetryPolicy.from_config(cfg.storage)
        worker.tb = _TensorBoard(config["run_uri"], cfg.storage.endpoint, retry)
    if worker.iteration == 0 and cfg.eval.at_start:
        worker.validate_at_start()

    worker.meter = Meter()
    try:
        while worker.iteration < cfg.optim.max_iters:
            if worker.one_pass(worker.train_batches(train_shard)) == 0:
                raise RuntimeError(
                    f"rank {rank}: the training shard of {cfg.data.train_uri} yielded no batch of "
                    f"{cfg.data.batch_size // max(world, 1)} in epoch {worker.data_epoch} (too few "
                    f"samples for data.batch_size over {world} workers?)"
                )
            if worker.iteration < cfg.optim.max_iters:
                worker.guard.end_epoch(worker.data_epoch)
                worker.data_epoch += 1
    finally:
        if worker.tb is not None:
            worker.tb.close()
    return worker.result()
