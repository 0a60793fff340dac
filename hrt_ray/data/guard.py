"""A cheap running check that training batches still carry labels.

Why: labels that do not fit the dataset spec (another dataset's shards, masks already in train
ids, a wrong ``ignore_index``) map (nearly) every pixel to ignore. The loss over no pixels is
0, the run "converges", mIoU is 0 and the exit code is 0. Counting the labelled pixels of each
batch costs one comparison and one sum over a mask the worker already holds, so every batch is
counted; the run stops with a message once a window of batches, or a whole epoch, is (nearly)
all ignore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hrt_ray.data.codec import DataError

#: Below this fraction of labelled pixels a window or an epoch counts as "all ignore".
MIN_LABELLED = 1e-3
#: Batches per window: long enough that a few crops of pure void (sky-only, border) don't trip it.
WINDOW = 20


@dataclass
class _Count:
    labelled: int = 0
    total: int = 0
    batches: int = 0

    def add(self, labelled: int, total: int) -> None:
        self.labelled += labelled
        self.total += total
        self.batches += 1

    def fraction(self) -> float:
        return self.labelled / self.total if self.total else 1.0


class LabelledPixelGuard:
    """Counts labelled pixels of the training masks one worker sees; raises when they vanish."""

    def __init__(
        self,
        ignore_index: int,
        *,
        where: str = "",
        hint: str = "",
        window: int = WINDOW,
        min_labelled: float = MIN_LABELLED,
    ) -> None:
        self.ignore_index = int(ignore_index)
        self.where = where
        self.hint = hint
        self.window = max(1, int(window))
        self.min_labelled = float(min_labelled)
        self._window = _Count()
        self._epoch = _Count()

    def update(self, mask: Any) -> None:
        """Count one batch's mask (a torch tensor or numpy array of label ids)."""
        labelled = int((mask != self.ignore_index).sum())
        total = int(mask.numel() if hasattr(mask, "numel") else mask.size)
        self._window.add(labelled, total)
        self._epoch.add(labelled, total)
        if self._window.batches >= self.window:
            self._check(self._window, f"the last {self._window.batches} training batches")
            self._window = _Count()

    def end_epoch(self, epoch: int) -> None:
        """Check the epoch just finished as a whole, then start counting the next one."""
        if self._epoch.batches:
            self._check(self._epoch, f"data epoch {epoch} ({self._epoch.batches} batches)")
        self._epoch = _Count()
        self._window = _Count()

    def _check(self, count: _Count, span: str) -> None:
        if count.fraction() >= self.min_labelled:
            return
        raise DataError(
            f"{self.where}{100 * (1 - count.fraction()):.3f}% of the {count.total} pixels in {span} "
            f"are the ignore label {self.ignore_index}: the run would train on nothing (loss 0) and "
            f"report mIoU 0. The masks do not fit the dataset spec{self.hint}; run "
            "`hrt-ray data check <train_uri>` to see the label values"
        )
