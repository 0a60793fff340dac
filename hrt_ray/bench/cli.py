"""``hrt-ray bench ...``: the command line of the benchmarks in this package.

Each benchmark module exposes ``run(args) -> int`` and imports torch/Ray at its top; the
arguments of every benchmark live here, so ``hrt-ray --help`` lists them without loading any.
"""

from __future__ import annotations

import argparse
import importlib
import os

from hrt_ray.config import parse_hw

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


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="experiment YAML (default: the embedded default)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--iters", type=int, default=40, help="timed iterations (a multiple of --warmup)")
    parser.add_argument(
        "--warmup", type=int, default=10, help="untimed iterations first; also the report interval"
    )
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (threads split evenly)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in total")


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="a shard set (prepare/synth output): path, s3://, gs://")
    parser.add_argument("--crop", type=parse_hw, default=(512, 1024), help="crop HxW (default 512x1024)")
    parser.add_argument("--procs", type=int, nargs="+", default=[2],
                        help="process counts to measure (e.g. 1 2 4); each gets a fresh Ray instance")
    parser.add_argument("--batch", type=int, default=4, help="crops per batch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per path; the last one is timed")
    parser.add_argument("--dataset", default=None, help="spec name/path (default: the manifest's spec)")
    parser.add_argument("--endpoint", default=None, help="S3-compatible endpoint; default AWS_ENDPOINT_URL")
    parser.add_argument("--skip-ray", action="store_true", help="only the DataLoader path")
    parser.add_argument("--skip-torch", action="store_true", help="only the Ray Data path")


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="experiment YAML (model, dataset, eval.* setting)")
    parser.add_argument(
        "--checkpoint", help="checkpoint to use (default: random weights of the config's arch)"
    )
    parser.add_argument("--num", type=int, default=16, help="images (default 16)")
    parser.add_argument("--size", type=parse_hw, default=(256, 512), help="image HxW (default 256x512)")
    parser.add_argument("--workers", type=int, help="model actors (default: one per GPU, else 1)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--overlay", action="store_true", help="also write overlays")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="hrt_small_ocr", help="model name (see hrt_ray.models.list_models)")
    parser.add_argument("--size", type=parse_hw, default=(512, 1024), help="input HxW (default 512x1024)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--window-size", type=int, default=None, help="override the arch's window size")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory layout")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of blocks")
    parser.add_argument(
        "--official-src",
        default=None,
        metavar="PATH",
        help="checkout of HRNet/HRFormer: also measure the official implementation (needs einops, yacs)",
    )
    parser.add_argument("--only-official", action="store_true", help="with --official-src: skip ours")


def _checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="hrt_base_ocr", help="model whose weights + AdamW state are saved")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints per mode")
    parser.add_argument("--work-s", type=float, default=8.0, help="simulated training seconds between them")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["sync", "async"], choices=("sync", "async"))
    parser.add_argument("--storage", help="storage path/URI (default: a loopback moto S3 bucket)")


def _gpu_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--official-src", metavar="PATH", help="HRNet/HRFormer checkout: official side by side"
    )
    parser.add_argument("--out-dir", default="benchmarks", help="where the JSON goes (default benchmarks/)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per model measurement")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("model", "compile", "train", "predict"),
        help="steps to skip",
    )


_ARGUMENTS = {
    "train": _train_arguments,
    "data": _data_arguments,
    "predict": _predict_arguments,
    "model": _model_arguments,
    "checkpoint": _checkpoint_arguments,
    "gpu": _gpu_arguments,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    sub.required = True
    for name, (module_name, help_text) in BENCHMARKS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_bench_module=module_name)
        _ARGUMENTS[name](cmd)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._bench_module).run(args) or 0)
