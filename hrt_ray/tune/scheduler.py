"""ASHA whose rung records survive ``hrt-ray tune --resume``.

``Tuner.restore`` rebuilds the scheduler as it was configured when the sweep started, with empty
rungs: the trials that finished before the interruption would no longer count, and a resumed
trial would be compared only with the trials run after the resume. This subclass writes its
bookkeeping to the sweep directory after every result and reads it back when the restored
sweep adds its first trial, so a rung keeps the same cutoff across an interruption.
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune.schedulers import ASHAScheduler

_OWN = ("_state_uri", "_endpoint", "_loaded")


class ResumableASHA(ASHAScheduler):
    def __init__(self, *, state_uri: str, endpoint: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_uri = state_uri
        self._endpoint = endpoint
        self._loaded = False

    def _load_once(self) -> None:
        from hrt_ray import storage

        if self._loaded:
            return
        self._loaded = True
        if storage.exists(self._state_uri, self._endpoint):
            saved = pickle.loads(storage.read_bytes(self._state_uri, self._endpoint))
            self.__dict__.update({k: v for k, v in saved.items() if k not in _OWN})

    def _save(self) -> None:
        from hrt_ray import storage

        state = {k: v for k, v in self.__dict__.items() if k not in _OWN}
        storage.write_bytes(self._state_uri, pickle.dumps(state), self._endpoint)

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
