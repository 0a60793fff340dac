"""Start or join Ray for a command: the cluster in ``RAY_ADDRESS``, else a local instance.

The embedded default (``make train`` on a laptop or CI box) starts a local instance with
more logical CPUs than cores: Ray Train's workers' CPUs are excluded from Ray Data's budget,
so data tasks need headroom beside two CPU train workers (see shared notes on Ray 2.60).
Local instances stay on loopback: Ray otherwise advertises the machine's external address.
"""

from __future__ import annotations

import logging
import os
import socket

#: Logical CPUs of a local instance: 2 train workers + data tasks + the file-listing task.
MIN_LOCAL_CPUS = 4


class RayStartError(RuntimeError):
    """Ray could not be started or joined (the message says which and what to check)."""


def ensure_ray(num_cpus: int | None = None, *, verbose: bool = True) -> None:
    """Connect to Ray once per process (idempotent).

    ``verbose=False`` keeps Ray's own output off the console: workers' stdout/stderr (report
    dumps, library warnings, raylet notices) stay in the session's log files, and the driver's
    Ray loggers print warnings and errors only.
    """
    # deferred: command modules import ray_local at their top; Ray loads only when a command starts it
    import ray

    if ray.is_initialized():
        return
    where = os.environ.get("RAY_ADDRESS") or "a new local instance"
    if os.environ.get("RAY_ADDRESS"):
        _check_reachable(os.environ["RAY_ADDRESS"])
    try:
        _init(ray, num_cpus, verbose)
    except Exception as exc:  # ray.init raises bare Exception on a start-up timeout
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise RayStartError(
            f"could not start or join Ray ({where}): {first}. Check that RAY_ADDRESS names a running "
            f"cluster (or unset it for a local instance) and that the machine has free memory and disk"
        ) from exc


#: Ray's notice, on every start of a local instance, that token authentication is on (Ray
#: 2.60's default): right for a local instance, and no warning to show on a quiet console.
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def _init(ray, num_cpus: int | None, verbose: bool) -> None:
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    if not verbose:
        logging.getLogger(TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
    # The job's workers call the State API too (Ray Train's placement-group cleaner, which frees
    # the workers of an early-stopped Tune trial). Without an address in their environment Ray
    # guesses one, and fails when several Ray instances run on the node.
    if os.environ.get("RAY_ADDRESS"):
        ray.init(
            **{"log_to_driver": True, **quiet},
            runtime_env={"env_vars": {"RAY_ADDRESS": os.environ["RAY_ADDRESS"]}},
        )
        return
    # Makes Ray's node-IP lookup answer 127.0.0.1 for this single-node instance. Ray reads the
    # variable once, when it is first imported (often before this call), so the constant is set
    # too; the raylet, GCS and workers started below read the variable themselves.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        # deferred: command modules import ray_local at their top; Ray loads only when a command starts it
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = _free_port()
    ray.init(
        # "local": without it ray.init() joins whatever cluster `ray start` last left on this
        # machine (another user's, or a test's), despite RAY_ADDRESS being unset.
        address="local",
        num_cpus=num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1),
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        include_dashboard=True,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        **quiet,
    )


#: Seconds to wait for a TCP connection to the head's GCS before giving up on ``RAY_ADDRESS``.
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str) -> None:
    """Fail in seconds when nothing listens at ``RAY_ADDRESS`` (``host:port``).

    ``ray.init`` retries an unreachable GCS for minutes, printing C++ warnings, before it
    raises; a typo in the address or a head that is down should be named at once. ``auto``,
    ``local`` and ``ray://`` (Ray Client) addresses are left to Ray.
    """
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RayStartError(
            f"could not join Ray at RAY_ADDRESS={address}: nothing answers there ({reason}). Check "
            f"that the head node is up and the address is its GCS port (6379 by default), or unset "
            f"RAY_ADDRESS for a local instance"
        ) from exc


def logs_dir() -> str | None:
    """This node's Ray session log directory (workers' output, raylet, GCS), if Ray is up."""
    # deferred: command modules import ray_local at their top; Ray loads only when a command starts it
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_logs_dir_path() if ray.is_initialized() and node is not None else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
