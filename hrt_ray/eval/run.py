"""``hrt-ray eval``: a checkpoint's per-class IoU on the validation set, over Ray workers.

Each Ray Train worker runs inference on its split of the validation set (every image exactly
once across workers) at the configured scales/flip, whole-image or sliding-window; the
confusion matrices are summed with one all-reduce and rank 0 returns the total. The table is
printed and written as JSON and CSV beside the checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any, Literal

import ray.train
import ray.train.torch
import torch

from hrt_ray import storage
from hrt_ray.config import ExperimentConfig, TargetComparison, from_dict
from hrt_ray.data import build_datasets, ensure_synthetic, iter_batches, resolve_num_classes, resolve_spec
from hrt_ray.eval.inference import autocast_dtype, confusion_over
from hrt_ray.eval.metrics import metrics_from_confusion
from hrt_ray.models import build_model, load_checkpoint
from hrt_ray.train.state import CHECKPOINT_FILE
from hrt_ray.train.trainer import TrainError, build_trainer, check_resources
from hrt_ray.train.watchdog import iter_with_timeout

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin")


def checkpoint_file(uri: str) -> str:
    """A checkpoint file URI: ``uri`` itself, or ``uri/checkpoint.pt`` for a checkpoint dir."""
    if uri.endswith(CHECKPOINT_SUFFIXES):
        return uri
    return f"{uri.rstrip('/')}/{CHECKPOINT_FILE}"


def scale_kind(cfg: ExperimentConfig) -> Literal["ss", "ms"]:
    """``ss`` for a single-scale test, ``ms`` for a multi-scale one (the papers' two columns)."""
    return "ss" if len(cfg.eval.scales) == 1 else "ms"


def setting_tag(cfg: ExperimentConfig) -> str:
    """E.g. ``whole-ms0.75_1_1.25-flip``: names the result files after the test setting."""
    scales = "_".join(f"{s:g}" for s in cfg.eval.scales)
    return f"{cfg.eval.mode}-{scale_kind(cfg)}{scales}" + ("-flip" if cfg.eval.flip else "")


def eval_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: load the checkpoint, infer on this worker's validation split."""
    cfg = from_dict(config["cfg"], source="eval_loop_config", training=False)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and cfg.scaling.cpus_per_worker >= 1:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    num_classes = resolve_num_classes(cfg)
    model = build_model(cfg.model.arch, num_classes, window_size=cfg.model.window_size)
    load_checkpoint(model, config["checkpoint"], endpoint=cfg.storage.endpoint)
    model = model.to(device)
    batches = iter_with_timeout(
        iter_batches(
            ray.train.get_dataset_shard("val"), cfg.eval.batch_size, epoch=0, train=False, prefetch_batches=1
        ),
        cfg.failure.stall_timeout_s,
        stage=f"evaluation data (rank {rank})",
    )
    start = time.perf_counter()
    matrix = confusion_over(
        model,
        batches,
        num_classes,
        cfg,
        device,
        autocast_dtype(cfg, device),
        scales=cfg.eval.scales,
        flip=cfg.eval.flip,
    )
    return {"confusion": matrix.cpu().tolist(), "seconds": time.perf_counter() - start}


@dataclass
class EvalResult:
    checkpoint: str
    setting: str
    miou: float
    pixel_acc: float
    mean_acc: float
    classes: list[str]
    iou: list[float]
    support: list[int]
    confusion: list[list[int]]
    json_uri: str
    csv_uri: str
    #: ``ss`` or ``ms`` (:func:`scale_kind`): which published figure the result is held against.
    scales: Literal["ss", "ms"] = "ss"
    #: The config's published mIoU for this setting beside ours; ``None`` when it gives none.
    target: TargetComparison | None = None

    def table(self) -> str:
        width = max(12, *(len(c) for c in self.classes))
        rows = [f"{'class':<{width}}  {'IoU':>7}  {'pixels':>12}"]
        for name, iou, n in zip(self.classes, self.iou, self.support, strict=True):
            value = "    n/a" if iou != iou else f"{100 * iou:7.2f}"
            rows.append(f"{name:<{width}}  {value}  {n:>12d}")
        rows.append(f"{'mIoU':<{width}}  {100 * self.miou:7.2f}")
        rows.append(f"{'pixel acc':<{width}}  {100 * self.pixel_acc:7.2f}")
        return "\n".join(rows)

    def summary_lines(self) -> list[str]:
        """What ``hrt-ray eval`` prints under the table: the setting, the files, the target."""
        out = [f"setting {self.setting}; written {self.json_uri} and {self.csv_uri}"]
        if self.target is not None:
            out.append(self.target.line())
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "setting": self.setting,
            "mIoU": self.miou,
            "pixel_acc": self.pixel_acc,
            "mean_acc": self.mean_acc,
            "per_class": [
                {"class": c, "iou": None if i != i else i, "pixels": n}
                for c, i, n in zip(self.classes, self.iou, self.support, strict=True)
            ],
            "confusion": self.confusion,
            "target": None if self.target is None else self.target.as_json(),
        }


