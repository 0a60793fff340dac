"""Deterministic worker failures end the run at once, named; only worker/node loss is retried.

Ray Train's ``FailureConfig(max_failures=N)`` would restart the worker group N times for a
corrupt record or a NaN loss, which fail the same way every time. These runs keep
``failure.max_failures=3`` and check that the first failure ends the run with the worker's
own error (a ``DataError`` naming the record, a ``NonFiniteLossError``), through the
``FailFast`` callback, not Ray's retry budget.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import NanLossAt

from hrt_ray.config import ExperimentConfig, load_config


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
    for retryable in (ConnectionError("peer reset"), RuntimeError("NCCL timeout"), OSError("node died")):
        assert not is_deterministic(UserExceptionWithTraceback(retryable, "tb"))


@pytest.mark.slow
def test_non_finite_loss_is_not_retried(ray_session: None, tmp_path: Path) -> None:
    from ray.train import ControllerError

    from hrt_ray.train.failures import DeterministicFailure
    from hrt_ray.train.trainer import TrainError, fit

    with pytest.raises(TrainError, match=r"NonFiniteLossError: non-finite loss") as info:
        fit(tiny(tmp_path, "nan"), callbacks=[NanLossAt(2)])
    # Ended by FailFast on the first failure (a ControllerError), not after max_failures retries
    # (Ray's WorkerGroupError).
    ray_error = info.value.__cause__
    assert isinstance(ray_error, ControllerError), type(ray_error)
    assert isinstance(ray_error.controller_failure, DeterministicFailure)


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
