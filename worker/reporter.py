"""One job's state while a worker runs it: each change is written to the record, then announced."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from common.retry import patiently
from common.store import ObjectStore, RecordChanged
from schemas.jobs import JobRecord
from schemas.messages import JobEvent

log = structlog.get_logger("worker.reporter")

Publish = Callable[[JobEvent], Awaitable[None]]


def _digest(record: JobRecord) -> bytes:
    return hashlib.sha256(record.model_dump_json().encode()).digest()


class DeliveryLost(Exception):
    """The job's message went back to the broker (its channel closed): another run owns the job now."""


class StartRefused(Exception):
    """This run's `running` write was refused: another run wrote the record since this one read
    it. One of the two holds a delivery the broker has taken back, and the record cannot tell
    which: this run hands its message back, and the next delivery starts the job afresh."""


class EndedElsewhere(Exception):
    """Somebody else ended the job while this run held it (the gateway cancelled or expired it
    just as the run started): this run writes nothing more."""

    def __init__(self, record: JobRecord) -> None:
        super().__init__(record.status)
        self.record = record


class JobReporter:
    """Serialises state changes so the record and the events move in lockstep, `seq` by `seq`.

    Writing the record before publishing means a client that sees an event can always read at
    least that state back, and a redelivered job continues the sequence from the record.

    Every write is conditional on the record being the version this run last read or wrote
    (`etag`; None: there is no record yet), so a change by somebody else is never overwritten.
    """

    def __init__(
        self,
        record: JobRecord,
        etag: str | None,
        store: ObjectStore,
        publish: Publish,
        store_patience_s: float = 0.0,
        lost: Callable[[], bool] = lambda: False,
        on_cancel_requested: Callable[[], None] = lambda: None,
        on_taken_over: Callable[[], None] = lambda: None,
        worker_id: str | None = None,
    ) -> None:
        self.record = record
        self._worker_id = worker_id
        self.etag = etag
        self._lost = lost
        self._on_cancel_requested = on_cancel_requested
        self._on_taken_over = on_taken_over
        self._store = store
        self._patience_s = store_patience_s
        self._publish = publish
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._pending: set[asyncio.Task[None]] = set()
        # The records whose writes failed without an answer since the last one that was answered:
        # the store may have taken one of them all the same (then the next write is refused, and
        # finds it there). Each is built on the last answered record, so at most one can be stored.
        # Kept as digests: a long outage fails a write at every step.
        self._unconfirmed: set[bytes] = set()
        # A progress update spawned but still waiting for the lock, and whether the last progress
        # write failed: while the store fails, the next changes join the waiting update instead of
        # queueing a write each (a write that fails takes its retries' time, a step far less, and
        # the job's end waits for every queued one).
        self._waiting: dict[str, Any] | None = None
        self._failing = False

    async def start(self, **changes: Any) -> JobRecord:
        """This run's first write: the job runs here, as the record's next attempt (with no step
        of its own yet). StartRefused if another run wrote the record since this one read it."""
        return await self.update(_start=True, step=None, total_steps=None, **changes)

    async def update(self, patient: bool = True, _start: bool = False, **changes: Any) -> JobRecord:
        """Apply a change now; raises if the record cannot be written (within the store patience),
        EndedElsewhere if somebody else ended the job, DeliveryLost once the job went back to its
        queue (another run may own it: this one gets to write only its end, and only if nobody
        else wrote since)."""
        async with self._lock:
            return await self._apply(changes, patient, _start)

    async def _apply(self, changes: dict[str, Any], patient: bool, _start: bool) -> JobRecord:
        """`update`'s work, with the lock held."""
        lost = self._lost()
        if lost and not changes.get("status", self.record.status).is_terminal:
            raise DeliveryLost()
        if _start:
            changes["attempts"] = self.record.attempts + 1
        if changes.get("status", self.record.status).is_terminal:
            changes["ended_by"] = self._worker_id
        while True:
            record = self.record.advance(**changes)
            try:
                self.etag = await patiently(
                    lambda: self._store.replace_record(record, self.etag),  # noqa: B023 - awaited here
                    self._patience_s if patient else 0.0,
                    "write_record",
                )
                break
            except RecordChanged:
                if lost or self._lost():
                    raise DeliveryLost() from None
                found = await patiently(
                    lambda: self._store.get_record_tagged(record.job_id),  # noqa: B023 - awaited here
                    self._patience_s if patient else 0.0,
                    "read_record",
                )
                if self._lost():  # learnt during the read
                    raise DeliveryLost() from None
                if found is not None and _digest(found[0]) in self._unconfirmed:
                    # A write of this run that failed without an answer, though the store
                    # took it (progress writes are not tried again): go on from it.
                    self.record, self.etag = found
                    self._unconfirmed = set()
                    continue
                if found is not None and self._is_cancel_request(found[0]):
                    # The gateway marked the job: keep the mark, and stop the job.
                    self.record, self.etag = found
                    self._unconfirmed = set()
                    self._on_cancel_requested()
                    continue
                if found is not None and found[0].status.is_terminal:
                    raise EndedElsewhere(found[0]) from None
                if found is not None and _start:
                    # A run whose delivery was lost but that has not noticed yet wrote since
                    # this one's read (its start, held up by a slow store, or a step), or this
                    # run's own delivery is the lost one: whichever, handing this message back
                    # loses nothing, where acknowledging it could leave the job to a dead run.
                    log.warning("job_start_refused", attempts=found[0].attempts, worker=found[0].worker)
                    raise StartRefused() from None
                if found is not None and found[0].attempts > self.record.attempts:
                    # Another run started the job since (the broker handed it to another
                    # worker before this one noticed that its delivery was lost).
                    log.warning("job_taken_over", attempts=found[0].attempts, worker=found[0].worker)
                    self._on_taken_over()
                    raise DeliveryLost() from None
                raise
            except Exception:
                self._unconfirmed.add(_digest(record))
                raise
        self._unconfirmed = set()
        self._failing = False
        self.record = record
        if record.status.is_terminal:
            await self._publish_end(JobEvent.from_record(record))
        else:
            await self._publish(JobEvent.from_record(record))
        return record

    async def _publish_end(self, event: JobEvent) -> None:
        """The job's end is in the record: its event must go out too, or live streams and webhooks
        never see it until the job's message comes back to a worker (which publishes the end
        again). Tried again, with backoff, through a broker outage of up to the store patience."""
        await patiently(lambda: self._publish(event), self._patience_s, "publish_end", log_as="event_publish_retry")

    def _is_cancel_request(self, found: JobRecord) -> bool:
        """Whether `found` is this run's last record (written, or maybe written) with only a
        cancel request added by the gateway."""
        if found.cancel_requested_at is None or self.record.cancel_requested_at is not None:
            return False
        unmarked = found.model_copy(update={"cancel_requested_at": None})
        return unmarked.model_dump_json() == self.record.model_dump_json() or _digest(unmarked) in self._unconfirmed

    def update_threadsafe(self, **changes: Any) -> None:
        """From the generation thread: schedule an update without waiting for it."""
        self._loop.call_soon_threadsafe(self._spawn, changes)

    def _spawn(self, changes: dict[str, Any]) -> None:
        if self._failing and self._waiting is not None:
            self._waiting.update(changes)  # one write, with the latest values, for both
            return
        self._waiting = waiting = dict(changes)
        # Tasks take the lock in the order they were spawned, so events stay in order.
        task = self._loop.create_task(self._best_effort(waiting))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _best_effort(self, changes: dict[str, Any]) -> None:
        async with self._lock:
            if self._waiting is changes:  # from here on, changes go to an update of their own
                self._waiting = None
            try:
                # One try: a progress event is not worth waiting out an outage for (the next change is).
                await self._apply(changes, patient=False, _start=False)
            except (DeliveryLost, EndedElsewhere):
                pass
            except Exception as exc:  # a lost progress event is not worth failing the job over
                self._failing = True
                log.warning("progress_update_failed", error=str(exc))

    async def flush(self) -> None:
        """Wait until every scheduled update has been written and published."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
