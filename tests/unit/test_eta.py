"""The worker's time-left estimates: the denoising steps measured, and the seconds after them."""

from __future__ import annotations

import pytest

from worker.eta import EtaEstimator, FinishTimes


def test_a_large_job_after_small_ones_is_not_expected_to_take_their_seconds_per_pixel() -> None:
    """Small jobs' seconds are mostly fixed costs: scaled with pixels, 0.05 s at 32x32x9 made a
    256x256x65 job expect 23 s after its last step, where it took well under one."""
    finish = FinishTimes()
    for _ in range(10):
        finish.observe("ltx-tiny", 9, 32, 32, 0.05)
    assert finish.expected("ltx-tiny", 9, 32, 32) == pytest.approx(0.05)
    assert finish.expected("ltx-tiny", 65, 256, 256) < 0.5
    assert finish.expected("ltx-tiny", 9, 16, 16) == pytest.approx(0.05)  # smaller: the fixed part
    assert finish.expected("other", 9, 32, 32) is None


def test_jobs_of_several_sizes_give_the_fixed_part_and_the_part_per_pixel() -> None:
    finish = FinishTimes()
    for frames, width, height in [(121, 768, 512), (17, 256, 256), (65, 512, 512)] * 3:
        mpx = frames * width * height / 1e6
        finish.observe("ltx-video", frames, width, height, 0.2 + 0.04 * mpx)
    assert finish.expected("ltx-video", 129, 768, 768) == pytest.approx(0.2 + 0.04 * 129 * 768 * 768 / 1e6)
    assert finish.expected("ltx-video", 9, 64, 64) == pytest.approx(0.2, rel=0.05)


def test_a_fit_that_would_go_below_zero_is_all_per_pixel() -> None:
    finish = FinishTimes()
    for mpx_s in [(1.0, 0.1), (10.0, 3.0), (1.0, 0.1), (10.0, 3.0)]:
        finish.observe("m", int(mpx_s[0] * 1e6), 1, 1, mpx_s[1])
    assert finish.expected("m", 5_000_000, 1, 1) > 0
    assert finish.expected("m", 100, 1, 1) >= 0


def test_only_recent_jobs_count() -> None:
    finish = FinishTimes()
    for _ in range(FinishTimes.WINDOW):
        finish.observe("m", 9, 32, 32, 5.0)  # a slow spell
    for _ in range(FinishTimes.WINDOW):
        finish.observe("m", 9, 32, 32, 0.1)
    assert finish.expected("m", 9, 32, 32) == pytest.approx(0.1)


def test_the_time_left_counts_the_steps_to_come_and_the_seconds_after_them() -> None:
    eta = EtaEstimator(finish_s=1.5)
    assert eta.step(1, 10, now=0.0) is None and eta.step(2, 10, now=0.5) is None  # warm-up steps
    assert eta.step(3, 10, now=1.0) == pytest.approx(7 * 0.5 + 1.5)
