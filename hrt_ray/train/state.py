"""Everything a run needs to continue exactly, as one ``weights_only``-loadable file.

A checkpoint directory holds ``checkpoint.pt``: model (``"model"``, the key
``hrt_ray.models.load_checkpoint`` reads), optimiser, scheduler, grad scaler, iteration, best
metric so far, data epoch and every rank's RNG states. RNG states are stored as tensors and
plain Python types so that ``torch.load(weights_only=True)`` can read them back: no pickled
objects, so a checkpoint from an untrusted bucket cannot run code.

The file is written to a temporary name and renamed, so a crash never leaves a half-written
``checkpoint.pt``; Ray then uploads the finished directory (its upload is atomic per
checkpoint: a checkpoint is registered only once fully persisted).

Beside it, ``hrt-checkpoint.json`` (the *manifest*) records the size and SHA-256 of
``checkpoint.pt``, the iteration, the model and the run's config. A checkpoint directory on
storage is *complete* when its manifest parses and ``checkpoint.pt`` has the recorded size, so
a resume can pick the newest complete checkpoint from storage itself, even one that Ray's run
snapshot never listed (its write failed, or the controller died first), and the driver can read
the config a run was trained with without downloading the weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from hrt_ray import storage
from hrt_ray.train.meter import finite_numbers

CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "hrt-checkpoint.json"
#: Ray names the checkpoint directories it persists ``checkpoint_<timestamp>``.
CHECKPOINT_DIR_PREFIX = "checkpoint_"


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG states as tensors / plain types."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def save_state(
    directory: str | Path, state: dict[str, Any], metrics: dict[str, Any] | None = None
) -> Path:
    """Write ``state`` as ``directory/checkpoint.pt`` atomically (temp file, fsync, rename), then
    its manifest (size, SHA-256, iteration, model, config and the finite numbers of the report
    ``metrics`` it was checkpointed with), also atomically.

    The metrics are in the manifest so that whoever resumes the run can see what that report
    said without loading the weights: a resumed sweep trial hands them to Tune again when the
    interruption fell between the checkpoint and Tune's receipt of the report.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    _write_atomic(target, payload)
    manifest = {
        "format": 1,
        "file": CHECKPOINT_FILE,
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "iteration": int(state.get("iteration", 0)),
        "arch": state.get("arch"),
        "num_classes": state.get("num_classes"),
        "config": state.get("config"),
        "metrics": finite_numbers(metrics or {}),
    }
    _write_atomic(directory / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    return target


def _write_atomic(target: Path, data: Any) -> None:
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


# --------------------------------------------------------------------------------------------
# Checkpoints as they lie on storage
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredCheckpoint:
    """A complete checkpoint directory on storage (``path`` is inside ``filesystem``)."""

    path: str
    iteration: int
    manifest: dict[str, Any]


def complete_checkpoints(filesystem: Any, run_path: str) -> list[StoredCheckpoint]:
    """The complete checkpoints directly under ``run_path``, oldest first (by iteration, then name).

    Complete = the manifest parses and ``checkpoint.pt`` has the size it records. A directory
    without a manifest (written before manifests existed, or still uploading) does not count.
    """
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(run_path, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return []
    sizes: dict[str, int] = {}
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        parent, name = posixpath.split(info.path)
        if posixpath.dirname(parent).rstrip("/") != run_path.rstrip("/"):
            continue
        if posixpath.basename(parent).startswith(CHECKPOINT_DIR_PREFIX):
            sizes[info.path] = int(info.size or 0)
    found = []
    for manifest_path in sorted(p for p in sizes if p.endswith("/" + MANIFEST_FILE)):
        directory = posixpath.dirname(manifest_path)
        try:
            manifest = json.loads(storage.read_all(filesystem, manifest_path))
        except FileNotFoundError:
            continue
        except ValueError:  # a half-written manifest (local copy interrupted)
            continue
        data_path = f"{directory}/{manifest.get('file', CHECKPOINT_FILE)}"
        if sizes.get(data_path) != manifest.get("size"):
            continue
        found.append(StoredCheckpoint(directory, int(manifest.get("iteration", -1)), manifest))
    return sorted(found, key=lambda c: (c.iteration, c.path))


def read_stored_state(filesystem: Any, checkpoint: StoredCheckpoint) -> dict[str, Any]:
    """Load a stored checkpoint, checking its SHA-256 against the manifest (``weights_only``)."""
    path = f"{checkpoint.path}/{checkpoint.manifest.get('file', CHECKPOINT_FILE)}"
    data = storage.read_all(filesystem, path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != checkpoint.manifest.get("sha256"):
        raise OSError(f"{path}: SHA-256 {digest} differs from its manifest's: the file is damaged")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (or a checkpoint directory) onto the CPU, ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint file")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_reported_state(checkpoint: Any) -> dict[str, Any]:
    """Load the state of a ``ray.train.Checkpoint`` straight from its filesystem, into memory.

    Not through ``Checkpoint.as_directory()``: for remote storage that shares one download
    directory per node between the workers of a run, and a worker that gets there after the first
    download finished downloads again over the file another worker is still reading (seen as
    ``PytorchStreamReader failed reading file data/...`` on resume from S3).
    """
    path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}"
    try:
        data = storage.read_all(checkpoint.filesystem, path)
    except OSError as exc:  # FileNotFoundError included
        raise FileNotFoundError(f"{path}: cannot read the checkpoint ({exc})") from exc
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / torch.compile wrappers (its state_dict keys are portable)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
