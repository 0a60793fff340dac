"""The torch.distributed process group, with rank 0's store bound to the address Ray advertises.

Why not Ray's own setup: ``TorchConfig`` hands ``init_method="env://"`` to
``torch.distributed.init_process_group``, whose rank 0 then starts a ``TCPStore`` server. That
server (libuv backend, torch 2.13) binds the wildcard address ``::``, whatever ``MASTER_ADDR``
says, so even a run on a loopback-only cluster accepts store connections on every interface of
the machine. ``TCPStore`` does accept an already listening socket (``master_listen_fd``); this
backend binds that socket to the node IP Ray advertises for rank 0 (127.0.0.1 on a loopback
cluster), starts the store on it, and joins every rank through that store. The rest (backend
choice, ``LOCAL_RANK`` and friends, shutdown) is Ray's.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

#: Rank 0's store and its listening socket, kept alive for the life of the worker process.
_SERVER: dict[str, Any] = {}


def serve_store(world_size: int, timeout_s: int) -> tuple[str, int]:
    """On rank 0: a ``TCPStore`` server listening on this node's advertised IP only."""
    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, 0))
    listener.listen(max(128, world_size))
    port = int(listener.getsockname()[1])
    store = dist.TCPStore(
        addr,
        port,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=listener.fileno(),
    )
    _SERVER.update(store=store, listener=listener)
    return addr, port


def join_process_group(
    backend: str, world_rank: int, world_size: int, addr: str, port: int, timeout_s: int
) -> None:
    """On every rank: ``init_process_group`` through rank 0's store (a client on ranks > 0)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    if "nccl" in backend:  # as Ray does: a timed-out NCCL collective must fail, not hang
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    store = (
        _SERVER["store"]
        if world_rank == 0
        else dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    )
    dist.init_process_group(
        backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout
    )


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: BoundStoreTorchConfig) -> None:
        backend = backend_config.backend or "gloo"
        n = len(worker_group)
        addr, port = worker_group.execute_single(
            0, serve_store, world_size=n, timeout_s=backend_config.timeout_s
        )
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get(
            [
                worker_group.execute_single_async(
                    i,
                    join_process_group,
                    backend=backend,
                    world_rank=i,
                    world_size=n,
                    addr=addr,
                    port=port,
                    timeout_s=backend_config.timeout_s,
                )
                for i in range(n)
            ]
        )


@dataclass
class BoundStoreTorchConfig(TorchConfig):
    """``TorchConfig`` whose process-group store listens on rank 0's advertised address only."""

    @property
    def backend_cls(self):
        return _BoundStoreBackend
