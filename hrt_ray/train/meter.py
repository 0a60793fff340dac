"""The training metrics of one reporting window, summed on each worker, and what counts as a
measured value in a report.

Its own module, without torch or Ray: the driver's config check lists the metric names a
report can carry (``checkpoint.metric`` must be one) before anything heavy is imported.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any


def is_finite_number(value: Any) -> bool:
    """A measured value: a finite int or float (not a bool, None, NaN or infinity).

    Reports leave unmeasured metrics out, and nothing downstream (Tune's schedulers, JSON files,
    the results table) may read NaN or infinity as a score.
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finite_numbers(metrics: dict[str, Any]) -> dict[str, int | float]:
    """The entries of ``metrics`` that are measured values, as plain Python numbers."""
    return {k: v if isinstance(v, int) else float(v) for k, v in metrics.items() if is_finite_number(v)}


@dataclass
class Meter:
    """Sums over one reporting window: loss, images, step and data-wait time."""

    steps: int = 0
    images: int = 0
    loss_sum: float = 0.0
    wait_s: float = 0.0
    busy_s: float = 0.0
    skipped: int = 0
    started: float = field(default_factory=time.perf_counter)

    def summary(self, world_size: int) -> dict[str, float]:
        elapsed = max(self.wait_s + self.busy_s, 1e-9)
        return {
            "train/loss": self.loss_sum / max(self.steps, 1),
            "perf/images_per_s_per_worker": self.images / elapsed,
            "perf/images_per_s": self.images / elapsed * world_size,
            "perf/data_wait_frac": self.wait_s / elapsed,
            "perf/step_time_s": elapsed / max(self.steps, 1),
            "train/skipped_steps": float(self.skipped),
        }
