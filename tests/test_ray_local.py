"""``ensure_ray`` keeps a local instance on loopback even when Ray was imported first, and names
an unreachable ``RAY_ADDRESS`` at once instead of retrying it for minutes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest

SCRIPT = """
import ray  # imported before ensure_ray, as the CLIs do: Ray has read its constants already
from hrt_ray.ray_local import ensure_ray
ensure_ray(num_cpus=1)
print("NODES", sorted(n["NodeManagerAddress"] for n in ray.nodes()))
ray.shutdown()
"""


@pytest.mark.slow  # starts a Ray instance (in a subprocess)
def test_local_instance_advertises_loopback_only():
    drop = ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    # Its own short session dir (socket paths are limited to 107 bytes): never joins another instance.
    with tempfile.TemporaryDirectory(prefix="rl-", dir="/tmp") as tmp:
        env["RAY_TMPDIR"] = tmp
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NODES ['127.0.0.1']" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_unreachable_ray_address_is_one_line_and_exit_2(tmp_path) -> None:
    """A head that is down (or a mistyped port): ``ray.init`` alone retries for minutes."""
    with socket.socket() as s:  # a loopback port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    hrt_ray = os.path.join(os.path.dirname(sys.executable), "hrt-ray")
    proc = subprocess.run(
        [hrt_ray, "train", "optim.max_iters=2", "optim.warmup_iters=1", f"storage.path={tmp_path}/runs"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"RAY_ADDRESS=127.0.0.1:{port}: nothing answers there" in lines[0], lines
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint_*"))
