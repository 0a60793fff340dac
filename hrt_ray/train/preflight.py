"""The resource preflight before ``fit()``: what the cluster can ever provide, and waiting for it.

Ray Train V2 retries a worker group that cannot get its resources forever, as a controller
error, with no message. So before ``fit()`` the request (the workers' bundles plus the CPUs
Ray Data needs beside them) is checked against:

- the running nodes (their total resources), and
- on an autoscaling cluster, the node types the autoscaler may launch, each up to its
  ``max_workers``. They come from the cluster config the autoscaler publishes to the GCS
  (``ray._private.state.state.get_cluster_config()``, what Ray Data reads) or, where it does
  not publish one (a ``ray up`` cluster), from the autoscaling config file: the head's
  ``~/ray_bootstrap_config.yaml`` that ``ray up`` writes and the autoscaler reads, or
  ``scaling.autoscaler_config``.

A request that nothing can ever satisfy fails at once with :class:`ResourceError`, naming what
was asked and what exists. On an autoscaling cluster a request that could be satisfied but is
not yet (nodes still launching, a node type at its ``max_workers``, no quota or no spot
capacity) waits: a placement group of the same shape as Train's is the demand the autoscaler
sees and scales for, and every ``scaling.resource_report_interval_s`` the autoscaler's own
report (pending and failed launches, infeasible requests: what ``ray status`` shows) is
printed. After ``scaling.resource_wait_s`` it fails with that report.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray._private.state
import yaml
from ray._raylet import GcsClient
from ray.autoscaler.sdk import request_resources
from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply, NodeStatus
from ray.util.placement_group import placement_group, remove_placement_group

from hrt_ray.config import ExperimentConfig

#: Where ``ray up`` puts the autoscaling config on the head (the autoscaler reads it there).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
#: Resource names of a node type that are not schedulable Ray resources.
_NOT_RESOURCES = {"object_store_memory"}
_EPS = 1e-9


class ResourceError(RuntimeError):
    """The cluster cannot satisfy the scaling request (raised before ``fit()``)."""


@dataclass(frozen=True)
class NodeType:
    """A worker node type the autoscaler may launch (``max_workers < 0``: no limit)."""

    name: str
    resources: dict[str, float]
    min_workers: int
    max_workers: int

    def describe(self) -> str:
        cap = "no limit" if self.max_workers < 0 else f"max {self.max_workers}"
        return f"{self.name} {_fmt(self.resources)} x {cap}"


@dataclass(frozen=True)
class Request:
    """What one run asks for: ``workers`` bundles of ``bundle`` plus ``data`` for Ray Data."""

    workers: int
    bundle: dict[str, float]
    data: dict[str, float]

    def bundles(self) -> list[dict[str, float]]:
        return [dict(self.bundle) for _ in range(self.workers)] + [dict(self.data)]

    def total(self) -> dict[str, float]:
        asked = {k: v * self.workers for k, v in self.bundle.items()}
        for k, v in self.data.items():
            asked[k] = asked.get(k, 0.0) + v
        return asked

    def describe(self) -> str:
        data = self.data.get("CPU", 0.0)
        return (
            f"{self.workers} worker(s) x {_fmt(self.bundle)} plus {data:g} CPU for Ray Data = "
            f"{_fmt(self.total())}"
        )


# --------------------------------------------------------------------------------------------
# The request
# --------------------------------------------------------------------------------------------


def worker_bundle(cfg: ExperimentConfig) -> dict[str, float]:
    """The resources of one Ray Train worker (``ScalingConfig.resources_per_worker``)."""
    bundle = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        bundle["GPU"] = cfg.scaling.gpus_per_worker
    bundle.update(cfg.scaling.resources_per_worker)
    return {k: v for k, v in bundle.items() if v > 0}


def resource_request(cfg: ExperimentConfig, num_workers: int | None = None) -> Request:
    # An elastic run starts once its minimum group fits.
    n = (cfg.scaling.min_workers or cfg.scaling.num_workers) if num_workers is None else num_workers
    return Request(n, worker_bundle(cfg), {"CPU": cfg.scaling.cpus_per_data_worker})


def fits(request: Request, nodes: list[dict[str, float]]) -> tuple[bool, int]:
    """Whether ``nodes`` can hold the request: its worker bundles (a bundle cannot span nodes)
    and, in total, the CPUs for Ray Data, which Train's workers' CPUs are excluded from."""
    placed = 0
    for res in nodes:
        counts = [math.floor(res.get(k, 0.0) / v + _EPS) for k, v in request.bundle.items()]
        placed += min(counts) if counts else request.workers
    total: dict[str, float] = {}
    for res in nodes:
        for k, v in res.items():
            total[k] = total.get(k, 0.0) + v
    short = any(total.get(k, 0.0) + _EPS < v for k, v in request.total().items())
    return placed >= request.workers and not short, placed


# --------------------------------------------------------------------------------------------
# What the cluster has and may launch
# --------------------------------------------------------------------------------------------


def node_types(cfg: ExperimentConfig) -> tuple[list[NodeType], str | None]:
    """The worker node types the autoscaler may launch, and where they were read from.

    ``([], None)`` when the cluster publishes none and no autoscaling config file is found
    (a fixed-size cluster, or an autoscaler whose node types this driver cannot see).
    """
    published = ray._private.state.state.get_cluster_config()
    if published is not None and published.node_group_configs:
        types = [
            NodeType(
                name=g.name,
                resources={k: float(v) for k, v in g.resources.items()},
                min_workers=int(g.min_count),
                max_workers=int(g.max_count),
            )
            for g in published.node_group_configs
        ]
        return types, "the cluster config published to the GCS"
    explicit = cfg.scaling.autoscaler_config
    path = Path(explicit or BOOTSTRAP_CONFIG).expanduser()
    if explicit is None and not path.is_file():
        return [], None
    return read_autoscaling_config(path, "scaling.autoscaler_config" if explicit else None), str(path)


def read_autoscaling_config(path: Path, key: str | None = None) -> list[NodeType]:
    """Worker node types of a cluster-launcher / autoscaling config (``available_node_types``).

    Node types without ``resources`` (filled in from the instance type by the cloud provider at
    bootstrap) are skipped: what they hold is unknown here.
    """
    where = f"{key}: {path}" if key else str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ResourceError(f"{where}: cannot read the autoscaling config: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ResourceError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("available_node_types"), dict):
        raise ResourceError(f"{where}: no available_node_types mapping; is this a Ray cluster config?")
    head = data.get("head_node_type")
    types = []
    for name, spec in data["available_node_types"].items():
        if name == head or not isinstance(spec, dict) or not isinstance(spec.get("resources"), dict):
            continue
        resources = {
            str(k): float(v) for k, v in spec["resources"].items() if k not in _NOT_RESOURCES and v
        }
        types.append(
            NodeType(
                name=str(name),
                resources=resources,
                min_workers=int(spec.get("min_workers", 0)),
                max_workers=int(spec.get("max_workers", data.get("max_workers", 0))),
            )
        )
    return types


def _launchable(types: list[NodeType], request: Request) -> list[dict[str, float]]:
    """Every node the autoscaler could run at once: each type at its ``max_workers`` (a type
    without a limit, up to as many nodes as the request has bundles)."""
    nodes: list[dict[str, float]] = []
    for t in types:
        count = request.workers + 1 if t.max_workers < 0 else t.max_workers
        nodes += [t.resources] * count
    return nodes


@dataclass
class ClusterState:
    """One reading of the GCS's cluster status: the nodes and what the autoscaler reports."""

    totals: list[dict[str, float]]
    available: list[dict[str, float]]
    autoscaler: bool
    report: list[str]


