"""Which worker failures are worth a retry, and a short account of a failed run.

Ray Train's ``FailureConfig(max_failures=N)`` restarts the worker group after *any* worker
error. That is right for a lost worker or node, and wrong for a mistake: a bad config value,
a corrupt shard, a checkpoint whose tensors do not fit the model or a loss that turned NaN
fail the same way on every attempt, each after a cluster-sized start-up. Ray 2.60 has no
user-facing failure policy, but a ``UserCallback`` sees every worker error on the controller
before the policy does (``after_exception``), and an error raised from a callback ends the run
as a non-retryable ``ControllerError``. :class:`FailFast` uses that hook to stop at once.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from hrt_ray.config import ConfigError
from hrt_ray.data import DataError, SpecError
from hrt_ray.models.checkpoint import CheckpointError
from hrt_ray.train.loop import NonFiniteLossError


def _base(error: BaseException) -> BaseException:
    """The user's exception inside Ray Train's ``UserExceptionWithTraceback`` wrapper."""
    return getattr(error, "_base_exc", error)


def _deterministic_types() -> tuple[type[BaseException], ...]:
    return (ConfigError, DataError, SpecError, CheckpointError, NonFiniteLossError)


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps: Ray Train's wrapper, a Ray task error's cause, ``__cause__``."""
    out: list[BaseException] = []
    todo = [error]
    while todo:
        current = todo.pop()
        if current is None or any(current is seen for seen in out) or len(out) > 20:
            continue
        out.append(current)
        for attr in ("_base_exc", "cause", "__cause__", "__context__"):
            inner = getattr(current, attr, None)
            if isinstance(inner, BaseException):
                todo.append(inner)
    return out


def deterministic_error(error: BaseException) -> BaseException | None:
    """The error a retry of the same run would hit again, if ``error`` is (or wraps) one.

    Errors from Ray Data's decoding tasks reach the worker as a ``RayTaskError`` whose text
    holds the original ``DataError`` line even where the exception chain did not survive
    pickling; that line is turned back into a ``DataError``.
    """
    types = _deterministic_types()
    for current in _chain(error):
        if isinstance(current, types):
            return current
        # torch's load_state_dict: a resumed or initial checkpoint does not fit the model.
        if isinstance(current, RuntimeError) and str(current).startswith("Error(s) in loading state_dict"):
            return current
    for current in _chain(error):
        for line in reversed(str(current).splitlines()):
            name, sep, message = line.strip().partition(": ")
            if sep and name.rsplit(".", 1)[-1] == "DataError":
                return DataError(message)
    return None


def is_deterministic(error: BaseException) -> bool:
    """True for a failure that a retry of the same run would hit again."""
    return deterministic_error(error) is not None


class DeterministicFailure(RuntimeError):
    """A worker failed in a way no retry fixes; ``error`` is the worker's own exception."""

    def __init__(self, rank: int, error: BaseException) -> None:
        super().__init__(f"rank {rank}: {type(error).__name__}: {error}")
        self.rank = rank
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.rank, self.error))


class FailFast(UserCallback):
    """Ends the run on the first deterministic worker failure instead of retrying it."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            cause = deterministic_error(error)
            if cause is not None:
                raise DeterministicFailure(rank, cause)


def deterministic_cause(error: BaseException) -> BaseException | None:
    """The worker's exception when ``error`` (from ``trainer.fit()``) came from :class:`FailFast`."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DeterministicFailure):
            return current.error
        current = getattr(current, "controller_failure", None) or current.__cause__
    return None


def describe(error: BaseException) -> str:
    """One line per failed rank (``Type: message``), not Ray's multi-screen traceback dump."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        lines = []
        for rank, failure in sorted(failures.items()):
            base = _base(failure)
            text = str(base).strip().splitlines()
            lines.append(f"rank {rank}: {type(base).__name__}: {text[-1] if text else ''}")
        return "; ".join(lines)
    inner = getattr(error, "controller_failure", None)
    if inner is not None:
        return describe(inner)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
