"""``hrt-ray eval --config CONFIG --checkpoint URI [KEY=VALUE ...]``: per-class IoU of a checkpoint.

The test setting comes from the config's ``eval`` section (mode, scales, flip, crop/stride);
override it on the command line, e.g. ``eval.scales=[0.75,1.0,1.25] eval.flip=true``.
"""

from __future__ import annotations

import argparse
import sys

from hrt_ray.config import load_config
from hrt_ray.ray_local import ensure_ray


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="experiment YAML (default: built-in defaults)")
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint dir or file: ours or official, local/s3/gs"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, training=False)

    # deferred: `hrt-ray --help` imports this module; torch and Ray load after the config is checked
    from hrt_ray.eval.run import evaluate_checkpoint
    from hrt_ray.train.trainer import TrainError

    ensure_ray(verbose=bool(getattr(args, "verbose", False)))
    try:
        result = evaluate_checkpoint(cfg, args.checkpoint)
    except TrainError as exc:  # input errors (checkpoint, data, storage) exit 2 in hrt_ray.cli
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.table())
    print("\n".join(result.summary_lines()))
    return 0
