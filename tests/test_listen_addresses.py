"""Which addresses the processes of a loopback training run listen on.

On main, rank 0's torch.distributed store (started by ``init_process_group("env://")``) listened
on ``::``, every interface of the machine, although the run's cluster advertised 127.0.0.1.
Here a 2-worker run goes through the trainer's own ``TorchConfig`` and each worker lists its
process's listening sockets (psutil, as vendored by Ray) once the process group is up.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def _loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (``::ffff:127.0.0.1``: a dual-stack socket)."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_every_training_process_listens_on_loopback_only(ray_session, tmp_path: Path) -> None:
    from hrt_ray.config import load_config
    from hrt_ray.train.trainer import build_trainer

    def probe_loop(config: dict[str, Any]) -> list[dict[str, Any]]:
        """Each worker's listening sockets once the process group is up (nested: pickled by value)."""
        import importlib

        import ray.train
        import torch.distributed as dist

        psutil = importlib.import_module("psutil")  # Ray's vendored copy, on sys.path once ray is imported

        conns = psutil.Process().net_connections(kind="inet")
        mine = {
            "rank": ray.train.get_context().get_world_rank(),
            "pid": os.getpid(),
            "store": (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])),
            "listening": sorted(
                {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
            ),
        }
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return everyone

    cfg = load_config(None, [f"storage.path={tmp_path}", "scaling.num_workers=2", "failure.max_failures=0"])
    result = build_trainer(cfg, {}, loop=probe_loop, name="listen-probe").fit()
    assert result.error is None, result.error
    procs = sorted(result.return_value, key=lambda p: p["rank"])
    assert [p["rank"] for p in procs] == [0, 1] and procs[0]["pid"] != procs[1]["pid"]
    store = tuple(procs[0]["store"])
    assert store[0] == "127.0.0.1"
    assert store in [tuple(a) for a in procs[0]["listening"]]  # rank 0 serves the store...
    for p in procs:  # ...and no process listens beyond loopback
        assert p["listening"], p
        assert all(_loopback(ip) for ip, _ in p["listening"]), p