def cluster_state() -> ClusterState:
    """Nodes and the autoscaler's report from one ``GetClusterStatus`` call (``ray status``)."""
    reply = GetClusterStatusReply.FromString(
        GcsClient(address=ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=30)
    )
    alive = [
        n
        for n in reply.cluster_resource_state.node_states
        if n.status in (NodeStatus.RUNNING, NodeStatus.IDLE)
    ]
    state = reply.autoscaling_state
    report = []
    for r in state.pending_instance_requests:
        report.append(f"launching {r.count} x {r.ray_node_type_name}")
    for p in state.pending_instances:
        report.append(f"pending node {p.ray_node_type_name} {p.instance_id} {p.details}".rstrip())
    for f in state.failed_instance_requests:
        report.append(f"failed launch {f.count} x {f.ray_node_type_name}: {f.reason}")
    infeasible = [dict(r.resources_bundle) for r in state.infeasible_resource_requests]
    infeasible += [
        dict(r.resources_bundle) for g in state.infeasible_gang_resource_requests for r in g.requests
    ]
    infeasible += [
        dict(r.request.resources_bundle)
        for c in state.infeasible_cluster_resource_constraints
        for r in c.resource_requests
    ]
    if infeasible:
        report.append("the autoscaler reports as infeasible now: " + ", ".join(_fmt(b) for b in infeasible))
    if not report and state.autoscaler_state_version:
        report.append("the autoscaler reports no pending or failed launch")
    return ClusterState(
        totals=[dict(n.total_resources) for n in alive],
        available=[dict(n.available_resources) for n in alive],
        autoscaler=bool(state.autoscaler_state_version),
        report=report,
    )


