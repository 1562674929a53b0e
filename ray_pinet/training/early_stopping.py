"""Best-so-far with patience: the one early-stopping rule of every stage and loop.

Stage 1, stage 2 (the "all" metric when the backbone trains, each plugin's own stratum when it is frozen) and
the two-tower loop all keep the best validation value, count evaluations that do not beat it strictly, and
stop after ``patience`` such evaluations in a row. Values are larger-is-better (callers negate a loss).
``patience <= 0`` never stops. The state is two plain numbers, so it travels in checkpoints as it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EarlyStopping:
    patience: int
    best: float = float("-inf")
    bad: int = 0  # evaluations in a row that did not beat ``best``

    def update(self, value: float) -> bool:
        """Record one evaluation; True when it is a new best (the caller keeps its state)."""
        if value > self.best:
            self.best, self.bad = value, 0
            return True
        self.bad += 1
        return False

    @property
    def stopped(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience
