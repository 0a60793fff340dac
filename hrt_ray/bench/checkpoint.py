"""``hrt-ray bench checkpoint``: how long workers are blocked per checkpoint, sync vs async upload.

Each mode runs a real Ray Train job (CPU workers, gloo) whose rank 0 holds the model and AdamW
state of ``--arch`` (HRT-B + OCR: ~0.7 GB) and reports it ``--checkpoints`` times through the
production path (:func:`hrt_ray.train.loop.report_checkpoint`: write locally, then
``ray.train.report`` with ``checkpoint.upload``), with ``--work-s`` of simulated training in
between. Every rank times its ``report`` call: that is the time the step loop is blocked. The
storage is a ``moto_server`` this command starts on 127.0.0.1 (an in-memory S3), unless
``--storage`` names another location.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.report_config import CheckpointUploadMode

from hrt_ray.models import build_model
from hrt_ray.train.loop import report_checkpoint
from hrt_ray.train.optim import build_optimizer
from hrt_ray.train.state import save_state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not come up in 60 s")


def _loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: ``checkpoints`` x (simulated work, report); each rank times its reports."""
    rank = ray.train.get_context().get_world_rank()
    mode = CheckpointUploadMode.ASYNC if config["mode"] == "async" else CheckpointUploadMode.SYNC
    state: dict[str, Any] | None = None
    if rank == 0:
        model = build_model(config["arch"], 19)
        optimizer = build_optimizer(model, 1e-4, 0.01, [0.9, 0.999])
        for p in model.parameters():  # one step to create the AdamW moments
            p.grad = torch.zeros_like(p)
        optimizer.step()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": 0}
        probe = tempfile.mkdtemp(prefix="hrt-bench-size-")
        size = save_state(probe, state).stat().st_size
        shutil.rmtree(probe)
    blocked: list[float] = []
    pending = None
    for i in range(config["checkpoints"]):
        time.sleep(config["work_s"])  # the training steps between two checkpoints
        start = time.perf_counter()
        metrics = {"iteration": i + 1, "val/mIoU": float(i)}
        if rank == 0:
            assert state is not None
            state["iteration"] = i + 1
            pending = report_checkpoint(metrics, state, mode, pending, 600.0)
        else:
            ray.train.report(metrics, checkpoint=None)
        blocked.append(time.perf_counter() - start)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, blocked)
    return {"blocked": gathered, "bytes": size if rank == 0 else None}


def _run_mode(mode: str, args: argparse.Namespace, storage: str) -> dict[str, Any]:
    name = f"bench-ckpt-{mode}-{uuid.uuid4().hex[:6]}"
    trainer = TorchTrainer(
        _loop,
        train_loop_config={
            "mode": mode,
            "arch": args.arch,
            "checkpoints": args.checkpoints,
            "work_s": args.work_s,
        },
        scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    start = time.perf_counter()
    result = trainer.fit()
    total = time.perf_counter() - start
    if result.error:
        raise RuntimeError(f"{mode}: {result.error}")
    out = result.return_value
    return {"mode": mode, "total_s": total, "checkpoint": result.checkpoint.path, **out}


def run(args: argparse.Namespace) -> int:
    if args.checkpoints < 1 or args.workers < 1:
        print("--checkpoints and --workers must be >= 1", file=sys.stderr)
        return 2
    moto = None
    storage = args.storage
    env: dict[str, str] = {}
    try:
        if storage is None:
            # deferred: boto3 is a dev dependency, needed only to create the benchmark's bucket on moto
            import boto3

            moto, endpoint = _start_moto()
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id="bench",
                aws_secret_access_key="bench",
                region_name="us-east-1",
            ).create_bucket(Bucket=bucket)
            storage = f"s3://{bucket}/runs"
            # moto accepts any credentials; Ray's workers inherit these from this driver.
            env = {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "bench"),
                "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "bench"),
                "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            }
            os.environ.update(env)
        ray.init(
            address="local",
            num_cpus=args.workers + 2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env} if env else None,
        )
        load = os.getloadavg()
        print(
            f"bench checkpoint: {args.arch} weights + AdamW state, {args.checkpoints} checkpoints per mode, "
            f"{args.work_s:.0f} s of simulated work between them, {args.workers} workers, storage {storage}; "
            f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} on {os.cpu_count()} CPUs"
        )
        rows = []
        for mode in args.modes:
            r = _run_mode(mode, args, storage)
            rows.append(r)
            per_rank = r["blocked"]
            print(
                f"{mode:>5}: state {r['bytes'] / 2**30:.2f} GiB; blocked per checkpoint (median / max, s): "
                + ", ".join(
                    f"rank {k} {statistics.median(b):.2f} / {max(b):.2f}" for k, b in enumerate(per_rank)
                )
                + f"; run {r['total_s']:.0f} s (incl. start-up and the final upload)"
            )
        if len(rows) == 2:
            s, a = (statistics.median(r["blocked"][0]) for r in rows)
            print(f"async blocks rank 0 {s / max(a, 1e-9):.1f}x less than sync ({a:.2f} s vs {s:.2f} s)")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if moto is not None:
            moto.terminate()
            try:
                moto.wait(timeout=10)
            except subprocess.TimeoutExpired:
                moto.kill()
    return 0
