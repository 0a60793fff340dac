"""The shard format: Parquet files of encoded image/mask pairs plus a ``manifest.json``.

Layout under a URI (local path, ``s3://`` or ``gs://``)::

    part-00000.parquet   columns: key (string), image (binary, original encoded bytes),
    part-00001.parquet            mask (binary, PNG of raw label values), height, width (int32)
    manifest.json        written last: the set is complete once it exists

Why this shape: encoded bytes keep shards as small as the source (a Cityscapes PNG is not
inflated to 6 MB of pixels), Parquet row groups let Ray Data split a shard into blocks, and
raw mask values plus the spec in the manifest keep the mapping in one place
(:meth:`DatasetSpec.lut`). Shard ``i`` always holds the same input records, so a re-run skips
shards that already exist and two racing writers produce identical files.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from hrt_ray import storage
from hrt_ray.data.codec import DataError
from hrt_ray.data.specs import DatasetSpec

log = logging.getLogger(__name__)

FORMAT = "hrt-ray-shards/1"
MANIFEST = "manifest.json"
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)
#: Records per Parquet row group: the unit Ray Data can split a shard into.
ROW_GROUP = 8


@dataclass
class Record:
    key: str
    image: bytes
    mask: bytes
    height: int
    width: int


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


def write_shard(uri: str, records: list[Record], endpoint: str | None = None) -> None:
    table = pa.table(
        {
            "key": [r.key for r in records],
            "image": [r.image for r in records],
            "mask": [r.mask for r in records],
            "height": [r.height for r in records],
            "width": [r.width for r in records],
        },
        schema=SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP, compression="none")
    storage.write_bytes(uri, buf.getvalue(), endpoint)


def _shard_rows(uri: str, endpoint: str | None) -> int:
    loc = storage.resolve(uri, endpoint)
    with loc.filesystem.open_input_file(loc.path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def write_shards(
    dst: str,
    num_inputs: int,
    make_record: Callable[[int], Record],
    *,
    spec: DatasetSpec,
    split: str,
    records_per_shard: int = 64,
    endpoint: str | None = None,
    threads: int = 4,
    extra: dict | None = None,
) -> dict:
    """Write inputs ``0..num_inputs-1`` as shards under ``dst``, then the manifest.

    ``make_record(i)`` builds input ``i`` or raises :class:`DataError`; bad inputs are logged,
    left out and listed in the manifest under ``"bad"``. Existing shards are kept as they are.
    Returns the manifest.
    """
    if num_inputs < 1:
        raise DataError(f"{dst}: nothing to write (no input records)")
    shards: list[dict] = []
    bad: list[dict] = []
    num_shards = (num_inputs + records_per_shard - 1) // records_per_shard
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for s in range(num_shards):
            name = shard_name(s)
            uri = _join(dst, name)
            if storage.exists(uri, endpoint):
                rows = _shard_rows(uri, endpoint)
                log.info("%s exists (%d records); skipping", uri, rows)
                shards.append({"file": name, "num_records": rows})
                continue
            indices = range(s * records_per_shard, min(num_inputs, (s + 1) * records_per_shard))

            def build(i: int) -> Record | DataError:
                try:
                    return make_record(i)
                except DataError as exc:
                    return exc

            records = []
            for result in pool.map(build, indices):
                if isinstance(result, DataError):
                    log.warning("bad record left out: %s", result)
                    bad.append({"error": str(result)})
                else:
                    records.append(result)
            if records:
                write_shard(uri, records, endpoint)
                shards.append({"file": name, "num_records": len(records)})
                log.info("wrote %s (%d records)", uri, len(records))
    manifest = {
        "format": FORMAT,
        "dataset": spec.name,
        "split": split,
        "num_records": sum(s["num_records"] for s in shards),
        "shards": shards,
        "bad": bad,
        "spec": spec.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    if not shards:
        raise DataError(f"{dst}: every input record was bad; nothing written")
    storage.write_bytes(_join(dst, MANIFEST), json.dumps(manifest, indent=1).encode(), endpoint)
    return manifest


def read_manifest(uri: str, endpoint: str | None = None) -> dict:
    """The manifest of a shard set; :class:`DataError` naming the URI if missing or invalid."""
    if not uri or not str(uri).strip():
        raise DataError(
            "empty shard URI: expected a local path, s3://bucket/prefix or gs://bucket/prefix"
        )
    try:
        raw = storage.read_bytes(_join(uri, MANIFEST), endpoint)
    except storage.StorageError as exc:
        raise DataError(
            f"{uri}: no readable shard set ({exc}). Write one with `hrt-ray data prepare` or `data synth`."
        ) from exc
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{_join(uri, MANIFEST)}: not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{_join(uri, MANIFEST)}: unknown format {manifest.get('format')!r}, expected {FORMAT}"
        )
    return manifest


def has_shards(uri: str, endpoint: str | None = None) -> bool:
    return storage.exists(_join(uri, MANIFEST), endpoint)


def shard_uris(uri: str, manifest: dict) -> list[str]:
    return [_join(uri, s["file"]) for s in manifest["shards"]]


def iter_records(
    uri: str, endpoint: str | None = None, limit: int | None = None
) -> Iterable[tuple[str, dict]]:
    """(shard file name, row dict) over a shard set, one row group in memory at a time."""
    manifest = read_manifest(uri, endpoint)
    seen = 0
    for shard in manifest["shards"]:
        loc = storage.resolve(_join(uri, shard["file"]), endpoint)
        try:
            f = loc.filesystem.open_input_file(loc.path)
        except OSError as exc:
            raise DataError(f"{loc.uri}: listed in the manifest but cannot be opened: {exc}") from exc
        with f:
            try:
                pf = pq.ParquetFile(f)
            except (pa.ArrowException, OSError) as exc:  # empty or truncated: ArrowInvalid
                raise DataError(f"{loc.uri}: unreadable Parquet shard ({exc})") from exc
            for rg in range(pf.num_row_groups):
                try:
                    rows = pf.read_row_group(rg).to_pylist()
                except (pa.ArrowException, OSError) as exc:
                    raise DataError(f"{loc.uri}: row group {rg} is unreadable ({exc})") from exc
                for row in rows:
                    yield shard["file"], row
                    seen += 1
                    if limit is not None and seen >= limit:
                        return
