"""Fault tests: each scenario counts what happened to its jobs and reports one summary line:
`scenario: N jobs, N succeeded, N lost, N duplicated` (printed at the end of the run)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

_LINES: list[str] = []


@dataclass
class Tally:
    scenario: str
    jobs: int = 0
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    notes: list[str] = field(default_factory=list)

    def count(self, status: str | None, videos: int, terminal_events: int) -> None:
        """One job's outcome: its final status (None: no record), MP4s stored, terminal events seen."""
        self.jobs += 1
        if status is None:
            self.lost += 1
        elif status == "succeeded":
            self.succeeded += 1
        elif status == "failed":
            self.failed += 1
        if videos > 1 or terminal_events > 1:
            self.duplicated += 1

    def line(self) -> str:
        extra = f", {self.failed} failed as designed" if self.failed else ""
        return (
            f"{self.scenario}: {self.jobs} jobs, {self.succeeded} succeeded, {self.lost} lost, "
            f"{self.duplicated} duplicated{extra}"
        )


@pytest.fixture
def tally(request):
    t = Tally(request.node.name.removeprefix("test_"))
    yield t
    _LINES.append(t.line())


def pytest_terminal_summary(terminalreporter) -> None:
    if _LINES:
        terminalreporter.section("fault scenarios")
        for line in _LINES:
            terminalreporter.write_line(line)


@pytest.fixture
async def private_namespace(stack, amqp_url, namespace):
    """A broker namespace with no other workers, so a test knows which worker takes its job."""
    from tests.conftest import delete_test_namespace

    ns = f"{namespace}-{os.urandom(3).hex()}"
    started: list = []
    yield ns, started
    from scripts.devstack import stop_pids

    stop_pids([proc.pid for proc in started])
    await delete_test_namespace(amqp_url, ns)
