"""Time-left estimates from measured step times, plus what the rest of the job took last time."""

from __future__ import annotations

import time
from collections import deque

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
    """Seconds after the last step (decode, encode, upload) per model, as a fixed part plus a part
    per million output pixels (frames × width × height), fitted to the model's recent jobs.

    Until the jobs seen differ enough in size to tell the two parts apart, the seconds seen count
    as fixed and each million pixels more than seen adds `PER_MPX_S`: a small job's seconds are
    mostly fixed costs, and scaling them with pixels made a large job's estimate many times too long.
    """

    WINDOW = 32  # the jobs remembered per model
    PER_MPX_S = 0.05  # decode, encode and upload per million pixels, until measured
    SPREAD = 1.5  # the largest job seen over the smallest, for a fit

    def __init__(self) -> None:
        self._seen: dict[str, deque[tuple[float, float]]] = {}

    def expected(self, model: str, frames: int, width: int, height: int) -> float | None:
        seen = self._seen.get(model)
        if not seen:
            return None
        mpx = frames * width * height / 1e6
        xs, ys = [x for x, _ in seen], [y for _, y in seen]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        if max(xs) < self.SPREAD * min(xs):
            return mean_y + self.PER_MPX_S * max(0.0, mpx - mean_x)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in seen) / sum((x - mean_x) ** 2 for x in xs)
        slope = max(slope, 0.0)
        fixed = mean_y - slope * mean_x
        if fixed < 0:  # all in proportion to the pixels
            fixed, slope = 0.0, sum(x * y for x, y in seen) / sum(x * x for x in xs)
        return fixed + slope * mpx

    def observe(self, model: str, frames: int, width: int, height: int, seconds: float) -> None:
        self._seen.setdefault(model, deque(maxlen=self.WINDOW)).append((frames * width * height / 1e6, seconds))
