"""``hrt-ray export``: the command line of :mod:`hrt_ray.infer.export` (TorchScript / ONNX).

A module of its own because ``hrt-ray --help`` imports every command's ``add_arguments``: the
exporter imports torch at its top, this module only the config.
"""

from __future__ import annotations

import argparse
import sys

from hrt_ray.config import load_config, parse_hw

#: ``hrt_ray.infer.export.FORMATS``' keys, spelled out here so ``--help`` needs no torch
#: (tests/test_cli.py checks that the two agree).
FORMAT_CHOICES = ("torchscript", "onnx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="experiment YAML (model arch, classes, dataset)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir or file (local, s3://, gs://)")
    parser.add_argument("--format", required=True, choices=FORMAT_CHOICES, help="torchscript or onnx")
    parser.add_argument(
        "--size", type=parse_hw, help="fixed input HxW (default: eval crop, else training crop)"
    )
    parser.add_argument("--batch", type=int, default=1, help="fixed batch size of the exported graph")
    parser.add_argument("--out", help="output URI (default: model-HxW.ts/.onnx beside the checkpoint)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, training=False)
    if args.batch < 1:
        print("error: --batch must be >= 1", file=sys.stderr)
        return 2

    # deferred: `hrt-ray --help` imports this module; the exporter imports torch
    from hrt_ray.infer.export import ExportError, export_checkpoint
    from hrt_ray.models.checkpoint import CheckpointError
    from hrt_ray.storage import StorageError

    try:
        result = export_checkpoint(
            cfg, args.checkpoint, args.format, size=args.size, batch=args.batch, out=args.out
        )
    except (ExportError, CheckpointError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    h, w = result.size
    print(
        f"exported {result.format} for input {args.batch}x3x{h}x{w}: {result.uri} (+ {result.meta_uri}); "
        f"max |logit diff| vs eager {result.max_abs_diff:.2e}, argmax agreement "
        f"{100 * result.argmax_agreement:.3f}% ({result.seconds:.1f} s)"
    )
    return 0
