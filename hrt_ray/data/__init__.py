"""Datasets, shards and the Ray Data streaming pipeline (see ``pipeline.py`` for the design).

Public interface::

    get_spec(name_or_path) -> DatasetSpec          # built-in name or a spec YAML path
    ensure_synthetic(cfg) -> None                  # generate the default dataset if missing
    build_datasets(cfg) -> {"train": Dataset, "val": Dataset}
    iter_batches(shard, batch_size, *, epoch, train, prefetch_batches=2)
        -> {"image": float32 (N,3,H,W), "mask": int64 (N,H,W), 255 = ignore}
    write_shards(dst, num_inputs, make_record, *, spec, split, ...) -> manifest
"""

from hrt_ray.data.codec import DataError
from hrt_ray.data.pipeline import bad_records, build_datasets, iter_batches, resolve_spec
from hrt_ray.data.shards import Record, read_manifest, write_shards
from hrt_ray.data.specs import DatasetSpec, SpecError, get_spec
from hrt_ray.data.synth import ensure_synthetic, synth

__all__ = [
    "DataError",
    "DatasetSpec",
    "Record",
    "SpecError",
    "bad_records",
    "build_datasets",
    "ensure_synthetic",
    "get_spec",
    "iter_batches",
    "read_manifest",
    "resolve_spec",
    "synth",
    "write_shards",
]
