"""hrt_ray.storage against local disk and a real S3-compatible server on loopback."""

from __future__ import annotations

import os

import pytest

from hrt_ray import storage


def test_local_roundtrip_is_atomic_and_lists(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.exists(uri)
    # No temp files left beside the published one.
    assert os.listdir(tmp_path / "a") == ["b.bin"]
    storage.write_bytes(str(tmp_path / "a" / "c.txt"), b"x")
    listed = storage.list_files(str(tmp_path), suffix=".bin")
    assert listed == [str(tmp_path / "a" / "b.bin")]


def test_file_scheme_and_join(tmp_path):
    loc = storage.resolve(f"file://{tmp_path}")
    assert loc.path == str(tmp_path)
    assert loc.join("x", "y.bin").path == str(tmp_path / "x" / "y.bin")


def test_s3_roundtrip(s3_bucket):
    uri = f"{s3_bucket}/prefix/obj.bin"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00\x01payload")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"\x00\x01payload"
    assert storage.list_files(f"{s3_bucket}/prefix") == [f"{s3_bucket[5:]}/prefix/obj.bin"]
    assert storage.resolve(uri).join("z").uri == f"{uri}/z"


def test_s3_explicit_endpoint_overrides_env(s3_bucket, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    uri = f"{s3_bucket}/explicit.bin"
    storage.write_bytes(uri, b"ok", endpoint=s3_server)
    assert storage.read_bytes(uri, endpoint=s3_server) == b"ok"


@pytest.mark.parametrize(
    ("uri", "message"),
    [("", "empty URI"), ("s3://", "needs a bucket"), ("ftp://host/x", "unsupported scheme")],
)
def test_bad_uris_name_the_problem(uri, message):
    with pytest.raises(storage.StorageError, match=message):
        storage.resolve(uri)


def test_missing_object_names_the_uri(s3_bucket, tmp_path):
    with pytest.raises(storage.StorageError, match=rf"{s3_bucket}/nope.bin: not found"):
        storage.read_bytes(f"{s3_bucket}/nope.bin")
    with pytest.raises(storage.StorageError, match="not found"):
        storage.read_bytes(str(tmp_path / "missing.bin"))


def test_missing_bucket_names_the_uri(s3_server):
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket-xyz/obj"):
        storage.read_bytes("s3://no-such-bucket-xyz/obj")


@pytest.fixture()
def s3_auth_server():
    """A second loopback S3 server that checks credentials (moto's IAM auth on from the start)."""
    import subprocess
    import sys

    from conftest import _wait_for_port, free_port

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_wrong_credentials_name_the_uri(s3_auth_server, monkeypatch):
    """Keys the server does not know: every read path says which URI failed and why."""
    from hrt_ray.data.check import check
    from hrt_ray.data.codec import DataError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    uri = "s3://shards/cityscapes/train"
    with pytest.raises(storage.StorageError, match=rf"{uri}/manifest.json: cannot read: .*ACCESS_DENIED"):
        storage.read_bytes(f"{uri}/manifest.json", endpoint=s3_auth_server)
    with pytest.raises(storage.StorageError, match=rf"{uri}: cannot list"):
        storage.list_files(uri, endpoint=s3_auth_server)
    with pytest.raises((storage.StorageError, DataError), match=uri):
        check(uri, endpoint=s3_auth_server)
    # The trainer's path: the shard set is opened on the driver, before any Ray resource.
    from hrt_ray.config import load_config
    from hrt_ray.data import build_datasets

    cfg = load_config(
        None, [f"data.train_uri={uri}", "data.val_uri=s3://shards/v", f"storage.endpoint={s3_auth_server}"]
    )
    with pytest.raises((storage.StorageError, DataError), match=uri):
        build_datasets(cfg)




def _counting_gets(proxy, read, *args):
    """What ``read(*args)`` returns, and how many GET requests it sent through ``proxy``."""
    before = proxy.gets
    result = read(*args)
    return result, proxy.gets - before


@pytest.mark.parametrize("retries", [0, 2], ids=["plain", "retrying"])
def test_whole_file_reads_are_one_request_each(s3_bucket, s3_server, tmp_path, retries):
    """A checkpoint read from object storage is one GET, not one per small chunk.

    pyarrow's S3 input *stream* fetches an object in 256 KiB ranged GETs (33 for this 8 MiB
    file; a 75 MB checkpoint took 18-20 s from the loopback server that way, 0.2 s as one GET).
    Every whole-file read of hrt-ray (``storage.read_bytes``, the stored and the Ray-reported
    checkpoint on resume, the checkpoint digest of ``predict``) goes through a random-access
    file instead, on the plain and on the retrying filesystem. A loopback proxy in front of the
    real S3 server counts the requests.
    """
    from urllib.parse import urlsplit

    import pyarrow.fs as pafs
    import torch
    from fault_proxy import FaultProxy
    from ray.train import Checkpoint

    from hrt_ray.infer.predict import file_digest
    from hrt_ray.train.state import complete_checkpoints, load_reported_state, read_stored_state, save_state

    state = {"iteration": 3, "model": {"w": torch.arange(2 << 20, dtype=torch.float32)}}  # 8 MiB
    save_state(tmp_path / "checkpoint_000003", state)
    run_uri = f"{s3_bucket}/runs/reads"
    data_uri = f"{run_uri}/checkpoint_000003/checkpoint.pt"
    direct = storage.resolve(run_uri, s3_server)
    pafs.copy_files(
        str(tmp_path / "checkpoint_000003"), f"{direct.path}/checkpoint_000003",
        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=direct.filesystem,
    )
    retry = storage.RetryPolicy(retries=retries, backoff_s=0.1) if retries else None
    proxy = FaultProxy(urlsplit(s3_server).port)
    try:
        loc = storage.resolve(run_uri, proxy.endpoint, retry)
        [stored], listing_gets = _counting_gets(proxy, complete_checkpoints, loc.filesystem, loc.path)
        blob, blob_gets = _counting_gets(proxy, storage.read_bytes, data_uri, proxy.endpoint, retry)
        assert len(blob) > 8 << 20
        loaded, stored_gets = _counting_gets(proxy, read_stored_state, loc.filesystem, stored)
        reported = Checkpoint(path=stored.path, filesystem=loc.filesystem)
        from_ray, reported_gets = _counting_gets(proxy, load_reported_state, reported)
        # predict's digest reads 4 MiB at a time: a GET each, 3 for this 8 MiB (+ header) file.
        (size, _), digest_gets = _counting_gets(proxy, file_digest, data_uri, proxy.endpoint)
    finally:
        proxy.close()
    for got in (loaded, from_ray):
        assert torch.equal(got["model"]["w"], state["model"]["w"])
    # One GET per whole-file read (33 each as a stream); the listing's GETs plus one for the
    # manifest.
    assert (blob_gets, stored_gets, reported_gets) == (1, 1, 1)
    assert listing_gets <= 3, listing_gets
    assert size == len(blob) and digest_gets <= 3, digest_gets
