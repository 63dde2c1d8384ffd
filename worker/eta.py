"""Time-left estimates from measured step times, plus what the rest of the job took last time."""

from __future__ import annotations

import time

# Steps measured before the first estimate: the first step also pays warm-up costs.
MIN_STEPS = 3


class EtaEstimator:
    def __init__(self, finish_s: float | None) -> None:
        """`finish_s`: expected seconds after the last step (decode, encode, upload), if known."""
        self._finish_s = finish_s
        self._stamps: list[float] = []

    def step(self, step: int, total: int, now: float | None = None) -> float | None:
        """Record that `step` of `total` just ended; seconds left, once enough steps were seen."""
        self._stamps.append(time.perf_counter() if now is None else now)
        if len(self._stamps) < MIN_STEPS:
            return None
        recent = self._stamps[-6:]
        per_step = (recent[-1] - recent[0]) / (len(recent) - 1)
        return round((total - step) * per_step + (self._finish_s or 0.0), 2)


class FinishTimes:
    """Seconds after the last step per million output pixels (frames × width × height), per model."""

    def __init__(self) -> None:
        self._rate: dict[str, float] = {}

    def expected(self, model: str, frames: int, width: int, height: int) -> float | None:
        rate = self._rate.get(model)
        return None if rate is None else rate * frames * width * height / 1e6

    def observe(self, model: str, frames: int, width: int, height: int, seconds: float) -> None:
        rate = seconds / max(frames * width * height / 1e6, 1e-6)
        old = self._rate.get(model)
        self._rate[model] = rate if old is None else 0.7 * old + 0.3 * rate
