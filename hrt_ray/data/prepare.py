"""``hrt-ray data prepare``: a dataset's on-disk layout -> validated Parquet shards at any URI.

Every pair is decoded and checked before it is written (both decode, sizes match, every label
value maps to a class or the ignore label), so a bad file is reported by path once, here,
instead of crashing a multi-GPU run hours later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from hrt_ray.data.codec import DataError, check_sizes, decode_image, decode_mask, encode_png, map_mask
from hrt_ray.data.layouts import Pair, find_pairs
from hrt_ray.data.shards import Record, write_shards
from hrt_ray.data.specs import DatasetSpec, get_spec

log = logging.getLogger(__name__)


@dataclass
class PrepareResult:
    manifest: dict
    bad: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad


def validate_pair(pair: Pair, spec: DatasetSpec, lut: np.ndarray) -> Record:
    """Read and check one pair; the returned record holds the original bytes (mask possibly converted)."""
    if pair.image is None:
        raise DataError(f"{pair.mask}: mask has no matching image")
    if pair.mask is None:
        raise DataError(f"{pair.image}: image has no matching mask")
    try:
        image_bytes = pair.image.read_bytes()
        mask_bytes = pair.mask.read_bytes()
    except OSError as exc:
        raise DataError(f"{exc.filename}: cannot read: {exc.strerror}") from exc
    image = decode_image(image_bytes, str(pair.image))
    raw = decode_mask(mask_bytes, str(pair.mask))
    if pair.convert == "plus_one":
        raw = np.where(raw == 255, 0, raw.astype(np.int16) + 1).astype(np.uint8)
        mask_bytes = encode_png(raw)
    check_sizes(image, raw, f"{pair.image} / {pair.mask}")
    map_mask(raw, lut, spec.num_classes, spec.ignore_index, str(pair.mask))
    return Record(pair.key, image_bytes, mask_bytes, int(image.shape[0]), int(image.shape[1]))


def prepare(
    dataset: str,
    src: str,
    dst: str,
    split: str,
    *,
    endpoint: str | None = None,
    records_per_shard: int = 64,
    threads: int = 4,
) -> PrepareResult:
    """Convert ``src`` (the dataset's standard layout) into shards under ``dst``."""
    spec = get_spec(dataset)
    if spec.layout == "synthetic":
        raise DataError("the synthetic dataset is generated, not prepared: use `hrt-ray data synth`")
    pairs = find_pairs(spec.layout, src, split)
    lut = spec.lut()
    log.info("%s %s: %d pairs from %s -> %s", spec.name, split, len(pairs), src, dst)
    manifest = write_shards(
        dst,
        len(pairs),
        lambda i: validate_pair(pairs[i], spec, lut),
        spec=spec,
        split=split,
        records_per_shard=records_per_shard,
        endpoint=endpoint,
        threads=threads,
        extra={"source": str(src)},
    )
    return PrepareResult(manifest, [b["error"] for b in manifest["bad"]])
