"""Shares with 95% Wilson score intervals (Wilson 1927): every rate the suite reports carries one."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal


@dataclass
class Rate:
    successes: int
    trials: int
    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] ({self.successes}/{self.trials})"


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """(p̂ + z²/2n ± z √(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n); (0, 1) when there are no trials."""
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, trials], got {successes}/{trials}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # at p̂ = 0 (or 1) the bound is exactly 0 (or 1); rounding would leave it a hair inside
    return (0.0 if successes == 0 else max(0.0, centre - half)), (
        1.0 if successes == trials else min(1.0, centre + half)
    )


def rate(successes: int, trials: int) -> Rate:
    low, high = wilson_interval(successes, trials)
    return Rate(successes, trials, successes / trials if trials else math.nan, low, high)
