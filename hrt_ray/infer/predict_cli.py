"""``hrt-ray predict``: the command line of :mod:`hrt_ray.infer.predict` (Ray Data batch inference).

A module of its own because ``hrt-ray --help`` imports every command's ``add_arguments``: the
batch-inference code imports torch and Ray at its top, this module only the config.
"""

from __future__ import annotations

import argparse
import sys

from hrt_ray.config import load_config
from hrt_ray.ray_local import ensure_ray


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="experiment YAML (model, dataset spec, eval.* test setting)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir or file (local, s3://, gs://)")
    parser.add_argument("--src", required=True, help="folder or bucket prefix of JPEG/PNG images")
    parser.add_argument("--dst", required=True, help="where labels/ (and overlays/) PNGs are written")
    parser.add_argument(
        "--ids",
        choices=("train", "original"),
        default="train",
        help="label values: train ids, or the dataset's original ids (e.g. Cityscapes labelIds)",
    )
    parser.add_argument(
        "--overlay", action="store_true", help="also write palette overlays (overlays/.../overlay_*.png)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="--dst holds outputs of other settings: delete its labels/ and overlays/ and redo every image",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--workers", type=int, help="model actors (default: one per GPU, else 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="same-size images per forward pass")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (torch threads) per actor")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides (eval.mode=slide ...)"
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, training=False)
    if args.workers is not None and args.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2

    # deferred: `hrt-ray --help` imports this module; the library imports torch and Ray
    from hrt_ray.infer.predict import REPORT_FILE, PredictError, run_predict
    from hrt_ray.storage import StorageError

    ensure_ray()
    try:
        summary = run_predict(
            cfg,
            args.checkpoint,
            args.src,
            args.dst,
            ids=args.ids,
            overlay=args.overlay,
            overwrite=args.overwrite,
            device=args.device,
            workers=args.workers,
            batch_size=args.batch_size,
            cpus_per_worker=args.cpus_per_worker,
        )
    except (PredictError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"predict: wrote {summary.written} images, skipped {summary.skipped_existing} already done, "
        f"{len(summary.failed)} unreadable, {summary.images_per_s:.2f} images/s; "
        f"report {args.dst.rstrip('/')}/{REPORT_FILE}"
    )
    for reason in summary.failed.values():
        print(f"  unreadable: {reason}")
    return 0
