"""One run per run directory: a lock file that names its holder and proves it is alive.

Two ``hrt-ray train`` with the same name and storage used to both exit 0, interleaving
checkpoints, summary and TensorBoard files in one directory. The driver now takes
``<run dir>/.hrt-run.lock`` before anything else and holds it for the whole run:

- created exclusively: ``O_CREAT | O_EXCL`` on a local disk, a conditional put
  (``If-None-Match: *``, through s3fs) on S3, so of two runs starting together exactly one wins;
  on other object stores a put followed by a re-read of the holder id after a short pause;
- the file holds host, pid, start time and a heartbeat timestamp that a background thread
  refreshes every ``lock_stale_s / 4``;
- a second run refuses with :class:`RunLockedError` naming the holder, unless the lock is stale:
  the holder's pid is gone on this same host, or its heartbeat is older than ``lock_stale_s``.
  A stale lock is removed and taken over, with a message saying whose it was;
- released (deleted, if still ours) when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hrt_ray import storage

logger = logging.getLogger(__name__)

LOCK_FILE = ".hrt-run.lock"


class RunLockedError(RuntimeError):
    """Another live run holds the run directory; the message names it."""


@dataclass(frozen=True)
class Holder:
    id: str
    host: str
    pid: int
    started: float
    heartbeat: float
    run: str

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            raw = json.loads(data)
            return cls(
                str(raw["id"]),
                str(raw["host"]),
                int(raw["pid"]),
                float(raw["started"]),
                float(raw["heartbeat"]),
                str(raw.get("run", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    def describe(self) -> str:
        started = datetime.fromtimestamp(self.started, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"host {self.host}, pid {self.pid}, started {started}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_synced(fh: Any, data: bytes) -> None:
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def _create_local(path: str, data: bytes, tag: str) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist, complete or not at all.

    An ``O_EXCL`` create followed by a write leaves a moment in which a run starting together
    with this one reads an empty lock, takes it for the leftover of a dead run and removes it:
    then both runs win. The content is written to a file of our own first and hard-linked into
    place (``link`` fails if the name exists), so the lock appears with its holder in it.
    """
    tmp = f"{path}.{tag}.tmp"
    with open(tmp, "wb") as fh:
        _write_synced(fh, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:  # a filesystem without hard links (some FUSE mounts): exclusive create
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            _write_synced(fh, data)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return True


class RunLock:
    """The lock of one run directory (``run_uri``); use :meth:`acquire` / :meth:`release`."""

    def __init__(
        self,
        run_uri: str,
        *,
        endpoint: str | None = None,
        stale_s: float = 300.0,
        retry: storage.RetryPolicy | None = None,
    ) -> None:
        self.run_uri = run_uri.rstrip("/")
        self.uri = f"{self.run_uri}/{LOCK_FILE}"
        self.endpoint = endpoint
        self.stale_s = stale_s
        self.retry = retry or storage.RetryPolicy()
        self.loc = storage.resolve(self.uri, endpoint, self.retry)
        self.holder: Holder | None = None
        #: A local run directory this lock created: removed again on release if left empty,
        #: so a run refused before it wrote anything leaves no trace.
        self._created_dir: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- taking and giving back --------------------------------------------------------------

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` naming the live holder."""
        now = time.time()
        me = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, self.run_uri)
        for _ in range(3):
            if self._create(me):
                self.holder = me
                self._start_heartbeat()
                return self
            current = self._read()
            if current is None:  # vanished or unreadable (half-written by a dying run): retry
                if self._read_raw() is not None:
                    self._remove()
                continue
            reason = self.stale_reason(current)
            if reason is None:
                raise RunLockedError(
                    f"{self.run_uri} is in use by another run ({current.describe()}, last heartbeat "
                    f"{time.time() - current.heartbeat:.0f} s ago; lock file {self.uri}). Wait for it to "
                    "end, or use another name. A lock whose heartbeat is older than "
                    f"storage.lock_stale_s={self.stale_s:g} s is taken over"
                )
            logger.warning("taking over stale run lock %s of %s: %s", self.uri, current.describe(), reason)
            print(f"run lock: taking over {self.uri} from {current.describe()} ({reason})", flush=True)
            self._remove()
        raise RunLockedError(f"{self.uri}: could not take the run lock (it kept changing under us)")

    def stale_reason(self, holder: Holder) -> str | None:
        """Why ``holder``'s lock is stale, or ``None`` if it may still be alive."""
        if holder.host == socket.gethostname() and not _pid_alive(holder.pid):
            return f"process {holder.pid} no longer exists on this host"
        age = time.time() - holder.heartbeat
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (storage.lock_stale_s={self.stale_s:g})"
        return None

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.holder is None:
            return
        try:
            current = self._read()
            if current is not None and current.id == self.holder.id:
                self._remove()
        except (OSError, storage.StorageError) as exc:
            logger.warning("could not release the run lock %s: %s", self.uri, exc)
        self.holder = None
        if self._created_dir is not None:
            with contextlib.suppress(OSError):  # not empty: the run wrote something; keep it
                os.rmdir(self._created_dir)
            self._created_dir = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ---- heartbeat ---------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="hrt-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(0.5, self.stale_s / 4)
        while not self._stop.wait(interval):
            assert self.holder is not None
            try:
                current = self._read()
                if current is not None and current.id != self.holder.id:
                    logger.error("run lock %s was taken over by %s", self.uri, current.describe())
                    print(f"run lock: {self.uri} was taken over by {current.describe()}", flush=True)
                    return
                self.holder = Holder(**{**self.holder.__dict__, "heartbeat": time.time()})
                storage.write_bytes(self.uri, self.holder.encode(), self.endpoint, self.retry)
            except (OSError, storage.StorageError) as exc:  # the run goes on; the next beat retries
                logger.warning("run lock heartbeat failed: %s", exc)

    # ---- storage primitives ------------------------------------------------------------------

    def _create(self, me: Holder) -> bool:
        """Create the lock file only if there is none; ``True`` if it is now ours."""
        data = me.encode()
        if not storage.is_remote(self.uri):
            run_dir = os.path.dirname(self.loc.path)
            if not os.path.isdir(run_dir):
                os.makedirs(run_dir, exist_ok=True)
                self._created_dir = run_dir
            return _create_local(self.loc.path, data, me.id)
        if self.uri.startswith("s3://"):
            return self._create_s3(data)
        # Other object stores: put if absent, then check that our id is the one that stayed.
        if self._read_raw() is not None:
            return False
        storage.write_bytes(self.uri, data, self.endpoint, self.retry)
        time.sleep(1.0)
        current = self._read()
        return current is not None and current.id == me.id

    def _create_s3(self, data: bytes) -> bool:
        """A conditional put (``If-None-Match: *``): S3 refuses it when the key exists."""
        # deferred: s3fs (aiobotocore, about 1 s) loads only for a run lock on S3, not for local runs
        import s3fs

        env = os.environ
        endpoint = self.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint and "://" not in endpoint:
            endpoint = f"https://{endpoint}"
        fs = s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": endpoint} if endpoint else {}, skip_instance_cache=True
        )

        def put() -> bool:
            try:
                fs.pipe_file(self.loc.path, data, mode="create")
            except FileExistsError:
                return False
            return True

        return self.retry.call(f"create {self.uri}", put)

    def _read_raw(self) -> bytes | None:
        try:
            return storage.read_bytes(self.uri, self.endpoint, self.retry)
        except storage.StorageError as exc:
            if "not found" in str(exc):
                return None
            raise

    def _read(self) -> Holder | None:
        raw = self._read_raw()
        return None if raw is None else Holder.parse(raw)

    def _remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.loc.filesystem.delete_file(self.loc.path)
