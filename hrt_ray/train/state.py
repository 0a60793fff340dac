"""Everything a run needs to continue exactly, as one ``weights_only``-loadable file.

A checkpoint directory holds ``checkpoint.pt``: model (``"model"``, the key
``hrt_ray.models.load_checkpoint`` reads), optimiser, scheduler, grad scaler, iteration, best
metric so far, data epoch and every rank's RNG states. RNG states are stored as tensors and
plain Python types so that ``torch.load(weights_only=True)`` can read them back: no pickled
objects, so a checkpoint from an untrusted bucket cannot run code.

The file is written to a temporary name and renamed, so a crash never leaves a half-written
``checkpoint.pt``; Ray then uploads the finished directory (its upload is atomic per
checkpoint: a checkpoint is registered only once fully persisted).
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"


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


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as ``directory/checkpoint.pt`` atomically (temp file, fsync, rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    tmp = directory / f".{CHECKPOINT_FILE}.tmp-{os.getpid()}"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with open(tmp, "wb") as fh:
        fh.write(buffer.getbuffer())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return target


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
        with checkpoint.filesystem.open_input_stream(path) as stream:
            data = stream.read()
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
