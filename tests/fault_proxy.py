"""A loopback TCP proxy that can cut its upstream off for a while: a storage outage from outside.

The code under test talks to the proxy as if it were the S3 endpoint; the proxy forwards to the
real ``moto_server``. During :meth:`FaultProxy.outage` it closes every open connection and
accepts-then-closes every new one (the client sees the connection dropped with an empty reply),
so nothing in the process under test is patched or told about the fault. moto keeps its state
in memory, so the data survives the outage, as a real bucket's would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class FaultProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://{host}:{self.port}"
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopped = False
        #: Connections refused (accepted and closed at once) and cut mid-flight during outages.
        self.refused = 0
        self.cut = 0
        self.forwarded = 0
        #: HTTP GET requests passed upstream (request lines seen in the client-to-server bytes).
        self.gets = 0
        threading.Thread(target=self._accept_loop, daemon=True).start()

    # ---- control -----------------------------------------------------------------------------

    def outage(self, seconds: float) -> None:
        """From now on for ``seconds``: drop every open connection and refuse new ones."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
            victims = list(self._open)
            self._open.clear()
        for sock in victims:
            self.cut += 1
            _close(sock)

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def close(self) -> None:
        self._stopped = True
        _close(self._listener)
        with self._lock:
            victims = list(self._open)
            self._open.clear()
        for sock in victims:
            _close(sock)

    # ---- plumbing ----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            self.forwarded += 1
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count_gets: bool = False) -> None:
        # A request line may straddle two reads: keep the tail of the last one.
        tail = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if count_gets:
                    seen = tail + data
                    with self._lock:
                        self.gets += seen.count(b"GET /")
                    tail = data[-4:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
