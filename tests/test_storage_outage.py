"""A 25 s object-storage outage in the middle of a run loses nothing.

The run writes checkpoints (every iteration), Ray's controller snapshot and TensorBoard files to
the loopback S3 server through a TCP proxy (tests/fault_proxy.py). Once the first checkpoint is
in the bucket, the proxy cuts every open connection and refuses every new one for 25 s. With
``failure.max_failures=0``, any write that gives up ends the run: it must ride the outage out on
``storage.retries`` alone, finish, and leave every checkpoint complete.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fault_proxy import FaultProxy
from test_train_ray import tiny_config as base_config


def tiny_config(*args: object) -> object:
    """test_train_ray's tiny run, with a stall timeout that survives a heavily loaded box."""
    return base_config(*args, "failure.stall_timeout_s=600")

OUTAGE_S = 25.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.mark.slow
def test_run_survives_a_25s_storage_outage(
    ray_session: None, s3_server: str, s3_bucket: str, data_dir: Path
) -> None:
    import pyarrow.fs as pafs
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from hrt_ray import storage
    from hrt_ray.train.state import complete_checkpoints
    from hrt_ray.train.trainer import fit

    proxy = FaultProxy(urlsplit(s3_server).port)
    cfg = tiny_config(
        data_dir,
        f"{s3_bucket}/runs",
        "outage",
        f"storage.endpoint={proxy.endpoint}",
        "optim.max_iters=8",
        "eval.interval=4",
        "checkpoint.every=1",
        "checkpoint.keep=8",
        "failure.max_failures=0",
        "storage.retries=6",  # waits 1+2+4+8+16+30 s at most: more than the outage
        "storage.retry_backoff_s=1.0",
    )
    # The test watches the bucket directly (not through the proxy).
    direct = storage.resolve(f"{s3_bucket}/runs/outage", s3_server)
    injected: dict[str, float] = {}

    def inject() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = complete_checkpoints(direct.filesystem, direct.path)
            if done:
                injected["at_iteration"] = done[-1].iteration
                injected["start"] = time.monotonic()
                proxy.outage(OUTAGE_S)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=inject, daemon=True)
    started = time.monotonic()
    watcher.start()
    try:
        summary = fit(cfg)
    finally:
        proxy.close()
    ended = time.monotonic()
    watcher.join(timeout=1)

    assert "start" in injected, "the outage was injected"
    assert ended - injected["start"] > OUTAGE_S, "the run was still going when the outage ended"
    assert proxy.refused + proxy.cut > 0, "the run tried storage during the outage"
    # Survived: the run finished without a restart, at the last iteration.
    assert summary.iteration == 8 and summary.resumed_from is None
    # Lost: nothing. Every iteration's checkpoint is complete in the bucket, Ray registered the
    # last one, and validation ran at 4 and 8.
    stored = complete_checkpoints(direct.filesystem, direct.path)
    assert [c.iteration for c in stored] == list(range(1, 9))
    assert summary.checkpoint and summary.checkpoint.endswith(stored[-1].path.rsplit("/", 1)[-1])
    snapshot_uri = f"{s3_bucket}/runs/outage/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"
    snapshot = storage.read_bytes(snapshot_uri, s3_server)
    assert b'"iteration": 8' in snapshot or b'"iteration":8' in snapshot
    assert [h[0] for h in summary.history] == [4.0, 8.0]
    assert storage.list_files(f"{s3_bucket}/runs/outage/tensorboard", endpoint=s3_server)
    assert direct.filesystem.get_file_info(f"{direct.path}/.hrt-run.lock").type == pafs.FileType.NotFound
    print(
        f"\noutage: {OUTAGE_S:.0f} s from iteration {injected['at_iteration']} "
        f"({proxy.cut} open connections cut, {proxy.refused} connection attempts refused); "
        f"run took {ended - started:.0f} s, finished at iteration {summary.iteration} without restart; "
        f"complete checkpoints in the bucket: {[c.iteration for c in stored]}"
    )


# --------------------------------------------------------------------------------------------
# The retrying filesystem on its own (no Ray): what it retries and what it does not
# --------------------------------------------------------------------------------------------


def test_writes_and_reads_ride_out_a_short_outage(s3_server: str, s3_bucket: str) -> None:
    from hrt_ray import storage

    proxy = FaultProxy(urlsplit(s3_server).port)
    policy = storage.RetryPolicy(retries=5, backoff_s=0.5)  # up to 0.5+1+2+4+8 s of waiting
    try:
        uri = f"{s3_bucket}/x/blob.bin"
        payload = bytes(range(256)) * 4096  # 1 MiB
        proxy.outage(3.0)
        started = time.monotonic()
        storage.write_bytes(uri, payload, proxy.endpoint, policy)
        assert time.monotonic() - started >= 2.5, "the write waited for the outage to end"
        proxy.outage(3.0)
        assert storage.read_bytes(uri, proxy.endpoint, policy) == payload
        assert proxy.refused > 0
        # Without retries the same outage is an error naming the URI.
        proxy.outage(3.0)
        with pytest.raises(storage.StorageError, match="blob.bin"):
            storage.write_bytes(uri, b"lost", proxy.endpoint, storage.NO_RETRY)
        time.sleep(3.0)
        assert storage.read_bytes(uri, proxy.endpoint, policy) == payload, "the failed write changed nothing"
    finally:
        proxy.close()


def test_errors_that_retrying_cannot_fix_fail_at_once(s3_server: str, s3_bucket: str) -> None:
    from hrt_ray import storage

    slow = storage.RetryPolicy(retries=3, backoff_s=5.0)
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="not found"):
        storage.read_bytes(f"{s3_bucket}/missing.bin", s3_server, slow)
    assert time.monotonic() - started < 5.0
    assert not storage.is_transient(FileNotFoundError("x"))
    assert storage.is_transient(OSError("AWS Error NETWORK_CONNECTION during PutObject: curlCode: 7"))
    assert storage.is_transient(OSError("AWS Error UNKNOWN (HTTP status 503) during PutObject operation"))
    assert not storage.is_transient(OSError("AWS Error ACCESS_DENIED during PutObject: Access Denied"))
