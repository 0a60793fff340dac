"""``hrt-ray visualize``: the command line of :mod:`hrt_ray.infer.visualize` (a panel of val samples).

A module of its own because ``hrt-ray --help`` imports every command's ``add_arguments``: the
panel code imports torch (through the model) at its top, this module only the config.
"""

from __future__ import annotations

import argparse
import sys

from hrt_ray.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="experiment YAML (dataset, val_uri, eval.* test setting)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir or file (local, s3://, gs://)")
    parser.add_argument("--num", "-n", type=int, default=4, help="validation samples (rows), default 4")
    parser.add_argument("--out", help="PNG to write (default: visualize.png beside the checkpoint)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, training=False)
    if args.num < 1:
        print("error: --num must be >= 1", file=sys.stderr)
        return 2

    # deferred: `hrt-ray --help` imports this module; these import torch, cv2 and pyarrow
    from hrt_ray import storage
    from hrt_ray.data.codec import DataError, encode_png
    from hrt_ray.data.synth import ensure_synthetic
    from hrt_ray.eval.run import checkpoint_file
    from hrt_ray.infer.model import Segmenter
    from hrt_ray.infer.visualize import load_val_samples, panel_for
    from hrt_ray.models.checkpoint import CheckpointError

    ckpt = checkpoint_file(args.checkpoint)
    out = args.out or f"{ckpt.rsplit('/', 1)[0]}/visualize.png"
    try:
        if not storage.exists(ckpt, cfg.storage.endpoint):
            raise FileNotFoundError(f"{ckpt}: checkpoint not found")
        ensure_synthetic(cfg)
        segmenter = Segmenter.load(cfg, ckpt, device=args.device)
        samples = load_val_samples(cfg, args.num, segmenter.spec)
        panel, accs = panel_for(segmenter, samples)
        storage.write_bytes(out, encode_png(panel), cfg.storage.endpoint)
    except (FileNotFoundError, DataError, CheckpointError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for (key, _, _), acc in zip(samples, accs, strict=True):
        print(f"{key}: pixel accuracy {100 * acc:.2f}%")
    print(f"wrote {out} ({panel.shape[1]}x{panel.shape[0]}, {len(samples)} samples)")
    return 0
