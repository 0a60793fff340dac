"""The pipeline's shared state: one small Ray actor per run (see ``pipeline.py`` for the design).

It holds the epoch each split consumer announced (so map tasks seed crops per epoch), the run
seed, and the tally of bad records skipped under ``data.max_bad_records``.

Kept apart from the pipeline on purpose: the actor's process imports this module to rebuild the
class, and the pipeline module pulls in torch and the augmentation stack (about 3 CPU-seconds and
2 s before the first batch on the 2-core development box, 2026-12-07), which this state needs
none of. It imports nothing beyond the standard library and Ray.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

log = logging.getLogger(__name__)


class PipelineState:
    """Epoch announcements of the split consumers, the run seed, and the bad-record tally.

    Runs as a zero-CPU Ray actor (:func:`start_state_actor`); a plain class so its rules are testable.
    """

    def __init__(self, seed: int, max_bad_records: int):
        self.seed = seed
        self.max_bad = max_bad_records
        self.world_size = 1
        self.epochs: dict[int, int] = {}
        self.bad: dict[str, str] = {}
        #: Records skipped so far: one per bad record, a shard's manifest count per lost shard.
        self.skipped = 0
        #: Training shard path -> records its manifest lists; epoch -> shard path -> records read.
        self.expected: dict[str, int] = {}
        self.read: dict[int, dict[str, int]] = {}

    def announce(self, split: int, world_size: int, epoch: int) -> None:
        if world_size != self.world_size:  # a new worker group (elastic resize, restart)
            self.world_size, self.epochs = world_size, {}
        self.epochs[split] = epoch

    def current(self) -> tuple[int, int]:
        """(seed, epoch): the slowest split's epoch once all splits have announced."""
        if not self.epochs:
            return self.seed, 0
        if len(self.epochs) < self.world_size:
            return self.seed, max(self.epochs.values())
        return self.seed, min(self.epochs.values())

    def expect(self, records_per_shard: dict[str, int]) -> None:
        """The training shards and their manifest counts, which every epoch must read in full."""
        self.expected = dict(records_per_shard)

    def begin(self, read: dict[str, int]) -> tuple[int, int]:
        """A train map task starts: count the records it read per shard; return (seed, epoch)."""
        seed, epoch = self.current()
        counts = self.read.setdefault(epoch, {})
        for path, n in read.items():
            counts[path] = counts.get(path, 0) + int(n)
        return seed, epoch

    def shortfall(self, epoch: int) -> str:
        """Why epoch ``epoch`` read fewer records than the manifest lists ('' if it did not).

        Called once a consumer has drained its split, i.e. once the epoch's execution is done.
        Shards already skipped under ``max_bad_records`` are not expected.
        """
        got = self.read.get(epoch, {})
        short = {p: (got.get(p, 0), n) for p, n in self.expected.items() if got.get(p, 0) < n}
        if not short:
            return ""
        missing = sum(n - g for g, n in short.values())
        total = sum(self.expected.values())
        listing = "; ".join(f"{p}: read {g} of {n}" for p, (g, n) in sorted(short.items()))
        return (
            f"data epoch {epoch} read {total - missing} of the {total} training records the manifest "
            f"lists: {listing}. Ray Data skips files it cannot read as records (e.g. zero-size "
            "files); re-write these shards"
        )

    def report_bad(self, where: str, reason: str, records: int = 1) -> int:
        """Count ``records`` skipped at ``where`` (once per place); returns the running total."""
        if where not in self.bad:
            self.bad[where] = reason
            self.skipped += records
            log.warning(
                "skipped %d bad record(s), %d/%d in all: %s", records, self.skipped, self.max_bad, reason
            )
        return self.skipped

    def bad_records(self) -> dict[str, str]:
        return dict(self.bad)

    def skipped_records(self) -> int:
        return self.skipped


def start_state_actor(seed: int, max_bad_records: int) -> Any:
    """The run's :class:`PipelineState` as a zero-CPU actor on the driver's node."""
    # On the driver's node (the head, on a cluster: it outlives worker nodes), and restarted
    # elsewhere if that node goes anyway: a lost worker node must not take the epoch state with it,
    # or every restarted worker group fails on its first batch. A restart keeps the seed; the
    # epoch announcements come again from the new group.
    node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=node)
    return actor(PipelineState).remote(seed, max_bad_records)
