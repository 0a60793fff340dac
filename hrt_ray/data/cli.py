"""``hrt-ray data prepare|check|synth``: write and validate shard sets (local, s3:// or gs://)."""

from __future__ import annotations

import argparse
import logging
import sys

from hrt_ray.config import parse_hw
from hrt_ray.data.specs import SpecError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    endpoint_help = "S3-compatible endpoint (http://host:port); default: AWS_ENDPOINT_URL"

    p = sub.add_parser(
        "prepare", help="Convert a dataset's standard layout into validated Parquet shards."
    )
    p.add_argument(
        "--dataset",
        required=True,
        help="cityscapes, ade20k, pascal_context, coco_stuff, or a dataset spec YAML path",
    )
    p.add_argument("--src", required=True, help="the dataset's root folder on local disk")
    p.add_argument("--dst", required=True, help="where the shards go: a path, s3://... or gs://...")
    p.add_argument("--split", default="train", help="train, val (or the layout's own split name)")
    p.add_argument("--records-per-shard", type=int, default=64)
    p.add_argument("--threads", type=int, default=4, help="parallel readers/validators")
    p.add_argument("--endpoint", default=None, help=endpoint_help)

    c = sub.add_parser(
        "check", help="Validate prepared shards: label range, histogram, size mismatches."
    )
    c.add_argument("uri", help="a shard set written by prepare or synth")
    c.add_argument("--dataset", default=None, help="check against this spec instead of the manifest's")
    c.add_argument("--limit", type=int, default=None, help="check only the first N records")
    c.add_argument("--endpoint", default=None, help=endpoint_help)

    s = sub.add_parser("synth", help="Generate the synthetic default dataset (train + val) as shards.")
    s.add_argument("--dst", required=True, help="root URI; writes <dst>/train and <dst>/val")
    s.add_argument("--num-train", type=int, default=64)
    s.add_argument("--num-val", type=int, default=16)
    s.add_argument("--size", type=parse_hw, default=(128, 128), help="HxW, e.g. 128x128")
    s.add_argument("--classes", type=int, default=5, help="classes including the background")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--endpoint", default=None, help=endpoint_help)


def run(args: argparse.Namespace) -> int:
    # deferred: `hrt-ray --help` imports this module; the data modules import cv2 and pyarrow
    from hrt_ray.data.codec import DataError
    from hrt_ray.storage import StorageError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return {"prepare": _prepare, "check": _check, "synth": _synth}[args.data_command](args)
    except (DataError, SpecError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace) -> int:
    # deferred: `hrt-ray --help` imports this module; the data modules import cv2 and pyarrow
    from hrt_ray.data.prepare import prepare

    result = prepare(
        args.dataset,
        args.src,
        args.dst,
        args.split,
        endpoint=args.endpoint,
        records_per_shard=args.records_per_shard,
        threads=args.threads,
    )
    m = result.manifest
    print(
        f"{args.dst}: {m['num_records']} records in {len(m['shards'])} shards ({m['dataset']}, {m['split']})"
    )
    for problem in result.bad:
        print(f"bad pair: {problem}", file=sys.stderr)
    if result.bad:
        print(
            f"{len(result.bad)} bad pair(s) left out; fix them, delete the affected shards and re-run",
            file=sys.stderr,
        )
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    # deferred: `hrt-ray --help` imports this module; the data modules import cv2 and pyarrow
    from hrt_ray.data.check import check

    report = check(args.uri, args.dataset, args.endpoint, args.limit)
    print(report.format())
    return 0 if report.ok else 1


def _synth(args: argparse.Namespace) -> int:
    # deferred: `hrt-ray --help` imports this module; the data modules import cv2 and pyarrow
    from hrt_ray.data.synth import synth

    if args.classes < 2 or args.num_train < 1 or args.num_val < 1:
        print("error: need --classes >= 2 and at least one train and one val image", file=sys.stderr)
        return 2
    root = args.dst.rstrip("/")
    for split, num in (("train", args.num_train), ("val", args.num_val)):
        m = synth(
            f"{root}/{split}",
            split=split,
            num=num,
            size=args.size,
            classes=args.classes,
            seed=args.seed,
            endpoint=args.endpoint,
        )
        print(f"{root}/{split}: {m['num_records']} records in {len(m['shards'])} shards")
    return 0
