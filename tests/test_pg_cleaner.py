"""The run's placement-group cleaner takes only a confirmed controller death for death.

Ray Train 2.60's own cleaner removes a live run's placement group on one empty State API reply
(hrt_ray/train/pg_cleaner.py says when that was seen). The monitor loop runs here in the test
process on the plain class, with the State API answers and the removal replaced from outside.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from ray.train import ScalingConfig
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from hrt_ray.train import pg_cleaner
from hrt_ray.train.pg_cleaner import ConfirmingCleanerCallback, ConfirmingPlacementGroupCleaner

#: Stand-ins for placement groups: the cleaner only logs their ids and hands them on.
GROUP_1, GROUP_2 = SimpleNamespace(id="group-1"), SimpleNamespace(id="group-2")


def _cleaner(monkeypatch: pytest.MonkeyPatch, answers: list[str | None]) -> tuple[object, list, list]:
    asked: list[str] = []
    removed: list[object] = []
    replies = iter(answers)

    def state(actor_id: str, timeout: float) -> str | None:
        asked.append(actor_id)
        return next(replies, None)

    monkeypatch.setattr(pg_cleaner, "controller_state", state)
    cleaner = ConfirmingPlacementGroupCleaner(
        controller_actor_id="controller-1", check_interval_s=0.001, get_actor_timeout_s=1, stop_timeout=1
    )
    monkeypatch.setattr(cleaner, "_cleanup_placement_group", removed.append)
    monkeypatch.setattr(cleaner, "_exit", lambda: None)  # an actor's exit; here a plain object
    return cleaner, asked, removed


def test_no_answer_is_not_death_and_the_newest_group_goes_once_dead(monkeypatch: pytest.MonkeyPatch) -> None:
    cleaner, asked, removed = _cleaner(monkeypatch, [None, "ALIVE", None, None, "DEAD"])
    cleaner.register_placement_group(GROUP_1)
    cleaner.register_placement_group(GROUP_2)  # a restarted worker group's
    cleaner._monitor_loop()
    # Ray's own loop would have removed group-1 at the first empty reply, under a live run.
    assert removed == [GROUP_2]
    assert asked == ["controller-1"] * 5


def test_a_controller_without_any_record_for_long_counts_as_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ConfirmingPlacementGroupCleaner, "MISSING_FOR_S", 0.2)
    cleaner, asked, removed = _cleaner(monkeypatch, [])  # never any record
    cleaner.register_placement_group(GROUP_1)
    start = time.monotonic()
    cleaner._monitor_loop()
    assert removed == [GROUP_1] and time.monotonic() - start >= 0.2 and len(asked) > 1


def test_a_stopped_cleaner_removes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    cleaner, _, removed = _cleaner(monkeypatch, ["ALIVE"] * 1000)
    cleaner.register_placement_group(GROUP_1)
    cleaner._stop_event.set()  # the controller's graceful shutdown: it removes its group itself
    cleaner._monitor_loop()
    assert removed == []


def test_the_trainer_swaps_rays_cleaner_for_this_one() -> None:
    from hrt_ray.train.trainer import _TorchTrainer

    callbacks = _TorchTrainer(
        lambda config: None, scaling_config=ScalingConfig(num_workers=1)
    )._create_default_callbacks()
    kinds = [type(c) for c in callbacks]
    assert ConfirmingCleanerCallback in kinds and PlacementGroupCleanerCallback not in kinds
