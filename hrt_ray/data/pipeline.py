"""The streaming Ray Data pipeline: shards -> decoded, augmented, fixed-size crops -> train workers.

Built on the driver by :func:`build_datasets` and handed to ``TorchTrainer(datasets=...)``;
each worker iterates its shard with :func:`iter_batches`. Decoding and augmentation run in Ray
Data CPU tasks (``map_batches``), never in the training process, and nothing is materialised:
Ray Data streams blocks with backpressure, so memory stays bounded however large the dataset.

How a crop learns its epoch (the "identical random crops every epoch" pitfall): Ray Train
re-executes the dataset each epoch, but a ``map_batches`` function cannot see which epoch that
is. A tiny :class:`PipelineState` actor, whose handle travels in the dataset's
``DataContext``, holds the epoch each split consumer announced in :func:`iter_batches`; the
augmentation seeds every record with ``(run seed, epoch, record key)``. The epoch it reads is the
minimum over the splits, so an early finisher announcing ``epoch + 1`` cannot change crops that
slower splits are still receiving; the streaming-split barrier guarantees every split has
announced before the next epoch's execution starts. Shuffling varies per epoch too: the shard
file order is reshuffled per execution and each worker's local shuffle buffer is seeded with
``(seed, epoch, split)``.

Equal work per worker: Ray Train splits with ``streaming_split(n, equal=True)`` and train
batches drop the remainder, so every worker gets the same number of batches. Validation must
see every image exactly once across workers, but equal splitting drops up to ``n - 1`` rows; the
val dataset is therefore padded to a multiple of the worker count with copies of its first image
whose masks are entirely ignore (they add nothing to a confusion matrix). (A val record skipped
under ``max_bad_records`` breaks that multiple; equal splitting may then drop up to ``n - 1``
images, so fix bad val records rather than skip them.)

Parallelism inside a shard: a Parquet shard is read as one block, and a map task handles one
block, so the read is re-blocked to ``UDF_BATCH`` records (a streaming repartition, no shuffle)
before decode/augment; otherwise one task would decode a whole 64-image shard alone.

The shards are read with Ray Data's V1 Parquet reader (:func:`_parquet_reader`). Ray 2.60's
default V2 reader lists files on every execution, and each listing starts a pool of up to 32
``FooterReader`` actors (new processes, killed at the end) to read footers. Every train epoch
and every validation pass is an execution, and each pass started 13 actor processes plus
prestarted idle workers on a 4-CPU node: 36 to 49 Python processes for a 4-iteration run,
against 15 with V1 (a 4-CPU local instance on the 2-core development box, 2026-12-02, under
varying load; the README has the test-suite times). V1 reads the few footers once, when the
dataset is built; the shard list comes from the manifest anyway.

What the map tasks run lives in ``map_tasks.py`` and the state actor's class in
``pipeline_state.py``: the processes that only hold the plan or the state (Ray Train's dataset
manager, the split coordinators, the state actor) import those modules, and this one would
bring torch and the augmentation stack with it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import reduce
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data import DataContext, Dataset, FileShuffleConfig
from ray.data.collate_fn import NumpyBatchCollateFn

from hrt_ray import storage
from hrt_ray.config import ExperimentConfig
from hrt_ray.data.codec import DataError
from hrt_ray.data.map_tasks import PAD_PREFIX, train_udf, val_udf
from hrt_ray.data.pipeline_state import start_state_actor
from hrt_ray.data.shards import read_manifest, shard_uris
from hrt_ray.data.specs import DatasetSpec, get_spec, spec_from_dict

STATE_KEY = "hrt_ray.data.pipeline_state"
BUFFER_KEY = "hrt_ray.data.shuffle_buffer"
#: Records decoded/augmented per map task call: small blocks keep memory bounded for big crops.
UDF_BATCH = 4


def _filesystem(uri: str, endpoint: str | None):
    return storage.resolve(uri, endpoint).filesystem


def _paths(uri: str, manifest: dict, endpoint: str | None) -> list[str]:
    return [storage.resolve(u, endpoint).path for u in shard_uris(uri, manifest)]


def resolve_spec(cfg: ExperimentConfig) -> DatasetSpec:
    """The run's dataset spec; ``synthetic`` takes its class count from the generated manifest."""
    if cfg.data.dataset == "synthetic":
        try:
            return spec_from_dict(
                read_manifest(cfg.data.train_uri, cfg.storage.endpoint)["spec"], cfg.data.train_uri
            )
        except DataError:
            return get_spec("synthetic", cfg.data.synth.classes)
    return get_spec(cfg.data.dataset)


