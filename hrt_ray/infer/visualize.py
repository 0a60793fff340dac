"""``hrt-ray visualize`` and the training loop's TensorBoard panel: input | truth | prediction | errors.

Why a picture: mIoU says *how much* is wrong, a panel shows *what* -- a class confused with its
neighbour, a border offset, a whole object missed. Each row is one validation sample; columns are
the input, the ground truth and the prediction in the dataset palette, and an error map (correct
pixels black, wrong ones red, ignored ones grey). Samples are the first ``n`` validation records,
read straight from the shards (no Ray needed), so successive panels show the same images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from hrt_ray.data.codec import decode_image, decode_mask, map_mask
from hrt_ray.data.pipeline import resolve_spec
from hrt_ray.data.shards import iter_records
from hrt_ray.data.specs import DatasetSpec
from hrt_ray.eval.inference import eval_window
from hrt_ray.infer.labels import colorize
from hrt_ray.infer.model import InferenceOptions, Segmenter

#: Pixels between tiles and rows, and the height of the column-title strip.
GAP = 4
HEADER = 20
MAX_TILE_WIDTH = 512
TITLES = ("input", "ground truth", "prediction", "errors")
BACKGROUND = (255, 255, 255)
CORRECT_COLOR = (0, 0, 0)
WRONG_COLOR = (255, 0, 0)
IGNORED_COLOR = (128, 128, 128)

log = logging.getLogger(__name__)

Sample = tuple[str, np.ndarray, np.ndarray]  # key, RGB uint8 (H, W, 3), train ids uint8 (H, W)


def error_map(truth: np.ndarray, pred: np.ndarray, ignore_index: int) -> np.ndarray:
    """RGB map: :data:`CORRECT_COLOR` / :data:`WRONG_COLOR`, :data:`IGNORED_COLOR` where ignored."""
    out = np.empty((*truth.shape, 3), np.uint8)
    out[:] = CORRECT_COLOR
    out[truth != pred] = WRONG_COLOR
    out[truth == ignore_index] = IGNORED_COLOR
    return out


def _tile(arr: np.ndarray, width: int, nearest: bool) -> np.ndarray:
    h, w = arr.shape[:2]
    if w == width:
        return arr
    height = max(1, round(h * width / w))
    return cv2.resize(arr, (width, height), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def make_panel(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    spec: DatasetSpec,
    tile_width: int | None = None,
) -> np.ndarray:
    """``(image, truth, pred)`` rows -> one RGB uint8 picture with a title strip.

    Tiles are ``tile_width`` wide (default: the first image's width, at most
    :data:`MAX_TILE_WIDTH`); label tiles are resized with nearest neighbour so every pixel keeps a
    palette colour. Size: ``4 * tile_width + 3 * GAP`` by ``HEADER + sum(row heights) + GAP * (n - 1)``.
    """
    if not rows:
        raise ValueError("make_panel needs at least one (image, truth, pred) row")
    width = int(tile_width or min(rows[0][0].shape[1], MAX_TILE_WIDTH))
    strips = []
    for image, truth, pred in rows:
        tiles = [
            _tile(image, width, nearest=False),
            _tile(colorize(truth, spec), width, nearest=True),
            _tile(colorize(pred, spec), width, nearest=True),
            _tile(error_map(truth, pred, spec.ignore_index), width, nearest=True),
        ]
        h = tiles[0].shape[0]
        strip = np.empty((h, 4 * width + 3 * GAP, 3), np.uint8)
        strip[:] = BACKGROUND
        for i, tile in enumerate(tiles):
            x = i * (width + GAP)
            strip[:, x : x + width] = tile[:h]
        strips.append(strip)
    total_h = HEADER + sum(s.shape[0] for s in strips) + GAP * (len(strips) - 1)
    panel = np.empty((total_h, 4 * width + 3 * GAP, 3), np.uint8)
    panel[:] = BACKGROUND
    scale = min(0.45, 0.45 * width / 120)
    for i, title in enumerate(TITLES):
        cv2.putText(
            panel, title, (i * (width + GAP) + 2, HEADER - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1
        )
    y = HEADER
    for strip in strips:
        panel[y : y + strip.shape[0]] = strip
        y += strip.shape[0] + GAP
    return panel


def load_val_samples(cfg: Any, n: int, spec: DatasetSpec | None = None) -> list[Sample]:
    """The first ``n`` validation records of ``cfg.data.val_uri``, decoded, masks as train ids."""
    spec = spec or resolve_spec(cfg)
    lut = spec.lut()
    samples = []
    for shard, row in iter_records(cfg.data.val_uri, cfg.storage.endpoint, limit=n):
        where = f"{cfg.data.val_uri} shard {shard} record {row['key']}"
        image = decode_image(row["image"], where, "RGB")
        mask = map_mask(decode_mask(row["mask"], where), lut, spec.num_classes, spec.ignore_index, where)
        samples.append((str(row["key"]), image, mask))
    return samples


def panel_for(segmenter: Any, samples: Sequence[Sample]) -> tuple[np.ndarray, list[float]]:
    """Predict ``samples`` with a :class:`~hrt_ray.infer.model.Segmenter`; panel + per-sample pixel acc."""
    preds = segmenter([image for _, image, _ in samples])
    spec = segmenter.spec
    accs = []
    for (_, _, truth), pred in zip(samples, preds, strict=True):
        valid = truth != spec.ignore_index
        accs.append(float((pred[valid] == truth[valid]).mean()) if valid.any() else float("nan"))
    return make_panel(
        [(img, truth, p) for (_, img, truth), p in zip(samples, preds, strict=True)], spec
    ), accs


_SAMPLE_CACHE: dict[tuple[str, int], list[Sample]] = {}


def add_tensorboard_panel(
    writer: Any, model: Any, cfg: Any, num_classes: int, device: Any, step: int, n: int = 4
) -> bool:
    """Write the panel of ``model`` on the first ``n`` validation samples as image ``val/panel``.

    Called by the training loop (rank 0) after each validation; single-scale inference as
    validation uses. Samples are read once per process and cached. A picture is never worth a
    failed run: any error is logged as a warning and ``False`` returned.
    """
    try:
        key = (cfg.data.val_uri, n)
        if key not in _SAMPLE_CACHE:
            _SAMPLE_CACHE[key] = load_val_samples(cfg, n)
        options = InferenceOptions(mode=cfg.eval.mode, scales=(1.0,), flip=False, **_window(cfg))
        segmenter = Segmenter(cfg, model, num_classes, resolve_spec(cfg), device, options=options)
        panel, _ = panel_for(segmenter, _SAMPLE_CACHE[key])
        writer.add_image("val/panel", panel, step, dataformats="HWC")
    except Exception as exc:  # any failure: warn, keep training
        log.warning("validation panel at step %d not written: %s: %s", step, type(exc).__name__, exc)
        return False
    return True


def _window(cfg: Any) -> dict[str, Any]:
    crop, stride = eval_window(cfg)
    return {"crop": tuple(crop) if crop else None, "stride": tuple(stride) if stride else None}
