"""ASHA whose rung records survive ``hrt-ray tune --resume``.

``Tuner.restore`` rebuilds the scheduler as it was configured when the sweep started, with empty
rungs: the trials that finished before the interruption would no longer count, and a resumed
trial would be compared only with the trials run after the resume. This subclass writes its
bookkeeping to the sweep directory after every result and reads it back when the restored
sweep adds its first trial, so a rung keeps the same cutoff across an interruption.

The bookkeeping is written as JSON data (rung milestones, each rung's recorded scores, which
bracket each trial is in, counters), never as a pickle: the sweep directory lives on shared
storage, and unpickling a file from there would run whatever code it names. On load, the file
is checked against the scheduler's own configuration (same metric, mode and rung milestones);
a file that does not match is refused with a message naming it, not half-applied.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from hrt_ray import storage

#: Version of the JSON layout below; a file of another version is refused.
STATE_VERSION = 1


class SchedulerStateError(ValueError):
    """The saved ASHA state cannot be used with this sweep (names the file and the field)."""


class ResumableASHA(ASHAScheduler):
    def __init__(self, *, state_uri: str, endpoint: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_uri = state_uri
        self._endpoint = endpoint
        self._loaded = False

    # -- the state as data ---------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The bookkeeping that a restored sweep needs, as JSON-ready data."""
        index = {id(b): i for i, b in enumerate(self._brackets)}
        return {
            "version": STATE_VERSION,
            "metric": self._metric,
            "mode": self._mode,
            "num_stopped": self._num_stopped,
            "counter": self._counter,
            "trial_brackets": {tid: index[id(b)] for tid, b in self._trial_info.items()},
            "brackets": [
                [
                    {"milestone": float(m), "recorded": {t: _score(v) for t, v in rec.items()}}
                    for m, rec in b._rungs
                ]
                for b in self._brackets
            ],
        }

    def load_state(self, saved: Any) -> None:
        """Apply :meth:`state` output after checking it fits this scheduler's configuration."""
        where = self._state_uri

        def bad(field: str, why: str) -> SchedulerStateError:
            return SchedulerStateError(f"{where}: {field}: {why}")

        if not isinstance(saved, dict):
            raise bad("<top>", f"expected a mapping, got {type(saved).__name__}")
        if saved.get("version") != STATE_VERSION:
            raise bad("version", f"expected {STATE_VERSION}, got {saved.get('version')!r}")
        for key, mine in (("metric", self._metric), ("mode", self._mode)):
            if saved.get(key) != mine:
                raise bad(key, f"saved {saved.get(key)!r}, this sweep uses {mine!r}")
        brackets = saved.get("brackets")
        if not isinstance(brackets, list) or len(brackets) != len(self._brackets):
            raise bad("brackets", f"expected {len(self._brackets)} bracket(s)")
        rungs: list[list[tuple[float, dict[str, float | None]]]] = []
        for i, (rows, mine) in enumerate(zip(brackets, self._brackets, strict=True)):
            milestones = [float(m) for m, _ in mine._rungs]
            if not isinstance(rows, list) or [_number(r, "milestone", bad) for r in rows] != milestones:
                raise bad(f"brackets[{i}]", f"rung milestones differ from this sweep's {milestones}")
            rungs.append(
                [(m, _recorded(r, f"brackets[{i}]", bad)) for m, r in zip(milestones, rows, strict=True)]
            )
        trials = saved.get("trial_brackets")
        n = len(self._brackets)
        if not isinstance(trials, dict) or not all(
            isinstance(t, str) and isinstance(i, int) and 0 <= i < n for t, i in trials.items()
        ):
            raise bad("trial_brackets", "expected {trial_id: bracket index}")
        counts = {k: saved.get(k) for k in ("num_stopped", "counter")}
        for key, value in counts.items():
            if not isinstance(value, int) or value < 0:
                raise bad(key, f"expected a non-negative integer, got {value!r}")
        # Checked in full: now apply.
        for bracket, rows in zip(self._brackets, rungs, strict=True):
            bracket._rungs = rows
        self._trial_info.update({t: self._brackets[i] for t, i in trials.items()})
        self._num_stopped, self._counter = counts["num_stopped"], counts["counter"]

    # -- persistence -----------------------------------------------------------------------

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if storage.exists(self._state_uri, self._endpoint):
            raw = storage.read_bytes(self._state_uri, self._endpoint)
            try:
                saved = json.loads(raw)
            except ValueError as exc:
                raise SchedulerStateError(f"{self._state_uri}: not valid JSON ({exc})") from None
            self.load_state(saved)

    def _save(self) -> None:
        storage.write_bytes(self._state_uri, json.dumps(self.state()).encode(), self._endpoint)

    # -- Tune's hooks ----------------------------------------------------------------------

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


def _score(value: Any) -> float | None:
    """A recorded score as JSON can hold it (NaN, which ASHA's percentile skips, becomes null)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _number(row: Any, key: str, bad: Any) -> float:
    if not isinstance(row, dict) or not isinstance(row.get(key), (int, float)):
        raise bad(key, f"expected a number in {row!r}")
    return float(row[key])


def _recorded(row: dict[str, Any], where: str, bad: Any) -> dict[str, float | None]:
    recorded = row.get("recorded")
    if not isinstance(recorded, dict) or not all(
        isinstance(t, str) and (v is None or isinstance(v, (int, float))) for t, v in recorded.items()
    ):
        raise bad(f"{where}.recorded", "expected {trial_id: score or null}")
    return {t: (math.nan if v is None else float(v)) for t, v in recorded.items()}