def resolve_num_classes(cfg: ExperimentConfig) -> int:
    """``model.num_classes`` if set, else the dataset spec's."""
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes
    return int(resolve_spec(cfg).num_classes)


_SPEC_FIELDS = ("num_classes", "ignore_index", "label_mapping", "reduce_zero_label")


def check_spec_matches(spec: DatasetSpec, manifest: dict, uri: str, dataset: str) -> None:
    """Refuse shards written for another dataset than the one the config names.

    The run maps raw mask values with the config's spec; on shards of another dataset that
    mapping is meaningless (``data.dataset=cityscapes`` on synthetic shards turns every pixel
    into ignore: loss 0, mIoU 0, exit 0). The manifest records the spec the shards were written
    with, so the two are compared here, on the driver, before anything trains.
    """
    written = spec_from_dict(manifest["spec"], f"{uri}/manifest.json")
    diffs = [
        f"{name}: {getattr(written, name)!r} in the manifest, {getattr(spec, name)!r} in the run's spec"
        for name in _SPEC_FIELDS
        if getattr(written, name) != getattr(spec, name)
    ]
    if written.name != spec.name or diffs:
        detail = "; ".join(diffs) if diffs else "same label mapping, different name"
        raise DataError(
            f"{uri}: the shards were written for dataset {written.name!r} (manifest.json), but the "
            f"run uses data.dataset={dataset} ({spec.name!r}): {detail}. Point data.train_uri/"
            f"data.val_uri at {spec.name} shards, or set data.dataset to the shards' dataset"
        )


def _shard_problem(loc: Any, expected: int) -> str | None:
    """Why a shard listed in the manifest cannot deliver its ``expected`` records (None if it can)."""
    try:
        info = loc.filesystem.get_file_info(loc.path)
        if info.type.name == "NotFound":
            return "missing"
        if info.size == 0:
            return "zero bytes (Ray Data would skip it silently)"
        with loc.filesystem.open_input_file(loc.path) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable ({exc})"
    if rows != expected:
        return f"holds {rows} records"
    return None


def verify_shards(uri: str, manifest: dict, endpoint: str | None, threads: int = 16) -> list[dict]:
    """Shards of ``manifest`` that cannot deliver their records: ``[{file, records, problem}]``.

    Reads each shard's Parquet footer (one small request per shard), so a zero-byte, truncated
    or missing shard is found before training instead of Ray Data skipping it.
    """
    shards = manifest["shards"]
    locs = [storage.resolve(u, endpoint) for u in shard_uris(uri, manifest)]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        problems = list(pool.map(_shard_problem, locs, [int(s["num_records"]) for s in shards]))
    return [
        {"file": s["file"], "uri": loc.uri, "records": int(s["num_records"]), "problem": p}
        for s, loc, p in zip(shards, locs, problems, strict=True)
        if p is not None
    ]


def readable_manifest(uri: str, manifest: dict, endpoint: str | None, state: Any, max_bad: int) -> dict:
    """``manifest`` without its unreadable shards, whose records count against ``max_bad_records``.

    A shortfall beyond ``max_bad_records`` is a :class:`DataError` naming every affected shard.
    """
    broken = verify_shards(uri, manifest, endpoint)
    if not broken:
        return manifest
    lost = sum(b["records"] for b in broken)
    listing = "; ".join(f"{b['uri']}: {b['problem']} (manifest: {b['records']} records)" for b in broken)
    already = ray.get(state.skipped_records.remote()) if state is not None else 0
    if lost + already > max_bad:
        raise DataError(
            f"{uri}: {len(broken)} of {len(manifest['shards'])} shard(s) cannot deliver the records "
            f"manifest.json lists, {lost} of {manifest['num_records']} records: {listing}. Re-write "
            f"them (`hrt-ray data prepare` / `data synth` skip shards that exist: delete these first) "
            f"or allow skipping them with data.max_bad_records>={lost + already}"
        )
    for b in broken:
        ray.get(state.report_bad.remote(f"shard {b['uri']}", f"{b['problem']}", b["records"]))
    names = {b["file"] for b in broken}
    shards = [s for s in manifest["shards"] if s["file"] not in names]
    return {**manifest, "shards": shards, "num_records": sum(int(s["num_records"]) for s in shards)}


def _pad_rows(uri: str, manifest: dict, endpoint: str | None, count: int) -> list[dict]:
    """``count`` copies of the first record of a shard set, keyed as padding."""
    loc = storage.resolve(shard_uris(uri, manifest)[0], endpoint)
    with loc.filesystem.open_input_file(loc.path) as f:
        first = pq.ParquetFile(f).read_row_group(0).slice(0, 1).to_pylist()[0]
    return [
        {
            **first,
            "key": f"{PAD_PREFIX}{i}",
            "path": "<padding>",
            "height": int(first["height"]),
            "width": int(first["width"]),
        }
        for i in range(count)
    ]


