"""The ``hrt-ray`` command line.

Each subcommand lives beside the code it drives and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``. They are imported lazily so that
``hrt-ray --help`` and a config typo answer in well under a second, before torch or Ray load.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module holding add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("hrt_ray.data.cli", "Prepare, check or synthesise dataset shards (local, s3://, gs://)."),
    "bench": ("hrt_ray.bench", "Print speed/memory figures (model, data, train)."),
    "train": ("hrt_ray.train.cli", "Train (or resume) a run on Ray Train, evaluate it, print a summary."),
    "eval": ("hrt_ray.eval.cli", "Evaluate a checkpoint: per-class IoU table, JSON/CSV beside it."),
    "tune": ("hrt_ray.tune.cli", "Sweep window size x learning rate with Ray Tune: table + plot of trials."),
    "predict": ("hrt_ray.infer.predict", "Batch inference over a folder/bucket on Ray Data: label PNGs."),
    "visualize": ("hrt_ray.infer.visualize", "Picture: input | truth | prediction | errors of val samples."),
    "export": ("hrt_ray.infer.export", "Export a checkpoint to TorchScript or ONNX, checked against eager."),
    "config": ("hrt_ray.config_cli", "Show the resolved experiment config; check the job runtime env."),
}


def parse_hw(text: str) -> tuple[int, int]:
    """argparse type for sizes: ``"512x1024"`` -> ``(512, 1024)`` (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 512x1024, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hrt-ray",
        description="Train, evaluate, tune and serve HRFormer + OCR segmentation models on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    from hrt_ray.config import ConfigError  # stdlib + yaml only: cheap

    try:
        return int(module.run(args) or 0)
    except ConfigError as exc:  # a broken config fails here, before any cluster resource
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
