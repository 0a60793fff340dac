"""Deterministic worker failures end the run at once, named; only worker/node loss is retried.

Ray Train's ``FailureConfig(max_failures=N)`` would restart the worker group N times for a
corrupt record or a NaN loss, which fail the same way every time. These runs keep
``failure.max_failures=3`` and check that the first failure ends the run with the worker's
own error (a ``DataError`` naming the record, a ``NonFiniteLossError``), through the
``FailFast`` callback, not Ray's retry budget; and that a blown-up run leaves no checkpoint of
a non-finite state.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from stored_checkpoints import complete_states

from hrt_ray.config import ExperimentConfig, load_config
from hrt_ray.train.runlock import LOCK_FILE


def tiny(tmp: Path, name: str, *overrides: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"name={name}",
            f"storage.path={tmp}/runs",
            f"data.train_uri={tmp}/data/train",
            f"data.val_uri={tmp}/data/val",
            "data.synth.generate=true",
            "data.synth.num_train=16",
            "data.synth.num_val=2",
            "data.synth.size=[64,64]",
            "data.batch_size=4",
            "optim.max_iters=4",
            "optim.warmup_iters=1",
            "loss.ohem_min_kept=2000",
            "eval.interval=100",
            "eval.at_start=false",
            "checkpoint.every=1",
            "failure.max_failures=3",
            "failure.stall_timeout_s=300",
            *overrides,
        ],
    )


def test_classification_sees_through_rays_wrappers() -> None:
    from ray.exceptions import RayTaskError, UserCodeException
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from hrt_ray.data import DataError
    from hrt_ray.train.failures import deterministic_error, is_deterministic
    from hrt_ray.train.loop import NonFiniteLossError, NonFiniteStateError

    data = DataError("part-00000.parquet: record 'x': image does not decode")
    assert deterministic_error(UserExceptionWithTraceback(data, "Traceback ...")) is data
    wrapped = UserCodeException("UDF failed")
    wrapped.__cause__ = data
    assert deterministic_error(RayTaskError("map_batches", "tb", wrapped)) is data
    # The chain lost in pickling: the DataError line in Ray's text still names it.
    text_only = UserExceptionWithTraceback(
        RuntimeError("x"), "Traceback ...\nhrt_ray.data.codec.DataError: shard 3: record 'k': bad PNG"
    )
    found = deterministic_error(text_only)
    assert isinstance(found, DataError) and str(found) == "shard 3: record 'k': bad PNG"
    state = RuntimeError('Error(s) in loading state_dict for HRTOCR:\n\tsize mismatch for "w"')
    assert is_deterministic(UserExceptionWithTraceback(state, "tb"))
    # A non-finite loss, or weights blown up by a step, recurs on every retry from the same state.
    loss = NonFiniteLossError("non-finite loss (nan) at iteration 3; this step was not applied")
    weights = NonFiniteStateError("non-finite weights or optimizer state after iteration 2")
    for error in (loss, weights):
        assert deterministic_error(UserExceptionWithTraceback(error, "Traceback ...")) is error
    for retryable in (ConnectionError("peer reset"), RuntimeError("NCCL timeout"), OSError("node died")):
        assert not is_deterministic(UserExceptionWithTraceback(retryable, "tb"))


@pytest.mark.slow
def test_a_blown_up_run_stops_at_once_without_a_non_finite_checkpoint(
    ray_session: None, tmp_path: Path
) -> None:
    """A huge learning rate blows the weights up (nothing is injected: the config alone does it).

    The non-finite loss ends the run on its first occurrence, although ``max_failures=3``, and
    no checkpoint after the last finite one is saved (an async upload of the last reported
    checkpoint may be cut short by the stop, never one after it).
    """
    from ray.train import ControllerError

    from hrt_ray.train.failures import DeterministicFailure
    from hrt_ray.train.trainer import TrainError, fit

    cfg = tiny(tmp_path, "blowup", "optim.lr=1e10", "optim.max_iters=12")
    with pytest.raises(TrainError, match=r"NonFinite(Loss|State)Error: non-finite") as info:
        fit(cfg)
    # Ended by FailFast on the first failure (a ControllerError), not after max_failures retries
    # (Ray's WorkerGroupError).
    ray_error = info.value.__cause__
    assert isinstance(ray_error, ControllerError), type(ray_error)
    assert isinstance(ray_error.controller_failure, DeterministicFailure)
    message = str(info.value)
    assert "no broken state is saved" not in message
    match = re.search(
        r"the last checkpoint \(reported; the run resumes from it\) is at iteration (\d+)", message
    )
    assert match, message
    assert not (tmp_path / "runs" / "blowup" / LOCK_FILE).exists(), "a failed run releases its lock"
    states = complete_states(tmp_path / "runs" / "blowup")
    assert states, "the iterations before the blow-up were checkpointed"
    assert max(s["iteration"] for s in states) <= int(match.group(1))
    for s in states:
        for name, v in s["model"].items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), f"iteration {s['iteration']}: {name}"
        for st in s["optimizer"]["state"].values():
            assert all(torch.isfinite(t).all() for t in st.values() if torch.is_tensor(t))


@pytest.mark.slow
def test_a_corrupt_record_ends_the_run_with_the_named_data_error(ray_session: None, tmp_path: Path) -> None:
    from hrt_ray.data import DataError, ensure_synthetic
    from hrt_ray.train.trainer import fit

    cfg = tiny(tmp_path, "corrupt")
    ensure_synthetic(cfg)
    for shard in sorted((tmp_path / "data" / "train").glob("*.parquet")):
        table = pq.read_table(shard)
        bad = pa.array([b"not an image"] * table.num_rows, pa.binary())
        pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", bad), shard)
    with pytest.raises(DataError, match=r"decode"):
        fit(cfg)
