"""``hrt-ray bench ...``: benchmarks that print figures (speed targets live here, not in tests).

Each benchmark is a module in this package exposing ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports (torch, Ray) happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "train": ("hrt_ray.bench.train", "Ray Train step overhead vs a plain process; images/s, data wait."),
    "data": ("hrt_ray.bench.data", "Augmented crops/s (and per core) of Ray Data vs a torch DataLoader."),
    "predict": ("hrt_ray.bench.predict", "Batch inference images/s of hrt-ray predict (Ray Data actors)."),
    "model": ("hrt_ray.bench.model", "Model parameters, FLOPs, forward/backward time and peak memory."),
    "checkpoint": (
        "hrt_ray.bench.checkpoint",
        "Seconds workers are blocked per checkpoint, sync vs async upload, against S3.",
    ),
    "gpu": ("hrt_ray.bench.gpu", "make gpu-check: model MFU, compile, 1-GPU job, predict/export on a GPU."),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    sub.required = True
    for name, (module_name, help_text) in BENCHMARKS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_bench_module=module_name)
        importlib.import_module(module_name).add_arguments(cmd)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._bench_module).run(args) or 0)