def val_pad_multiple(cfg) -> int:
    """Pad val to a multiple of every worker count the run may have (elastic: min..max)."""
    hi = max(1, cfg.scaling.num_workers)
    lo = cfg.scaling.min_workers or hi
    multiple = reduce(math.lcm, range(lo, hi + 1), 1)
    return multiple if multiple <= 4 * hi * hi else hi


@contextlib.contextmanager
def _parquet_reader() -> Iterator[None]:
    """Route ``read_parquet`` calls inside to Ray Data's V1 reader (see the module docstring).

    ``read_parquet`` picks the reader from the current ``DataContext`` when it is called; the
    flag is restored afterwards so that other datasets of the driver keep Ray's default.
    """
    ctx = DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = before


def build_datasets(cfg) -> dict:
    """``{"train": augmented fixed-size crops, "val": whole images}`` as lazy streaming datasets.

    Raises :class:`DataError` naming the URI when a shard set is missing, empty or unreadable.
    """
    d = cfg.data
    endpoint = cfg.storage.endpoint
    spec = resolve_spec(cfg)
    crop = tuple(d.crop_size) if d.crop_size else spec.crop_size
    spec_info = {"num_classes": spec.num_classes, "ignore_index": spec.ignore_index}
    lut = spec.lut()
    channel_order = d.channel_order
    cpus = cfg.scaling.cpus_per_data_worker

    train_manifest = read_manifest(d.train_uri, endpoint)
    val_manifest = read_manifest(d.val_uri, endpoint)
    for uri, manifest in ((d.train_uri, train_manifest), (d.val_uri, val_manifest)):
        if manifest["num_records"] < 1:
            raise DataError(f"{uri}: the shard set holds no records")
        check_spec_matches(spec, manifest, uri, d.dataset)
    state = start_state_actor(int(cfg.seed), int(d.max_bad_records))
    train_manifest = readable_manifest(d.train_uri, train_manifest, endpoint, state, int(d.max_bad_records))
    train_paths = _paths(d.train_uri, train_manifest, endpoint)
    ray.get(
        state.expect.remote(
            {p: int(s["num_records"]) for p, s in zip(train_paths, train_manifest["shards"], strict=True)}
        )
    )
    val_manifest = readable_manifest(d.val_uri, val_manifest, endpoint, state, int(d.max_bad_records))
    for uri, manifest in ((d.train_uri, train_manifest), (d.val_uri, val_manifest)):
        if manifest["num_records"] < 1:
            raise DataError(f"{uri}: no readable records left after skipping the unreadable shards")

    # transforms.AugmentParams's fields: built into one in the map task (see map_tasks.py)
    params = {
        "crop_size": (int(crop[0]), int(crop[1])),
        "scale_range": (float(d.scale_range[0]), float(d.scale_range[1])),
        "aspect_range": (float(d.aspect_range[0]), float(d.aspect_range[1])),
        "hflip": bool(d.hflip),
        "brightness_shift": float(d.brightness_shift),
        "base_short_side": spec.base_short_side,
        "ignore_index": spec.ignore_index,
    }
    with _parquet_reader():
        train_read = ray.data.read_parquet(
            train_paths,
            filesystem=_filesystem(d.train_uri, endpoint),
            include_paths=True,
            shuffle=FileShuffleConfig(seed=int(cfg.seed), reseed_after_execution=True),
        )
        val_read = ray.data.read_parquet(
            _paths(d.val_uri, val_manifest, endpoint),
            filesystem=_filesystem(d.val_uri, endpoint),
            include_paths=True,
        )
    train = train_read.repartition(target_num_rows_per_block=UDF_BATCH).map_batches(
        train_udf,
        fn_kwargs={
            "state": state,
            "params": params,
            "lut": lut,
            "spec_info": spec_info,
            "channel_order": channel_order,
            "max_bad": int(d.max_bad_records),
        },
        batch_size=UDF_BATCH,
        batch_format="numpy",
        num_cpus=cpus,
    )

    val_kwargs = {
        "state": state,
        "lut": lut,
        "spec_info": spec_info,
        "channel_order": channel_order,
        "max_bad": int(d.max_bad_records),
    }
    val = val_read.repartition(target_num_rows_per_block=UDF_BATCH).map_batches(
        val_udf, fn_kwargs=val_kwargs, batch_size=UDF_BATCH, batch_format="numpy", num_cpus=cpus
    )
    multiple = val_pad_multiple(cfg)
    pad = -val_manifest["num_records"] % multiple
    if pad:
        rows = _pad_rows(d.val_uri, val_manifest, endpoint, pad)
        pad_ds = ray.data.from_items(rows).map_batches(
            val_udf, fn_kwargs=val_kwargs, batch_size=UDF_BATCH, batch_format="numpy", num_cpus=cpus
        )
        val = val.union(pad_ds)
    for ds in (train, val):
        ds.context.set_config(STATE_KEY, state)
        ds.context.set_config(BUFFER_KEY, d.shuffle_buffer)
    return {"train": train, "val": val}


