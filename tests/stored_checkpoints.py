"""Checkpoint states of a local run directory, counted the way a resume counts them.

A worker killed while Ray copies its checkpoint into storage leaves ``checkpoint_*/checkpoint.pt``
half-written there (the copy is file by file, not atomic). The product never reads such a
directory: :func:`hrt_ray.train.state.complete_checkpoints` takes only those whose manifest
parses and whose ``checkpoint.pt`` has the recorded size. Tests read the same set, so a crash
mid-upload is not mistaken for a corrupt checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from hrt_ray.train.state import complete_checkpoints, read_stored_state


def complete_states(run_dir: Path) -> list[dict[str, Any]]:
    """The loaded states of ``run_dir``'s complete checkpoints, oldest first."""
    fs = pafs.LocalFileSystem()
    return [read_stored_state(fs, ckpt) for ckpt in complete_checkpoints(fs, str(run_dir))]


def stored_iterations(run_dir: Path) -> list[int]:
    """The iterations of ``run_dir``'s complete checkpoints, oldest first (manifests only)."""
    return [ckpt.iteration for ckpt in complete_checkpoints(pafs.LocalFileSystem(), str(run_dir))]
