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
"""

from __future__ import annotations

import contextlib
import logging
import math
import zlib
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
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hrt_ray import storage
from hrt_ray.config import ExperimentConfig
from hrt_ray.data.codec import DataError, check_sizes, decode_image, decode_mask, map_mask
from hrt_ray.data.shards import read_manifest, shard_uris
from hrt_ray.data.specs import DatasetSpec, get_spec, spec_from_dict
from hrt_ray.data.transforms import AugmentParams, TrainAugment, normalize

log = logging.getLogger(__name__)

STATE_KEY = "hrt_ray.data.pipeline_state"
BUFFER_KEY = "hrt_ray.data.shuffle_buffer"
PAD_PREFIX = "__pad__/"
#: Records decoded/augmented per map task call: small blocks keep memory bounded for big crops.
UDF_BATCH = 4


class PipelineState:
    """Epoch announcements of the split consumers, the run seed, and the bad-record tally.

    Runs as a zero-CPU Ray actor (:func:`_state_actor`); a plain class so its rules are testable.
    """

    def __init__(self, seed: int, max_bad_records: int):
        self.seed = seed
        self.max_bad = max_bad_records
        self.world_size = 1
        self.epochs: dict[int, int] = {}
        self.bad: dict[str, str] = {}
        #: Records skipped so far: one per bad record, a shard's manifest count per lost shard.
        self.skipped = 0
        #: Training shard path -> records its manifest lists; epoch -> shard path -> records read.
        self.expected: dict[str, int] = {}
        self.read: dict[int, dict[str, int]] = {}

    def announce(self, split: int, world_size: int, epoch: int) -> None:
        if world_size != self.world_size:  # a new worker group (elastic resize, restart)
            self.world_size, self.epochs = world_size, {}
        self.epochs[split] = epoch

    def current(self) -> tuple[int, int]:
        """(seed, epoch): the slowest split's epoch once all splits have announced."""
        if not self.epochs:
            return self.seed, 0
        if len(self.epochs) < self.world_size:
            return self.seed, max(self.epochs.values())
        return self.seed, min(self.epochs.values())

    def expect(self, records_per_shard: dict[str, int]) -> None:
        """The training shards and their manifest counts, which every epoch must read in full."""
        self.expected = dict(records_per_shard)

    def begin(self, read: dict[str, int]) -> tuple[int, int]:
        """A train map task starts: count the records it read per shard; return (seed, epoch)."""
        seed, epoch = self.current()
        counts = self.read.setdefault(epoch, {})
        for path, n in read.items():
            counts[path] = counts.get(path, 0) + int(n)
        return seed, epoch

    def shortfall(self, epoch: int) -> str:
        """Why epoch ``epoch`` read fewer records than the manifest lists ('' if it did not).

        Called once a consumer has drained its split, i.e. once the epoch's execution is done.
        Shards already skipped under ``max_bad_records`` are not expected.
        """
        got = self.read.get(epoch, {})
        short = {p: (got.get(p, 0), n) for p, n in self.expected.items() if got.get(p, 0) < n}
        if not short:
            return ""
        missing = sum(n - g for g, n in short.values())
        total = sum(self.expected.values())
        listing = "; ".join(f"{p}: read {g} of {n}" for p, (g, n) in sorted(short.items()))
        return (
            f"data epoch {epoch} read {total - missing} of the {total} training records the manifest "
            f"lists: {listing}. Ray Data skips files it cannot read as records (e.g. zero-size "
            "files); re-write these shards"
        )

    def report_bad(self, where: str, reason: str, records: int = 1) -> int:
        """Count ``records`` skipped at ``where`` (once per place); returns the running total."""
        if where not in self.bad:
            self.bad[where] = reason
            self.skipped += records
            log.warning(
                "skipped %d bad record(s), %d/%d in all: %s", records, self.skipped, self.max_bad, reason
            )
        return self.skipped

    def bad_records(self) -> dict[str, str]:
        return dict(self.bad)

    def skipped_records(self) -> int:
        return self.skipped