def _collate(batch: dict[str, np.ndarray], ignore_index: int = 255) -> dict:
    """Binary rows -> ``{"image": float32 (N,3,H,W), "mask": int64 (N,H,W)}``; pads mixed sizes."""
    hs, ws = batch["height"].astype(int), batch["width"].astype(int)
    n, hmax, wmax = len(hs), int(hs.max()) if len(hs) else 0, int(ws.max()) if len(ws) else 0
    images = np.zeros((n, 3, hmax, wmax), np.float32)
    masks = np.full((n, hmax, wmax), ignore_index, np.int64)
    for i, (img, msk, h, w) in enumerate(zip(batch["image"], batch["mask"], hs, ws, strict=True)):
        images[i, :, :h, :w] = np.frombuffer(img, np.float32).reshape(3, h, w)
        masks[i, :h, :w] = np.frombuffer(msk, np.uint8).reshape(h, w)
    return {"image": torch.from_numpy(images), "mask": torch.from_numpy(masks)}


def _collate_fn(with_keys: bool):
    """A ``NumpyBatchCollateFn`` (plain functions are deprecated as collate_fn in Ray 2.60)."""
    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict:
            out = _collate(batch)
            if with_keys:
                out["key"] = [str(k) for k in batch["key"]]
            return out

    return Collate()


def _iterator(shard: Any):
    return shard.iterator() if isinstance(shard, Dataset) else shard


def iter_batches(
    shard: Any,
    batch_size: int,
    *,
    epoch: int,
    train: bool,
    prefetch_batches: int = 2,
    shuffle_buffer: int | None = None,
    with_keys: bool = False,
) -> Iterator[dict]:
    """Batches of one epoch of a worker's shard (``get_dataset_shard(...)``, or a Dataset).

    Train: ``batch_size`` crops per batch, remainder dropped, crops and order that change with
    ``epoch`` and repeat for the same seed and epoch. Val: whole images, padded with the ignore
    label (image 0 after normalisation) when sizes in a batch differ; every image exactly once
    (plus all-ignore padding copies keyed ``__pad__/i``). ``with_keys`` adds ``"key"`` (list of str).
    """
    it = _iterator(shard)
    ctx = it.get_context()
    state = ctx.get_config(STATE_KEY, None)
    if shuffle_buffer is None:
        shuffle_buffer = int(ctx.get_config(BUFFER_KEY, 0)) or 4 * batch_size
    split = int(getattr(it, "_output_split_idx", 0))
    world = int(it.world_size()) if hasattr(it, "world_size") else 1
    shuffle_seed = None
    if train and state is not None:
        ray.get(state.announce.remote(split, world, int(epoch)))
        seed, _ = ray.get(state.current.remote())
        shuffle_seed = int(np.random.SeedSequence([seed, int(epoch), split]).generate_state(1)[0])
    buffer = shuffle_buffer if train else None
    yield from it.iter_torch_batches(
        batch_size=batch_size,
        prefetch_batches=prefetch_batches,
        collate_fn=_collate_fn(with_keys),
        drop_last=train,
        local_shuffle_buffer_size=buffer or None,
        local_shuffle_seed=shuffle_seed if buffer else None,
    )
    if train and state is not None:  # the split is drained: the epoch's execution has finished
        problem = ray.get(state.shortfall.remote(int(epoch)))
        if problem:
            raise DataError(problem)


def skipped_records(datasets: dict) -> int:
    """How many records were skipped under ``data.max_bad_records`` (bad records + lost shards)."""
    ds = next(iter(datasets.values()))
    state = ds.context.get_config(STATE_KEY, None)
    return int(ray.get(state.skipped_records.remote())) if state is not None else 0


def bad_records(datasets: dict) -> dict[str, str]:
    """Records skipped under ``data.max_bad_records`` so far: ``{"shard ... record ...": reason}``."""
    ds = next(iter(datasets.values()))
    state = ds.context.get_config(STATE_KEY, None)
    return ray.get(state.bad_records.remote()) if state is not None else {}
