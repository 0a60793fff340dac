"""What Ray Data's CPU tasks do to each block of records: decode, map labels, augment or normalise.

These functions go into the datasets' plans (``map_batches``), and cloudpickle stores a
module-level function by reference: every process that unpickles a plan imports this module.
Besides the map tasks that is the driver, Ray Train's dataset manager and one split coordinator
per dataset and run, none of which augment. So this module imports only NumPy, pyarrow, Ray and
the codecs at its top; the augmentation stack (albumentations, which pulls in torch: about 3
CPU-seconds per process on the 2-core development box, 2026-12-07) loads inside the map task.
The train task's augmentation settings travel as a plain dict for the same reason.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from hrt_ray.data.codec import DataError, check_sizes, decode_image, decode_mask, map_mask

log = logging.getLogger(__name__)

#: Key prefix of the all-ignore copies that pad the validation set to a multiple of the workers.
PAD_PREFIX = "__pad__/"


def record_seed(seed: int, epoch: int, key: str) -> int:
    """The augmentation seed of one record in one epoch (independent of batching and workers)."""
    return int(np.random.SeedSequence([seed, epoch, zlib.crc32(key.encode())]).generate_state(1)[0])


def decode_pair(
    row_image: bytes, row_mask: bytes, where: str, lut: np.ndarray, spec_info: dict, channel_order: str
) -> tuple[np.ndarray, np.ndarray]:
    image = decode_image(row_image, where, channel_order)
    raw = decode_mask(row_mask, where)
    check_sizes(image, raw, where)
    mask = map_mask(raw, lut, spec_info["num_classes"], spec_info["ignore_index"], where)
    return image, mask


def _skip_or_raise(exc: DataError, where: str, state: Any, max_bad: int) -> None:
    """Fail on a bad record, or count it against ``max_bad_records`` and log the skip."""
    if max_bad <= 0 or state is None:
        raise exc
    count = ray.get(state.report_bad.remote(where, str(exc)))
    if count > max_bad:
        raise DataError(
            f"{exc} (this makes {count} bad records, more than data.max_bad_records={max_bad})"
        )
    log.warning("skipping bad record %d/%d: %s", count, max_bad, exc)


def _where(path: str, key: str) -> str:
    return f"shard {path} record {str(key)!r}"


def _decoded_records(
    batch: dict[str, np.ndarray],
    lut: np.ndarray,
    spec_info: dict,
    channel_order: str,
    state: Any,
    max_bad: int,
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(key, image, mask)`` of each record of ``batch`` that decodes; a bad one fails or is skipped."""
    for key, img_bytes, mask_bytes, path in zip(
        batch["key"], batch["image"], batch["mask"], batch["path"], strict=True
    ):
        where = _where(path, key)
        try:
            image, mask = decode_pair(img_bytes, mask_bytes, where, lut, spec_info, channel_order)
        except DataError as exc:
            _skip_or_raise(exc, where, state, max_bad)
            continue
        yield str(key), image, mask


def train_udf(
    batch: dict[str, np.ndarray],
    *,
    state: Any,
    params: dict[str, Any],
    lut: np.ndarray,
    spec_info: dict,
    channel_order: str,
    max_bad: int,
) -> pa.Table:
    read: dict[str, int] = {}
    for path in batch["path"]:
        read[str(path)] = read.get(str(path), 0) + 1
    seed, epoch = ray.get(state.begin.remote(read))
    # deferred: albumentations pulls in torch; only map tasks augment, not the plan's other holders
    from hrt_ray.data.transforms import AugmentParams, TrainAugment

    augment = TrainAugment(AugmentParams(**params))
    keys, images, masks = [], [], []
    for key, image, mask in _decoded_records(batch, lut, spec_info, channel_order, state, max_bad):
        img, msk = augment(image, mask, record_seed(seed, epoch, key))
        keys.append(key)
        images.append(img.tobytes())
        masks.append(msk.tobytes())
    h, w = augment.params.crop_size
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "image": pa.array(images, pa.binary()),
            "mask": pa.array(masks, pa.binary()),
            "height": pa.array([h] * len(keys), pa.int32()),
            "width": pa.array([w] * len(keys), pa.int32()),
        }
    )


def val_udf(
    batch: dict[str, np.ndarray],
    *,
    state: Any,
    lut: np.ndarray,
    spec_info: dict,
    channel_order: str,
    max_bad: int,
) -> pa.Table:
    # deferred: albumentations pulls in torch; only map tasks normalise, not the plan's other holders
    from hrt_ray.data.transforms import normalize

    keys, images, masks, hs, ws = [], [], [], [], []
    for key, image, mask in _decoded_records(batch, lut, spec_info, channel_order, state, max_bad):
        if key.startswith(PAD_PREFIX):
            mask = np.full_like(mask, spec_info["ignore_index"])
        keys.append(key)
        images.append(normalize(image).tobytes())
        masks.append(np.ascontiguousarray(mask).tobytes())
        hs.append(image.shape[0])
        ws.append(image.shape[1])
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "image": pa.array(images, pa.binary()),
            "mask": pa.array(masks, pa.binary()),
            "height": pa.array(hs, pa.int32()),
            "width": pa.array(ws, pa.int32()),
        }
    )
