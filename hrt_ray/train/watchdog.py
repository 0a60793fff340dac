"""Bounded waits: a data iterator that raises instead of blocking forever.

Ray Train's worker function runs in a thread, so ``signal.alarm`` cannot interrupt it. The
batches are instead pulled by a helper thread into a one-slot queue and the training thread
waits on the queue with a timeout; a stalled read (a starved Ray Data pipeline, a dead object
store) becomes a :class:`StallError` naming the stage, which Ray Train surfaces as the run's
failure (and retries from the last checkpoint under ``FailureConfig``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class StallError(RuntimeError):
    """Nothing arrived within the stall timeout."""


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def iter_with_timeout(iterable: Iterable[T], timeout_s: float, stage: str) -> Iterator[T]:
    """Yield from ``iterable``; raise :class:`StallError` if one item takes over ``timeout_s``."""
    slot: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        slot.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slot.put(_DONE)
        except BaseException as exc:  # re-raised in the consumer, with its traceback
            slot.put(_Raised(exc))

    thread = threading.Thread(target=produce, name=f"hrt-ray-{stage}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = slot.get(timeout=timeout_s)
            except queue.Empty:
                raise StallError(
                    f"stalled in stage '{stage}': no item within failure.stall_timeout_s={timeout_s:g}s"
                ) from None
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
