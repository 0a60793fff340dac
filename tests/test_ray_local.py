"""``ensure_ray`` keeps a local instance on loopback even when Ray was imported first."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

# Starts a Ray instance (in a subprocess).
pytestmark = pytest.mark.slow

SCRIPT = """
import ray  # imported before ensure_ray, as the CLIs do: Ray has read its constants already
from hrt_ray.ray_local import ensure_ray
ensure_ray(num_cpus=1)
print("NODES", sorted(n["NodeManagerAddress"] for n in ray.nodes()))
ray.shutdown()
"""


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