def _state_actor(seed: int, max_bad_records: int):
    # On the driver's node (the head, on a cluster: it outlives worker nodes), and restarted
    # elsewhere if that node goes anyway: a lost worker node must not take the epoch state with it,
    # or every restarted worker group fails on its first batch. A restart keeps the seed; the
    # epoch announcements come again from the new group.
    node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=node)
    return actor(PipelineState).remote(seed, max_bad_records)


def record_seed(seed: int, epoch: int, key: str) -> int:
    """The augmentation seed of one record in one epoch (independent of batching and workers)."""
    return int(np.random.SeedSequence([seed, epoch, zlib.crc32(key.encode())]).generate_state(1)[0])


def _decode_pair(
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


def _train_udf(
    batch: dict[str, np.ndarray],
    *,
    state: Any,
    params: AugmentParams,
    lut: np.ndarray,
    spec_info: dict,
    channel_order: str,
    max_bad: int,
) -> pa.Table:
    read: dict[str, int] = {}
    for path in batch["path"]:
        read[str(path)] = read.get(str(path), 0) + 1
    seed, epoch = ray.get(state.begin.remote(read))
    augment = TrainAugment(params)
    keys, images, masks = [], [], []
    for key, img_bytes, mask_bytes, path in zip(
        batch["key"], batch["image"], batch["mask"], batch["path"], strict=True
    ):
        where = _where(path, key)
        try:
            image, mask = _decode_pair(img_bytes, mask_bytes, where, lut, spec_info, channel_order)
        except DataError as exc:
            _skip_or_raise(exc, where, state, max_bad)
            continue
        img, msk = augment(image, mask, record_seed(seed, epoch, key))
        keys.append(str(key))
        images.append(img.tobytes())
        masks.append(msk.tobytes())
    h, w = params.crop_size
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "image": pa.array(images, pa.binary()),
            "mask": pa.array(masks, pa.binary()),
            "height": pa.array([h] * len(keys), pa.int32()),
            "width": pa.array([w] * len(keys), pa.int32()),
        }
    )


def _val_udf(
    batch: dict[str, np.ndarray],
    *,
    state: Any,
    lut: np.ndarray,
    spec_info: dict,
    channel_order: str,
    max_bad: int,
) -> pa.Table:
    keys, images, masks, hs, ws = [], [], [], [], []
    for key, img_bytes, mask_bytes, path in zip(
        batch["key"], batch["image"], batch["mask"], batch["path"], strict=True
    ):
        where = _where(path, key)
        try:
            image, mask = _decode_pair(img_bytes, mask_bytes, where, lut, spec_info, channel_order)
        except DataError as exc:
            _skip_or_raise(exc, where, state, max_bad)
            continue
        if key.startswith(PAD_PREFIX):
            mask = np.full_like(mask, spec_info["ignore_index"])
        keys.append(str(key))
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
    state = _state_actor(int(cfg.seed), int(d.max_bad_records))
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

    params = AugmentParams(
        crop_size=(int(crop[0]), int(crop[1])),
        scale_range=(float(d.scale_range[0]), float(d.scale_range[1])),
        aspect_range=(float(d.aspect_range[0]), float(d.aspect_range[1])),
        hflip=bool(d.hflip),
        brightness_shift=float(d.brightness_shift),
        base_short_side=spec.base_short_side,
        ignore_index=spec.ignore_index,
    )
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
        _train_udf,
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
        _val_udf, fn_kwargs=val_kwargs, batch_size=UDF_BATCH, batch_format="numpy", num_cpus=cpus
    )
    multiple = val_pad_multiple(cfg)
    pad = -val_manifest["num_records"] % multiple
    if pad:
        rows = _pad_rows(d.val_uri, val_manifest, endpoint, pad)
        pad_ds = ray.data.from_items(rows).map_batches(
            _val_udf, fn_kwargs=val_kwargs, batch_size=UDF_BATCH, batch_format="numpy", num_cpus=cpus
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
