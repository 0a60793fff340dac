"""``hrt-ray bench train``: Ray Train's per-iteration overhead against the same loop in one process.

Both sides run :func:`hrt_ray.train.loop.train_step` on batches from the same Ray Data pipeline
(``build_datasets`` + ``iter_batches``), same model, global batch, threads and iterations:

- plain: the loop in this process, reading ``datasets["train"]`` directly;
- ray: a ``TorchTrainer`` with ``--workers`` workers (default 1 with all the threads, so
  the difference is Ray Train's own cost: worker actors, dataset split, ``report`` barriers,
  checkpoints), reporting per-step time, images/s per worker and the data-wait fraction.

Startup (cluster, worker group, first epoch's pipeline start) is excluded on both sides by
timing only after ``--warmup`` iterations.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from hrt_ray.config import load_config
from hrt_ray.data import iter_batches, resolve_num_classes
from hrt_ray.ray_local import ensure_ray
from hrt_ray.train.loop import build_training_model, loss_kwargs, train_step
from hrt_ray.train.optim import build_optimizer, build_scheduler
from hrt_ray.train.trainer import build_trainer, prepare_data


def _plain(cfg, datasets, total_iters: int, warmup: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model = build_training_model(cfg, resolve_num_classes(cfg), device, 0)
    model.train()
    opt = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
    sched = build_scheduler(opt, cfg.optim.max_iters, cfg.optim.warmup_iters, cfg.optim.warmup_ratio)
    args = loss_kwargs(cfg, device)
    done, epoch, wait, busy = 0, 0, 0.0, 0.0
    while done < total_iters:
        t_wait = time.perf_counter()
        for batch in iter_batches(
            datasets["train"],
            cfg.data.batch_size,
            epoch=epoch,
            train=True,
            prefetch_batches=cfg.data.prefetch_batches,
        ):
            t_step = time.perf_counter()
            train_step(model, batch, opt, sched, None, args, device, None)
            done += 1
            if done > warmup:
                wait += t_step - t_wait
                busy += time.perf_counter() - t_step
            if done >= total_iters:
                break
            t_wait = time.perf_counter()
        epoch += 1
    n = total_iters - warmup
    return {
        "step_s": (wait + busy) / n,
        "images_per_s": cfg.data.batch_size * n / (wait + busy),
        "data_wait_frac": wait / (wait + busy),
    }


def run(args: argparse.Namespace) -> int:
    total = args.iters + args.warmup
    per_worker_threads = max(1, args.threads // max(1, args.workers))
    with tempfile.TemporaryDirectory(prefix="hrt-bench-") as tmp:
        cfg = load_config(
            args.config,
            [
                *args.overrides,
                f"optim.max_iters={total}",
                "optim.warmup_iters=0",
                "eval.at_start=false",
                # A report (and checkpoint, as in real runs) every --warmup iterations; the first
                # window holds the startup and is not timed. Validation only after the last one.
                f"checkpoint.every={args.warmup}",
                "checkpoint.keep=1000",
                f"eval.interval={total}",
                f"storage.path={tmp}",
                f"name=bench-{os.getpid()}",
                f"scaling.num_workers={args.workers}",
                f"scaling.cpus_per_worker={per_worker_threads}",
                "failure.max_failures=0",
            ],
        )
        ensure_ray()
        datasets = prepare_data(cfg)
        print(
            f"model {cfg.model.arch}, crop {cfg.data.crop_size}, global batch {cfg.data.batch_size}, "
            f"{args.iters} timed iterations after {args.warmup}, {args.threads} threads"
        )
        plain = _plain(cfg, datasets, total, args.warmup, args.threads)
        print(
            f"plain process : {plain['step_s']:.3f} s/iter, {plain['images_per_s']:.2f} images/s, "
            f"data wait {100 * plain['data_wait_frac']:.1f}%"
        )

        result = build_trainer(cfg, datasets).fit()
        frame = result.metrics_dataframe
        rows = frame.to_dict("records") if frame is not None else []
        # Windows after the warm-up one (every report is kept: checkpoint.keep is large).
        timed = [r for r in rows if args.warmup < r.get("iteration", 0) <= total and "perf/step_time_s" in r]
        if not timed:
            print(f"ray train     : no timed report came back ({len(rows)} reports)")
            return 1
        steps = sum(args.warmup for _ in timed)
        step_s = sum(r["perf/step_time_s"] * args.warmup for r in timed) / steps
        ips = sum(r["perf/images_per_s"] for r in timed) / len(timed)
        ips_worker = sum(r["perf/images_per_s_per_worker"] for r in timed) / len(timed)
        wait = sum(r["perf/data_wait_frac"] for r in timed) / len(timed)
        print(
            f"ray train x{args.workers}  : {step_s:.3f} s/iter, {ips:.2f} images/s "
            f"({ips_worker:.2f} per worker), data wait {100 * wait:.1f}%"
        )
        print(
            f"overhead      : {100 * (step_s / plain['step_s'] - 1):+.1f}% per iteration (target: within 10%)"
        )
    return 0
