"""The ``hrt-ray`` command line.

Each subcommand lives beside the code it drives and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``. They are imported lazily so that
``hrt-ray --help`` and a config typo answer in well under a second, before torch or Ray load.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from hrt_ray.config import ConfigError

# name -> (module holding add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("hrt_ray.data.cli", "Prepare, check or synthesise dataset shards (local, s3://, gs://)."),
    "bench": ("hrt_ray.bench.cli", "Print speed/memory figures (model, data, train)."),
    "train": ("hrt_ray.train.cli", "Train (or resume) a run on Ray Train, evaluate it, print a summary."),
    "eval": ("hrt_ray.eval.cli", "Evaluate a checkpoint: per-class IoU table, JSON/CSV beside it."),
    "tune": ("hrt_ray.tune.cli", "Sweep window size x learning rate with Ray Tune: table + plot of trials."),
    "predict": ("hrt_ray.infer.predict_cli", "Batch inference over a folder/bucket on Ray Data: label PNGs."),
    "visualize": (
        "hrt_ray.infer.visualize_cli", "Picture: input | truth | prediction | errors of val samples."
    ),
    "export": (
        "hrt_ray.infer.export_cli", "Export a checkpoint to TorchScript or ONNX, checked against eager."
    ),
    "config": ("hrt_ray.config_cli", "Show the resolved experiment config; check the job runtime env."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hrt-ray",
        description="Train, evaluate, tune and serve HRFormer + OCR segmentation models on Ray.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show Ray's own logs and full tracebacks"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(cmd)
        # Also accepted after the command; SUPPRESS keeps a flag given before it.
        cmd.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
            help="show Ray's own logs and full tracebacks",
        )
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can cause and fix (bad input, storage, checkpoints): one line, exit code 2.

    Only the modules the command already loaded are asked: an error cannot come from a module
    that was never imported, and importing one here (torch, Ray) would make a typo in a config
    a slow answer.
    """
    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    for module, names in (
        ("hrt_ray.data.codec", ("DataError",)),
        ("hrt_ray.data.specs", ("SpecError",)),
        ("hrt_ray.models.checkpoint", ("CheckpointError",)),
        ("hrt_ray.storage", ("StorageError",)),
        ("hrt_ray.ray_local", ("RayStartError",)),
        ("hrt_ray.train.preflight", ("ResourceError",)),
        ("hrt_ray.train.runlock", ("RunLockedError",)),
    ):
        mod = sys.modules.get(module)
        if mod is not None:
            errors += [getattr(mod, name) for name in names]
    return tuple(errors)


#: Label printed before a user error's message, by class name.
_LABELS = {
    "ConfigError": "config error",
    "DataError": "data error",
    "SpecError": "dataset spec error",
    "CheckpointError": "checkpoint error",
    "StorageError": "storage error",
    "RayStartError": "ray error",
    "ResourceError": "resource error",
    "RunLockedError": "run locked",
    "FileNotFoundError": "not found",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, user_errors()):
            raise
        if args.verbose:
            traceback.print_exc()
        label = _LABELS.get(type(exc).__name__, "error")
        print(f"{label}: {exc}", file=sys.stderr)
        return 2
