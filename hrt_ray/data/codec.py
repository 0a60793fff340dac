"""Decoding and validating one image/mask record, shared by prepare, check and the pipelines.

Every failure raises :class:`DataError` with a ``where`` prefix (a file path, or
``shard ... record ...``), so a bad record is found by name rather than by bisecting a run.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

cv2.setNumThreads(1)  # parallelism comes from Ray tasks / DataLoader workers, not OpenCV threads


class DataError(ValueError):
    """A record (or URI) is unusable; the message names it and says what is wrong."""


def decode_image(data: bytes, where: str, channel_order: str = "RGB") -> np.ndarray:
    """Encoded bytes (PNG/JPEG/...) -> ``(H, W, 3)`` uint8 in ``channel_order``."""
    if not data:
        raise DataError(f"{where}: image is empty")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{where}: image does not decode (corrupt or unsupported format)")
    if channel_order == "RGB":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def decode_mask(data: bytes, where: str) -> np.ndarray:
    """Encoded single-channel PNG (mode L or P, values are labels) -> ``(H, W)`` uint8."""
    if not data:
        raise DataError(f"{where}: mask is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "P", "1", "I;16", "I"):
                raise DataError(
                    f"{where}: mask must be a single-channel label image (mode L or P), got mode {im.mode}"
                )
            arr = np.array(im)
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types for truncated/corrupt files
        raise DataError(f"{where}: mask does not decode ({exc})") from exc
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataError(f"{where}: mask values exceed 8 bits (max {arr.max()})")
        arr = arr.astype(np.uint8)
    return arr


def map_mask(raw: np.ndarray, lut: np.ndarray, num_classes: int, ignore_index: int, where: str) -> np.ndarray:
    """Apply a spec's lookup table; raise naming the offending raw values if any are invalid."""
    mapped = lut[raw]
    if (mapped < 0).any():
        bad = np.unique(raw[mapped < 0])
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise DataError(
            f"{where}: mask holds label values outside the dataset's range "
            f"(classes 0..{num_classes - 1}, ignore {ignore_index}): {shown}"
        )
    return mapped.astype(np.uint8)


def check_sizes(image: np.ndarray, mask: np.ndarray, where: str) -> None:
    if image.shape[:2] != mask.shape[:2]:
        raise DataError(
            f"{where}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
            f"{image.shape[1]}x{image.shape[0]} (WxH)"
        )


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 ``(H, W)`` or ``(H, W, 3)`` RGB -> PNG bytes."""
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise DataError("cannot encode PNG")
    return buf.tobytes()

