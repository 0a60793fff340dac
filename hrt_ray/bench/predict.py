"""``hrt-ray bench predict``: images/s of ``hrt-ray predict`` end to end (read, decode, infer, write).

Why end to end: batch inference is only as fast as its slowest stage, so the figure that matters
is images written per second through the real Ray Data pipeline (:func:`run_predict`), not a bare
forward pass (``hrt-ray bench model`` gives that). The source images are synthetic scenes of the
given size written to a temporary folder; weights are random unless ``--checkpoint`` is given
(speed does not depend on them). Also printed: the model's share (summed per-image inference
time over workers), which tells whether the model or the I/O around it is the limit.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile

import torch

from hrt_ray.config import load_config
from hrt_ray.data import resolve_num_classes
from hrt_ray.data.codec import encode_png
from hrt_ray.data.synth import draw_scene
from hrt_ray.infer.predict import cluster_gpus, run_predict
from hrt_ray.models import build_model
from hrt_ray.ray_local import ensure_ray


def _write_inputs(folder: str, num: int, size: tuple[int, int], classes: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for i in range(num):
        image, _ = draw_scene(0, "bench", i, size[0], size[1], max(2, classes))
        with open(os.path.join(folder, f"{i:05d}.png"), "wb") as f:
            f.write(encode_png(image))


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    num_classes = resolve_num_classes(cfg)
    ensure_ray()
    scratch = tempfile.mkdtemp(prefix="hrt-bench-predict-")
    try:
        src, dst = os.path.join(scratch, "images"), os.path.join(scratch, "out")
        _write_inputs(src, args.num, args.size, num_classes)
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = os.path.join(scratch, "random.pt")
            model = build_model(cfg.model.arch, num_classes, window_size=cfg.model.window_size)
            torch.save({"model": model.state_dict()}, checkpoint)
        summary = run_predict(
            cfg,
            checkpoint,
            src,
            dst,
            overlay=args.overlay,
            device=args.device,
            workers=args.workers,
            batch_size=args.batch_size,
            cpus_per_worker=args.cpus_per_worker,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    h, w = args.size
    gpus = cluster_gpus()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpus} GPU(s)")
    print(
        f"{cfg.model.arch} ({num_classes} classes), {summary.written} images {h}x{w}, {summary.setting}, "
        f"{summary.workers} {summary.device} worker(s) of {args.cpus_per_worker:g} CPU, bs {args.batch_size}"
        + (", overlays" if args.overlay else "")
    )
    print(f"end to end: {summary.images_per_s:.2f} images/s ({summary.seconds:.1f} s incl. actor start)")
    if summary.infer_seconds > 0:
        per_worker = summary.written / summary.infer_seconds
        print(
            f"model only: {per_worker:.2f} images/s per worker "
            f"({per_worker * summary.workers:.2f} images/s for {summary.workers} worker(s))"
        )
    if summary.infer_cpu_seconds > 0 and summary.device == "cpu":
        cpu_per_image = summary.infer_cpu_seconds / summary.written
        print(
            f"model CPU time: {cpu_per_image:.2f} CPU-s per image "
            f"(= {1 / cpu_per_image:.2f} images/s per fully available core; wall figures above include "
            f"waiting for cores when the machine is shared)"
        )
    return 0 if not summary.failed else 1
