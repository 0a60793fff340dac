"""A real 2-process DDP step (gloo on 127.0.0.1, CPU) without "Grad strides do not match bucket
view strides": parameters are re-laid to their gradients' layout before DDP builds its buckets.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NUM_CLASSES = 5
LOSS_ARGS = {
    "ohem": True,
    "ohem_thresh": 0.7,
    "ohem_min_kept": 500,
    "aux_weight": 0.4,
    "ignore_index": 255,
    "class_weights": None,
}
STRIDE_WARNING = "Grad strides do not match bucket view strides"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, channels_last: bool) -> None:
    # C++ warnings reach Python's warnings module from this thread, but also catch anything
    # printed straight to stderr (a warning raised on another thread is printed, not raised).
    err_path = Path(out_dir) / f"stderr-{rank}.txt"
    err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err_fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from hrt_ray.models import build_model
    from hrt_ray.train.ddp_layout import align_parameter_layouts, probe_batch
    from hrt_ray.train.loop import train_step

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model("hrt_tiny_ocr", NUM_CLASSES, channels_last=channels_last).train()
    cpu = torch.device("cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        changed = align_parameter_layouts(
            model, *probe_batch([64, 64], NUM_CLASSES, cpu, channels_last), LOSS_ARGS, None
        )
        same_values = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        ddp = DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(2):  # the second step runs on DDP's rebuilt buckets
            batch = {
                "image": torch.randn(2, 3, 64, 64, generator=g),
                "mask": torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=g),
            }
            train_step(ddp, batch, opt, sched, None, LOSS_ARGS, cpu, None, channels_last=channels_last)
        mismatched = [
            n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()
        ]
    sys.stderr.flush()
    (Path(out_dir) / f"rank-{rank}.json").write_text(
        json.dumps(
            {
                "changed": changed,
                "same_values": same_values,
                "mismatched": mismatched,
                "warnings": [str(w.message) for w in caught],
            }
        )
    )
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False])
def test_two_process_ddp_step_has_no_grad_stride_warning(tmp_path: Path, channels_last: bool) -> None:
    mp.start_processes(
        _worker,
        args=(2, _free_port(), str(tmp_path), channels_last),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    for rank in range(2):
        result = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        stderr = (tmp_path / f"stderr-{rank}.txt").read_text()
        # The mismatch is real without the fix: the depthwise weights were re-laid.
        assert any("dw3x3.weight" in n for n in result["changed"]), result["changed"]
        assert result["same_values"], "re-laying a parameter must not change its values"
        assert result["mismatched"] == []
        assert not [w for w in result["warnings"] if STRIDE_WARNING in w], result["warnings"]
        assert STRIDE_WARNING not in stderr, stderr[-2000:]