# --------------------------------------------------------------------------------------------
# The preflight
# --------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    """To the process's real stderr: ``hrt-ray train`` keeps library chatter off the console by
    redirecting ``sys.stdout``/``sys.stderr`` to the run's log, but a run waiting for nodes must
    say so where the person (or ``ray job logs``) looks."""
    print(f"preflight: {message}", file=sys.__stderr__ or sys.stderr, flush=True)


@contextmanager
def preflight(
    cfg: ExperimentConfig,
    num_workers: int | None = None,
    *,
    wait: bool = True,
    say: Callable[[str], None] = _say,
) -> Iterator[Hold]:
    """Check the request; on an autoscaling cluster, have it scaled for and wait (see module doc).

    Yields a :class:`Hold` on the placed resources: call ``release()`` right before
    ``fit()``. While the body runs the request also stays registered with the autoscaler
    (``request_resources``); both are withdrawn when the body ends. ``wait=False`` only fails
    on what can never be satisfied (a sweep checks one trial without holding nodes).
    """
    request = resource_request(cfg, num_workers)
    state = cluster_state()
    ok_now, placed = fits(request, state.totals)
    types, source = node_types(cfg)
    autoscaling = bool(types) or state.autoscaler
    if not autoscaling:
        if not ok_now:
            raise ResourceError(_static_message(cfg, request, state, placed))
        yield Hold()
        return
    if types and not fits(request, state.totals + _launchable(types, request))[0]:
        raise ResourceError(_never_message(request, state, types, source))
    if not wait or fits(request, state.available)[0]:
        yield Hold()
        return
    hold = _wait_for(cfg, request, types, say)
    try:
        yield hold
    finally:
        hold.release()
        _release()


def check_resources(cfg: ExperimentConfig, num_workers: int | None = None, *, wait: bool = True) -> None:
    """:func:`preflight` without a body: check (and on an autoscaling cluster wait) now."""
    with preflight(cfg, num_workers, wait=wait):
        pass


class Hold:
    """The placed preflight placement group, kept until Train is about to place its own.

    Held while the driver prepares the datasets and the trainer, so the nodes just launched
    do not idle out (``idle_timeout_minutes``) before ``fit()`` asks for them again.
    """

    def __init__(self, pg: Any = None) -> None:
        self._pg = pg

    def release(self) -> None:
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None


def _wait_for(
    cfg: ExperimentConfig, request: Request, types: list[NodeType], say: Callable[[str], None]
) -> Hold:
    """Ask for the request as Train will (a PACK placement group) and wait until it is placed."""
    deadline = cfg.scaling.resource_wait_s
    interval = cfg.scaling.resource_report_interval_s
    request_resources(bundles=request.bundles())
    pg = placement_group(request.bundles(), strategy="PACK", name="hrt-ray-preflight")
    start = time.monotonic()
    say(f"waiting up to {deadline:g} s for the autoscaler to provide {request.describe()}")
    while True:
        left = deadline - (time.monotonic() - start)
        ready, _ = ray.wait([pg.ready()], timeout=max(0.0, min(interval, left)))
        if ready:
            say(f"resources ready after {time.monotonic() - start:.0f} s")
            return Hold(pg)
        report = cluster_state().report
        waited = time.monotonic() - start
        if waited + _EPS >= deadline:
            remove_placement_group(pg)
            _release()
            raise ResourceError(
                f"scaling asks for {request.describe()}; the node types could provide it "
                f"({'; '.join(t.describe() for t in types) or 'node types not visible to this driver'}) "
                f"but the cluster did not within scaling.resource_wait_s={deadline:g} s. "
                f"Autoscaler: {'; '.join(report) or 'no report'}. Check quota and capacity of "
                f"the node types (`ray status`, the autoscaler log), or raise scaling.resource_wait_s"
            )
        say(f"still waiting after {waited:.0f} s for {_fmt(request.total())}: " + "; ".join(report))


def _release() -> None:
    request_resources(bundles=[])


def _static_message(cfg: ExperimentConfig, request: Request, state: ClusterState, placed: int) -> str:
    have_all: dict[str, float] = {}
    for res in state.totals:
        for k, v in res.items():
            have_all[k] = have_all.get(k, 0.0) + v
    have = {k: have_all.get(k, 0.0) for k in request.total()}
    return (
        f"scaling asks for {request.describe()}, but the cluster has {_fmt(have)} "
        f"({len(state.totals)} node(s); {placed} worker bundle(s) fit) and no autoscaler. Lower "
        f"scaling.num_workers / scaling.cpus_per_worker / scaling.gpus_per_worker, or add nodes"
    )


def _never_message(request: Request, state: ClusterState, types: list[NodeType], source: str | None) -> str:
    keys = set(request.total()).union(*(t.resources for t in types))
    running = ", ".join(_fmt({k: v for k, v in n.items() if k in keys}) for n in state.totals) or "none"
    launchable = "; ".join(t.describe() for t in types if t.max_workers != 0) or "none"
    return (
        f"scaling asks for {request.describe()}, which no node of this cluster can ever provide. "
        f"Running nodes: {running}. Node types the autoscaler may launch (from {source}): "
        f"{launchable}. Lower scaling.num_workers / scaling.cpus_per_worker / "
        f"scaling.gpus_per_worker / scaling.resources_per_worker, or add a node type that fits"
    )


def _fmt(resources: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"
