"""Ray Train's placement-group cleaner, without its false alarm under load.

Ray Train 2.60 starts a detached ``PlacementGroupCleaner`` per run: every second it asks the
State API whether the run's controller lives, and removes the run's placement group once it
does not, so that a controller that dies ungracefully leaks no GPUs. It takes *no answer* for
*dead*: ``is_actor_alive`` is ``get_actor(...) and state != "DEAD"``, and ``get_actor`` returns
``None`` for an empty reply. On a loaded head that reply comes (seen on the 2-core box,
2026-12-08, in the slow tier: the cleaner logged the controller dead, removed the group, and
Ray killed the live run's workers with "Destroying worker since its placement group was
removed"; the run failed with ``WorkerHealthCheckFailedError`` instead of its own error). The
same reading is raised upstream (review of ray-project/ray#65447).

Here only the State API's ``DEAD`` is death, or no record of the controller for
``MISSING_FOR_S`` on end (a record the GCS has dropped); a failed query is no answer either.
Everything else is Ray's class: registration, stopping, the removal itself.
"""

from __future__ import annotations

import contextlib
import queue
import time
from typing import Any

import ray
from ray._common.constants import HEAD_NODE_RESOURCE_NAME
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.controller.placement_group_cleaner import PlacementGroupCleaner
from ray.util.state import get_actor
from ray.util.state.exception import RayStateApiException


def controller_state(actor_id: str, timeout: float) -> str | None:
    """The actor's state as the State API reports it; ``None`` for no answer or no record."""
    try:
        actor = get_actor(actor_id, timeout=timeout)
    except RayStateApiException:
        return None
    return actor.state if actor is not None else None


class ConfirmingPlacementGroupCleaner(PlacementGroupCleaner):
    """Removes the run's placement group only once its controller is known to be dead."""

    #: Seconds without any record of the controller after which it counts as gone.
    MISSING_FOR_S = 60.0

    def _monitor_loop(self) -> None:
        current: Any = None
        missing_since: float | None = None
        while not self._stop_event.is_set():
            with contextlib.suppress(queue.Empty):  # a newer group, or a second's wait
                current = self._pg_queue.get(timeout=self._check_interval_s)
            state = controller_state(self._controller_actor_id, self._get_actor_timeout_s)
            if state is None:
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since < self.MISSING_FOR_S:
                    continue
            elif state != "DEAD":
                missing_since = None
                continue
            while True:  # the newest group the controller registered before it died
                try:
                    current = self._pg_queue.get_nowait()
                except queue.Empty:
                    break
            self._cleanup_placement_group(current)
            break
        self._exit()
        self._monitor_thread = None


class ConfirmingCleanerCallback(PlacementGroupCleanerCallback):
    """Ray's cleaner callback, starting :class:`ConfirmingPlacementGroupCleaner` instead."""

    def after_controller_start(self, train_run_context: Any) -> None:
        self._controller_actor_id = ray.get_runtime_context().get_actor_id()
        # As Ray places its own: no CPU, on the head node, outliving the controller.
        cleaner = ray.remote(num_cpus=0)(ConfirmingPlacementGroupCleaner).options(
            lifetime="detached",
            get_if_exists=False,
            resources={HEAD_NODE_RESOURCE_NAME: 0.001},
            scheduling_strategy="DEFAULT",
        )
        self._cleaner = cleaner.remote(
            controller_actor_id=self._controller_actor_id,
            check_interval_s=self._check_interval_s,
            get_actor_timeout_s=self._get_actor_timeout_s,
            stop_timeout=self._stop_timeout,
        )
        self._cleaner.start_monitoring.remote()


def with_confirming_cleaner(callbacks: list[Any]) -> list[Any]:
    """``callbacks`` with Ray's default cleaner callback replaced by :class:`ConfirmingCleanerCallback`."""
    return [ConfirmingCleanerCallback() if type(c) is PlacementGroupCleanerCallback else c for c in callbacks]
