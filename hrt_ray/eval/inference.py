"""Test-time inference: whole image or sliding window, at one or several scales, with flip.

The official HRT evaluation sums class probabilities over the scales 0.75/1.0/1.25 and their
horizontal flips (``ms_test``); Cityscapes' 1024x2048 images may also be cut into overlapping
crops (``slide``) so memory stays bounded. Each path returns probabilities at the input size,
so the caller takes ``argmax`` once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hrt_ray.config import ExperimentConfig
from hrt_ray.eval.metrics import all_reduce_confusion, confusion_matrix

Model = Callable[[Tensor], dict[str, Tensor]]


def _logits(model: Model, image: Tensor, size: tuple[int, int]) -> Tensor:
    out = model(image)["out"].float()
    if tuple(out.shape[-2:]) != size:
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
    return out


def whole_logits(model: Model, image: Tensor) -> Tensor:
    """Logits of the whole image at its own size."""
    return _logits(model, image, tuple(image.shape[-2:]))


def _starts(length: int, crop: int, stride: int) -> list[int]:
    n = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, length - crop), 0) for i in range(n)})


def slide_logits(
    model: Model, image: Tensor, num_classes: int, crop: Sequence[int], stride: Sequence[int]
) -> Tensor:
    """Logits averaged over overlapping ``crop`` windows every ``stride`` pixels.

    An image smaller than the crop is zero-padded right/bottom to the crop (as the official
    ``only_pad`` alignment) and the padding is cut off again.
    """
    n, _, h, w = image.shape
    ch, cw = int(crop[0]), int(crop[1])
    sh, sw = int(stride[0]), int(stride[1])
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    padded = F.pad(image, (0, pw, 0, ph)) if ph or pw else image
    hh, ww = padded.shape[-2:]
    total = padded.new_zeros((n, num_classes, hh, ww), dtype=torch.float32)
    count = padded.new_zeros((1, 1, hh, ww), dtype=torch.float32)
    for y in _starts(hh, ch, sh):
        for x in _starts(ww, cw, sw):
            window = padded[:, :, y : y + ch, x : x + cw]
            total[:, :, y : y + ch, x : x + cw] += _logits(model, window, tuple(window.shape[-2:]))
            count[:, :, y : y + ch, x : x + cw] += 1
    return (total / count)[:, :, :h, :w]


def predict_probs(
    model: Model,
    image: Tensor,
    num_classes: int,
    *,
    mode: str = "whole",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crop: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
) -> Tensor:
    """Softmax probabilities ``(N, C, H, W)`` summed over scales (and flips), at input size."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("slide inference needs crop and stride")
    h, w = image.shape[-2:]
    total = image.new_zeros((image.shape[0], num_classes, h, w), dtype=torch.float32)
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = (
            image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        )
        views = [(scaled, False), (scaled.flip(-1), True)] if flip else [(scaled, False)]
        for view, flipped in views:
            if mode == "slide":
                logits = slide_logits(model, view, num_classes, crop, stride)  # type: ignore[arg-type]
            else:
                logits = whole_logits(model, view)
            if flipped:
                logits = logits.flip(-1)
            if tuple(logits.shape[-2:]) != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            total += logits.softmax(dim=1)
    return total


@torch.no_grad()
def predict(model: Model, image: Tensor, num_classes: int, **kwargs) -> Tensor:
    """Class index map ``(N, H, W)``; see :func:`predict_probs` for the options."""
    return predict_probs(model, image, num_classes, **kwargs).argmax(dim=1)


# --------------------------------------------------------------------------------------------
# What validation during training, evaluation and prediction share
# --------------------------------------------------------------------------------------------


def autocast_dtype(cfg: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``optim.amp`` asks for, on GPU and CPU alike (``None``: fp32).

    CPU autocast is a real feature on CPUs with bf16 units, and it runs the same mixed-precision
    code path as a GPU (half activations, fp32 softmax in the OCR head and fp32 loss), so the
    AMP path is tested on machines without a GPU too.
    """
    if cfg.optim.amp == "off":
        return None
    return torch.bfloat16 if cfg.optim.amp == "bf16" else torch.float16


def eval_window(cfg: ExperimentConfig) -> tuple[list[int] | None, list[int] | None]:
    """Sliding-window crop and stride: as configured, else the training crop and 2/3 of it."""
    crop = cfg.eval.crop_size or cfg.data.crop_size
    stride = cfg.eval.stride or ([max(1, (2 * c) // 3) for c in crop] if crop else None)
    return crop, stride


def confusion_over(
    model: nn.Module,
    batches: Any,
    num_classes: int,
    cfg: ExperimentConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    *,
    scales: list[float] | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """The confusion matrix of ``batches`` summed over all workers (every rank must call it)."""
    was_training = model.training
    model.eval()
    crop, stride = eval_window(cfg)
    matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    )
    with autocast:
        for batch in batches:
            images = batch["image"].to(device)
            masks = batch["mask"].to(device)
            pred = predict(
                model,
                images,
                num_classes,
                mode=cfg.eval.mode,
                scales=scales or [1.0],
                flip=flip,
                crop=crop,
                stride=stride,
            )
            matrix += confusion_matrix(pred, masks, num_classes, cfg.loss.ignore_index)
    model.train(was_training)
    return all_reduce_confusion(matrix)
