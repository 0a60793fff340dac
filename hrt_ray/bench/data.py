"""``hrt-ray bench data``: augmented crops/s of the Ray Data pipeline vs a plain torch DataLoader.

Both paths run the same work per record (decode the original bytes from the shards, map the
labels, the official train augmentation, normalise) with the same number of processes:
Ray Data with ``num_cpus=procs`` (read + decode/augment tasks) and a ``DataLoader`` with
``num_workers=procs``. Each path runs ``--epochs`` epochs; the figure is the steady rate of the last
epoch, from its first batch to its last, so worker start-up and pipeline fill are excluded (the
crops column counts the crops timed). Per-core figures divide by ``procs``.
"""

from __future__ import annotations

import argparse
import os
import time

import pyarrow.parquet as pq
import ray
import torch
from torch.utils.data import DataLoader

from hrt_ray import storage
from hrt_ray.config import load_config
from hrt_ray.data.map_tasks import decode_pair, record_seed
from hrt_ray.data.pipeline import build_datasets, iter_batches
from hrt_ray.data.shards import read_manifest, shard_uris
from hrt_ray.data.specs import get_spec, spec_from_dict
from hrt_ray.data.transforms import AugmentParams, TrainAugment


def _steady_rate(batch_sizes) -> tuple[float, int]:
    """Crops/s from the first batch to the last (pipeline fill excluded), and crops counted."""
    t0, n = None, 0
    for size in batch_sizes:
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += size
    elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
    return (n / elapsed if elapsed > 0 else 0.0), n


class _ShardDataset:
    """Map-style torch dataset over the shards: one row group cached per worker process."""

    def __init__(self, src: str, endpoint: str | None, spec, params):
        self.src, self.endpoint, self.spec, self.params = src, endpoint, spec, params
        self.index: list[tuple[str, int, int]] = []
        for uri in shard_uris(src, read_manifest(src, endpoint)):
            loc = storage.resolve(uri, endpoint)
            with loc.filesystem.open_input_file(loc.path) as f:
                meta = pq.ParquetFile(f).metadata
            for rg in range(meta.num_row_groups):
                self.index += [(uri, rg, i) for i in range(meta.row_group(rg).num_rows)]
        self._cache: tuple | None = None
        self._augment = None

    def __len__(self) -> int:
        return len(self.index)

    def _row_group(self, uri: str, rg: int):
        if self._cache is None or self._cache[:2] != (uri, rg):
            loc = storage.resolve(uri, self.endpoint)
            with loc.filesystem.open_input_file(loc.path) as f:
                self._cache = (uri, rg, pq.ParquetFile(f).read_row_group(rg).to_pydict())
        return self._cache[2]

    def __getitem__(self, i: int):
        if self._augment is None:
            self._augment = TrainAugment(self.params)
        uri, rg, row = self.index[i]
        cols = self._row_group(uri, rg)
        key = cols["key"][row]
        info = {"num_classes": self.spec.num_classes, "ignore_index": self.spec.ignore_index}
        image, mask = decode_pair(cols["image"][row], cols["mask"][row], f"shard {uri} record {key!r}",
                                   self.spec.lut(), info, "RGB")
        img, msk = self._augment(image, mask, record_seed(0, 0, key))
        return torch.from_numpy(img), torch.from_numpy(msk.astype("int64"))


def _bench_torch(src: str, endpoint: str | None, spec, params, procs: int, batch: int, epochs: int) -> tuple:
    torch.set_num_threads(1)
    ds = _ShardDataset(src, endpoint, spec, params)
    # Sequential order keeps each worker on one row group at a time, as Ray reads whole blocks.
    loader = DataLoader(ds, batch_size=batch, num_workers=procs, drop_last=True, persistent_workers=True,
                        prefetch_factor=2)
    rate, n = 0.0, 0
    for _ in range(epochs):
        rate, n = _steady_rate(images.shape[0] for images, _masks in loader)
    return rate, n


def _bench_ray(src: str, endpoint: str | None, dataset: str | None, crop, procs: int, batch: int,
               epochs: int) -> tuple:
    ray.init(num_cpus=procs, include_dashboard=False, log_to_driver=False,
             object_store_memory=2 << 30)
    try:
        overrides = [f"data.train_uri={src}", f"data.val_uri={src}", f"data.crop_size=[{crop[0]},{crop[1]}]",
                     f"data.dataset={dataset or 'synthetic'}", "scaling.num_workers=1"]
        if endpoint:
            overrides.append(f"storage.endpoint={endpoint}")
        cfg = load_config(None, overrides)
        train = build_datasets(cfg)["train"]
        rate, n = 0.0, 0
        for epoch in range(epochs):
            batches = iter_batches(train, batch, epoch=epoch, train=True, shuffle_buffer=0)
            rate, n = _steady_rate(b["image"].shape[0] for b in batches)
        return rate, n
    finally:
        ray.shutdown()


def run(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.src, args.endpoint)
    spec = get_spec(args.dataset) if args.dataset else spec_from_dict(manifest["spec"], args.src)
    if not args.dataset and spec.name != "synthetic":
        args.dataset = spec.name
    params = AugmentParams(crop_size=tuple(args.crop), base_short_side=spec.base_short_side,
                           ignore_index=spec.ignore_index)
    print(f"source {args.src}: {manifest['num_records']} records ({spec.name}), crop "
          f"{args.crop[0]}x{args.crop[1]}, batch {args.batch}, timed epoch {args.epochs} of {args.epochs}; "
          f"machine has {os.cpu_count()} cores")
    print(f"{'path':<18}{'procs':>6}{'crops/s':>12}{'crops/s/core':>15}{'crops':>8}")
    for procs in args.procs:
        if not args.skip_ray:
            rate, n = _bench_ray(args.src, args.endpoint, args.dataset, args.crop, procs, args.batch,
                                 args.epochs)
            print(f"{'ray-data':<18}{procs:>6}{rate:>12.2f}{rate / procs:>15.2f}{n:>8}", flush=True)
        if not args.skip_torch:
            rate, n = _bench_torch(args.src, args.endpoint, spec, params, procs, args.batch, args.epochs)
            print(f"{'torch-dataloader':<18}{procs:>6}{rate:>12.2f}{rate / procs:>15.2f}{n:>8}", flush=True)
    return 0