def class_names(cfg: ExperimentConfig, num_classes: int) -> list[str]:
    try:
        names = list(resolve_spec(cfg).class_names)
    except Exception:  # a spec without names still gets a table, by index
        names = []
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: str) -> EvalResult:
    """Evaluate ``checkpoint`` (file or checkpoint dir URI) with ``cfg.eval`` on Ray workers."""
    ckpt_file = checkpoint_file(checkpoint)
    if not storage.exists(ckpt_file, cfg.storage.endpoint):
        raise FileNotFoundError(f"{ckpt_file}: checkpoint not found")
    if cfg.scaling.check_resources:
        check_resources(cfg, num_workers=max(1, cfg.scaling.num_workers))
    if cfg.data.dataset == "synthetic":
        ensure_synthetic(cfg)
    val = build_datasets(cfg)["val"]
    # At least one worker, in a fixed group: evaluation is one pass, with nothing to resize for.
    scaling = replace(cfg.scaling, num_workers=max(1, cfg.scaling.num_workers), min_workers=None)
    with tempfile.TemporaryDirectory(prefix="hrt-eval-") as scratch:
        # The eval run's own bookkeeping goes to scratch; results go beside the checkpoint.
        eval_cfg = replace(cfg, scaling=scaling, storage=replace(cfg.storage, path=scratch))
        trainer = build_trainer(
            eval_cfg,
            {"val": val},
            loop=eval_loop_per_worker,
            name=f"{cfg.name}-eval-{int(time.time() * 1000)}",
            extra_config={"checkpoint": ckpt_file},
        )
        try:
            result = trainer.fit()
        except Exception as exc:
            raise TrainError(f"evaluation of {ckpt_file} failed: {exc}") from exc
    matrix = torch.tensor(result.return_value["confusion"], dtype=torch.int64)
    out = eval_result(cfg, ckpt_file, matrix)
    storage.write_bytes(out.json_uri, json.dumps(out.as_json(), indent=2).encode(), cfg.storage.endpoint)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["class", "iou", "pixels"])
    for c, i, n in zip(out.classes, out.iou, out.support, strict=True):
        writer.writerow([c, "" if i != i else f"{i:.6f}", n])
    writer.writerow(["mIoU", f"{out.miou:.6f}", sum(out.support)])
    storage.write_bytes(out.csv_uri, buf.getvalue().encode(), cfg.storage.endpoint)
    return out


def eval_result(cfg: ExperimentConfig, ckpt_file: str, matrix: torch.Tensor) -> EvalResult:
    """The result of a summed confusion ``matrix`` under ``cfg``'s test setting and target."""
    metrics = metrics_from_confusion(matrix)
    base = ckpt_file.rsplit("/", 1)[0]
    tag = setting_tag(cfg)
    kind = scale_kind(cfg)
    return EvalResult(
        checkpoint=ckpt_file,
        setting=tag,
        miou=metrics.miou,
        pixel_acc=metrics.pixel_acc,
        mean_acc=metrics.mean_acc,
        classes=class_names(cfg, matrix.shape[0]),
        iou=metrics.iou,
        support=metrics.support,
        confusion=matrix.tolist(),
        json_uri=f"{base}/eval-{tag}.json",
        csv_uri=f"{base}/eval-{tag}.csv",
        scales=kind,
        target=cfg.target.compare(metrics.miou, kind),
    )
