"""Datasets, shards and the Ray Data streaming pipeline (see ``pipeline.py`` for the design).

Public interface::

    get_spec(name_or_path) -> DatasetSpec          # built-in name or a spec YAML path
    ensure_synthetic(cfg) -> None                  # generate the default dataset if missing
    build_datasets(cfg) -> {"train": Dataset, "val": Dataset}
    iter_batches(shard, batch_size, *, epoch, train, prefetch_batches=2)
        -> {"image": float32 (N,3,H,W), "mask": int64 (N,H,W), 255 = ignore}
    write_shards(dst, num_inputs, make_record, *, spec, split, ...) -> manifest

Names resolve lazily (PEP 562): ``hrt-ray data --help`` imports this package, and the
augmentation stack (albumentations pulls in torch) must not load before a command runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "hrt_ray.data.codec",
    "LabelledPixelGuard": "hrt_ray.data.guard",
    "bad_records": "hrt_ray.data.pipeline",
    "build_datasets": "hrt_ray.data.pipeline",
    "iter_batches": "hrt_ray.data.pipeline",
    "resolve_num_classes": "hrt_ray.data.pipeline",
    "resolve_spec": "hrt_ray.data.pipeline",
    "skipped_records": "hrt_ray.data.pipeline",
    "Record": "hrt_ray.data.shards",
    "read_manifest": "hrt_ray.data.shards",
    "write_shards": "hrt_ray.data.shards",
    "DatasetSpec": "hrt_ray.data.specs",
    "SpecError": "hrt_ray.data.specs",
    "get_spec": "hrt_ray.data.specs",
    "ensure_synthetic": "hrt_ray.data.synth",
    "synth": "hrt_ray.data.synth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hrt_ray.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
