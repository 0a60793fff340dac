"""One confusion matrix as the single source of every segmentation metric.

Each worker counts ``(true, predicted)`` pixel pairs with one ``bincount`` (ignore label masked
out), the matrices are summed across workers with one all-reduce, and IoU / accuracy are derived
from the sum. Averaging per-worker mIoUs instead would weight workers, not pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """``(C, C)`` int64 counts; rows = ground truth, columns = prediction."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    index = target[keep] * num_classes + pred[keep]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def all_reduce_confusion(matrix: Tensor) -> Tensor:
    """Sum the matrix over the process group (no-op outside distributed runs)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        matrix = matrix.clone()
        dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
    return matrix


@dataclass
class SegMetrics:
    miou: float
    pixel_acc: float
    mean_acc: float
    #: Per-class IoU; ``nan`` for a class absent from both ground truth and prediction.
    iou: list[float]
    #: Pixels of each class in the ground truth.
    support: list[int]

    def as_report(self, prefix: str = "val/", class_names: list[str] | None = None) -> dict[str, float]:
        out = {
            f"{prefix}mIoU": self.miou,
            f"{prefix}pixel_acc": self.pixel_acc,
            f"{prefix}mean_acc": self.mean_acc,
        }
        names = class_names or [str(i) for i in range(len(self.iou))]
        for name, value in zip(names, self.iou, strict=False):
            if not math.isnan(value):
                out[f"{prefix}IoU/{name}"] = value
        return out


def metrics_from_confusion(matrix: Tensor) -> SegMetrics:
    """mIoU over classes present in ground truth or prediction, pixel and mean class accuracy."""
    m = matrix.double().cpu()
    tp = m.diag()
    gt = m.sum(1)
    pred = m.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    total = float(m.sum())
    return SegMetrics(
        miou=float(torch.nanmean(iou)) if bool((union > 0).any()) else 0.0,
        pixel_acc=float(tp.sum() / total) if total else 0.0,
        mean_acc=float(torch.nanmean(acc)) if bool((gt > 0).any()) else 0.0,
        iou=[float(v) for v in iou],
        support=[int(v) for v in gt],
    )
