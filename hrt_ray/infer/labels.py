"""Turning class-index maps into files people and benchmark servers read.

Why a lookup table per direction: the model predicts *train ids* (0..K-1); an official benchmark
server (e.g. Cityscapes) wants the dataset's *original* label ids. The dataset spec already holds
the raw -> train mapping (``DatasetSpec.lut``); inverting that one table keeps a single source of
truth instead of a second hand-written list.
"""

from __future__ import annotations

import numpy as np

from hrt_ray.data.specs import DatasetSpec

#: Colour of ignored / unlabelled pixels in pictures.
IGNORE_COLOR = (0, 0, 0)


def train_to_original_lut(spec: DatasetSpec) -> np.ndarray:
    """Train id -> original label id (uint8, 256 entries; ``ignore_index`` maps to itself).

    With a ``label_mapping`` several raw ids may share one train id; the smallest raw id is
    used (for Cityscapes each evaluated class has exactly one label id). ``reduce_zero_label``
    datasets shift back by one. Train ids without any raw id (impossible for a valid spec) map
    to the ignore label.
    """
    lut = np.full(256, spec.ignore_index, dtype=np.uint8)
    if spec.label_mapping is not None:
        for raw, train_id in sorted(spec.label_mapping.items(), reverse=True):
            if train_id != spec.ignore_index:
                lut[train_id] = raw
    elif spec.reduce_zero_label:
        lut[: spec.num_classes] = np.arange(1, spec.num_classes + 1)
    else:
        lut[: spec.num_classes] = np.arange(spec.num_classes)
    lut[spec.ignore_index] = spec.ignore_index
    return lut


def to_label_image(pred: np.ndarray, spec: DatasetSpec, ids: str = "train") -> np.ndarray:
    """``(H, W)`` train-id map -> uint8 label image in ``ids`` ("train" or "original")."""
    if ids not in ("train", "original"):
        raise ValueError(f"ids must be 'train' or 'original', got {ids!r}")
    pred = pred.astype(np.uint8, copy=False)
    return train_to_original_lut(spec)[pred] if ids == "original" else pred


def palette_lut(spec: DatasetSpec) -> np.ndarray:
    """Train id -> RGB (``(256, 3)`` uint8): the spec palette, :data:`IGNORE_COLOR` elsewhere."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = IGNORE_COLOR
    lut[: spec.num_classes] = np.asarray(spec.palette, dtype=np.uint8)
    return lut


def colorize(labels: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """``(H, W)`` train ids (``ignore_index`` allowed) -> ``(H, W, 3)`` RGB in the dataset palette."""
    return palette_lut(spec)[labels.astype(np.uint8, copy=False)]


def overlay(image: np.ndarray, labels: np.ndarray, spec: DatasetSpec, alpha: float = 0.5) -> np.ndarray:
    """RGB ``image`` blended with the palette colours of ``labels`` (``alpha`` = colour weight)."""
    colours = colorize(labels, spec).astype(np.float32)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
