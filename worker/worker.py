"""The worker: take jobs highest priority first, one on the GPU at a time; generate, encode, upload, report, ack.

While one job's video is encoded and uploaded, the next job already runs on the GPU: at most two
jobs are in hand, one generating and one finishing, and each is acknowledged only once it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog
import torch
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelInvalidStateError

from common.retry import patiently
from common.settings import WorkerSettings
from common.store import ObjectStore, RecordChanged, output_key
from common.topology import DOWNLOAD_KEY, Topology, connect, to_amqp
from schemas import errors
from schemas.cost import DoesNotFit, MemoryPlan, estimate_job
from schemas.jobs import (
    PRIORITIES,
    DownloadParams,
    GenerationParams,
    JobError,
    JobOutput,
    JobRecord,
    JobStatus,
    Phase,
    PhaseSeconds,
    utcnow,
)
from schemas.messages import (
    CancelMessage,
    DecodeError,
    JobAvailable,
    JobDropped,
    JobEvent,
    JobMessage,
    decode,
    left_in_queue,
)
from schemas.registry import ModelSpec, Registry
from worker.download import DownloadFailed, abort_transfers, download
from worker.encode import encode_mp4
from worker.eta import EtaEstimator, FinishTimes
from worker.inputs import load_image, load_video
from worker.metrics import BUSY, RUNNING, job_ended
from worker.pipelines import Generated, Inputs, ModelRunner
from worker.reporter import DeliveryLost, EndedElsewhere, JobReporter, StartRefused

T = TypeVar("T")

log = structlog.get_logger("worker")

# Where each phase puts the progress bar; denoising fills 0 → DENOISE_SHARE step by step.
DENOISE_SHARE = 0.90
# Pause before handing back a job that hit an infrastructure error, so a flapping store is not hammered.
REQUEUE_DELAY_S = 2.0
PROGRESS_AT = {Phase.DECODING: 0.90, Phase.ENCODING: 0.94, Phase.UPLOADING: 0.97}


class JobFailed(Exception):
    """The job cannot succeed (bad input for the model, generation error): fail it and ack."""

    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error


class JobCancelled(Exception):
    """A cancel request reached the worker running the job: stop without a video."""


Runner = Callable[[JobMessage, JobReporter], Awaitable[None]]

# Recently cancelled job ids each worker remembers, to drop such a job if it is delivered later.
CANCELLED_MEMORY = 10_000


def priority_order(taken: int, lower_every: int) -> list[int]:
    """The order (indexes into PRIORITIES) in which a worker that has taken `taken` jobs looks at
    the priorities for its next one.

    Highest first, except on a turn of the lower priorities: every `lower_every`-th job starts at
    `normal`, and every `lower_every`²-th at `low`; such a turn goes on down to `low`, then back
    up to `high`. So while jobs of every priority wait, `normal` jobs get at least one job in
    `lower_every` of a worker's (less the `low` turns) and `low` jobs one in `lower_every`²: none
    waits for ever. 0: always the highest first.
    """
    start, n = 0, taken + 1
    while lower_every and start < len(PRIORITIES) - 1 and n % lower_every ** (start + 1) == 0:
        start += 1
    return [*range(start, len(PRIORITIES)), *range(start - 1, -1, -1)]


# Channels a worker takes its generation jobs on: one per job it can hold.
LANES = 2


class Worker:
    def __init__(
        self, settings: WorkerSettings, store: ObjectStore, runners: dict[str, ModelRunner], registry: Registry
    ) -> None:
        self.settings = settings
        self._registry = registry
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self._store = store
        self._runners = runners
        self._topology = Topology(settings.broker_namespace)
        # One thread owns the GPU; encoding and uploads run elsewhere so it is free sooner.
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        self._in_hand: set[asyncio.Task[None]] = set()  # generation jobs taken and not yet settled
        self._downloading: set[asyncio.Task[None]] = set()  # download jobs being handled
        self._stop_downloads = threading.Event()  # set when the worker stops: downloads end early
        self._handling: dict[str, asyncio.Event] = {}  # job id → set when its handling ends (downloads too)
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._running: dict[str, tuple[threading.Event, JobMessage]] = {}  # job id -> its stop flag, the job
        self._lost: set[str] = set()  # jobs in hand whose message went back to the broker
        self._finish_times = FinishTimes()
        for model_id in runners:  # every served model appears in the metrics from the start
            RUNNING.labels(model_id).set(0)
        self._connection: AbstractRobustConnection | None = None
        self._events: AbstractExchange | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []  # downloads, and each model's presence queue
        self._channels: list[AbstractChannel] = []  # every channel it opened (see start)
        # Per lane (a channel each), by priority, highest first; models within. The two jobs a
        # worker can hold are taken on different lanes.
        self._job_queues: list[list[list[AbstractQueue]]] = []
        self._taken = 0  # generation job messages taken (for the lower priorities' turns)
        self._dispatcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self.jobs_done = 0

    @property
    def models(self) -> list[str]:
        return list(self._runners)

    @property
    def devices(self) -> set[torch.device]:
        return {runner.device for runner in self._runners.values()}

    @property
    def ready(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._connection.connected.is_set()
            and self._dispatcher is not None
            and not self._dispatcher.done()
            and not self._stopping
        )

    async def start(self) -> None:
        self._connection = await connect(self.settings.amqp_url)
        publish_channel = await self._connection.channel(publisher_confirms=True)
        self._events = await self._topology.declare_events(publish_channel)
        # Cancel requests and new-job notices reach every worker through its own queue on the control exchange.
        control_channel = await self._connection.channel()
        # The robust connection holds its channels weakly: one nothing else holds could be collected
        # while it reconnects, and would come back without its queue and consumer.
        self._channels = [publish_channel, control_channel]
        control = await control_channel.declare_queue(exclusive=True, auto_delete=True)
        await control.bind(await self._topology.declare_control(control_channel))
        await control.consume(self._on_control, no_ack=True)

        # Downloads and presence on one channel, and each of the two generation jobs a worker can
        # hold on a channel of its own (a lane): RabbitMQ's consumer_timeout closes the channel of
        # a message held too long, and hands back every message held on it, only that one then.
        channel = await self._connection.channel()
        self._channels.append(channel)
        # prefetch=1: a worker holds one download at a time; the rest stay in the queue for other workers.
        await channel.set_qos(prefetch_count=1)
        models = sorted(self._runners)
        _, queues = await self._topology.declare_jobs(channel, models)
        self._job_queues = []
        for _ in range(LANES):
            self._channels.append(lane := await self._connection.channel())
            # Declared above; a lane only asks them for messages (basic.get, which a reopened
            # channel serves as it is): no declaring again, at start or at each reconnect.
            self._job_queues.append(
                [
                    [
                        await lane.get_queue(self._topology.queue_for(Topology.job_key(m, p)), ensure=False)
                        for m in models
                    ]
                    for p in PRIORITIES
                ]
            )
        downloads = queues[DOWNLOAD_KEY]
        self._consumers.append((downloads, await downloads.consume(self._on_download)))
        # Presence: one consumer per served model, so the gateway can count this model's workers.
        # The queues were declared on this channel (declare_jobs), so a reconnect restores the consumers too.
        for model_id in models:
            presence = queues[self._topology.workers_queue(model_id)]
            self._consumers.append((presence, await presence.consume(_ignore, no_ack=True)))
        self._dispatcher = asyncio.create_task(self._dispatch())
        log.info("worker_started", worker=self.worker_id, models=models)

    async def stop(self, grace_s: float) -> bool:
        """Stop taking jobs, give the jobs in hand (at most two) `grace_s` to finish, then disconnect.

        Returns False if a job was still running: the broker hands it back to the queue when the
        connection closes, and its generation thread is abandoned (the process should exit now).
        """
        self._stopping = True
        self._wake.set()
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                # Bounded: during a broker outage a cancel would wait for the connection.
                await asyncio.wait_for(queue.cancel(tag), 5.0)
        self._consumers.clear()
        # A download may take hours: it stops at its next progress update and goes back to its
        # queue; another worker resumes it from the files already in the cache.
        self._stop_downloads.set()
        if self._downloading:  # on a thread of its own: it reaches into hf_xet's runtime
            threading.Thread(target=self._abort_xet, args=(grace_s,), name="xet-abort", daemon=True).start()
        # The connection stays open meanwhile so heartbeats keep flowing.
        unfinished: set[asyncio.Task[None]] = set()
        if self._in_hand or self._downloading:
            _, unfinished = await asyncio.wait(self._in_hand | self._downloading, timeout=grace_s)
        finished = not unfinished
        for task in [self._dispatcher, *unfinished]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._connection is not None:
            await self._connection.close()  # an unacked job goes back to its queue
        self._gpu.shutdown(wait=finished, cancel_futures=True)
        log.info("worker_stopped", worker=self.worker_id, jobs_done=self.jobs_done, jobs_handed_back=len(unfinished))
        return finished

    def _abort_xet(self, grace_s: float) -> None:
        """Abort Xet transfers until the downloads have ended (or the grace period has): an abort
        clears huggingface_hub's Xet session, and a file that starts after it gets a new one."""
        deadline = time.monotonic() + grace_s
        while self._downloading and time.monotonic() < deadline and abort_transfers():
            time.sleep(0.5)

    async def _dispatch(self) -> None:
        """Take jobs from the highest priority that has one (but on the lower priorities' turns,
        `priority_order`), models in turn within it, one on the GPU at a time.

        The next job is taken once the current one has left the GPU (its frames generated), so its
        generation overlaps the current one's encode and upload; before that, the job finishing
        beside it must have ended, so no more than two are ever in hand.

        Quorum queues (before RabbitMQ 4.0) know no message priority, so each priority is a queue
        and the worker asks for a message (basic.get) rather than having the broker push it.
        It looks again after each job, when a `JobAvailable` notice arrives, and every
        `idle_poll_s` (jobs handed back by a crashed worker, jobs published by other services).
        """
        turn = 0
        finishing: asyncio.Task[None] | None = None
        finishing_lane = 0
        while not self._stopping:
            self._wake.clear()
            # Not on the lane of the job still finishing beside it.
            lane = 0 if finishing is None or finishing.done() else 1 - finishing_lane
            try:
                message = await self._next_job(turn, lane)
            except Exception as exc:  # broker gone: the robust connection comes back by itself
                log.warning("job_fetch_failed", error=str(exc))
                message = None
            turn += 1
            if message is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.idle_poll_s)
                continue
            if self._stopping:  # SIGTERM came while the message was on its way: hand it back
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
                break
            gpu_free = asyncio.Event()
            current = asyncio.create_task(self._handle_job(message, gpu_free))
            self._in_hand.add(current)
            current.add_done_callback(self._in_hand.discard)
            freed = asyncio.create_task(gpu_free.wait())
            await asyncio.wait({current, freed}, return_when=asyncio.FIRST_COMPLETED)
            freed.cancel()
            if current.done():  # ended without a generation to finish: the one finishing may go on
                continue
            if finishing is not None:
                await asyncio.wait({finishing})
            finishing, finishing_lane = current, lane

    async def _handle_job(self, message: AbstractIncomingMessage, gpu_free: asyncio.Event) -> None:
        async def run(job: JobMessage, reporter: JobReporter) -> None:
            # Busy while the job runs until its frames are generated: not while a copy of a job
            # in hand waits for it, nor in the pause before an interrupted job is handed back.
            BUSY.set(1)
            try:
                await self.run_job(job, reporter, on_gpu_free)
            finally:
                if not gpu_free.is_set():
                    BUSY.set(0)

        def on_gpu_free() -> None:
            if not gpu_free.is_set():
                BUSY.set(0)
                gpu_free.set()

        try:
            await self.handle(message, run)
        except Exception:  # the dispatcher must outlive any one message
            log.exception("dispatch_failed")
        finally:
            on_gpu_free()

    async def _next_job(self, turn: int, lane: int = 0) -> AbstractIncomingMessage | None:
        for level in priority_order(self._taken, self.settings.lower_priority_every):
            queues = self._job_queues[lane][level]
            for i in range(len(queues)):
                if self._stopping:
                    return None
                message = await queues[(turn + i) % len(queues)].get(no_ack=False, fail=False)
                if message is not None:
                    self._taken += 1
                    return message
        return None

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        try:
            command = decode(message.body)
        except DecodeError as exc:
            log.warning("bad_control_message", reason=exc.reason)
            return
        if isinstance(command, JobAvailable):
            if command.model in self._runners:
                self._wake.set()
        elif isinstance(command, CancelMessage):
            self._cancel(command.job_id)

    def _cancel(self, job_id: str) -> None:
        """A cancel of this job reached this worker (broadcast, or marked on the record it writes):
        stop it if it runs here, drop it if it comes later."""
        self._cancelled[job_id] = None
        while len(self._cancelled) > CANCELLED_MEMORY:
            self._cancelled.popitem(last=False)
        if (running := self._running.get(job_id)) is not None:
            flag, job = running
            flag.set()
            log.info("cancel_requested", job_id=job_id, model=job.params.model, mode=job.mode)

    async def _on_download(self, message: AbstractIncomingMessage) -> None:
        # Downloads use the network and disk, not the GPU: they do not wait for the current job.
        task = asyncio.current_task()
        assert task is not None
        self._downloading.add(task)
        try:
            await self.handle(message, self.run_download)
        finally:
            self._downloading.discard(task)

    async def handle(self, message: AbstractIncomingMessage, run: Runner) -> None:
        """Decode, skip what already ended, run, then settle the message: exceptions decide how."""
        try:
            job = decode(message.body)
            if not isinstance(job, JobMessage):
                raise DecodeError(message.body, f"expected job.submit, got {job.type}")
        except DecodeError as exc:
            log.error("message_rejected", reason=exc.reason, raw=exc.raw[:200].decode(errors="replace"))
            await message.reject(requeue=False)  # to the dead-letter queue
            return
        with structlog.contextvars.bound_contextvars(job_id=job.job_id, model=job.params.model, mode=job.mode):
            while (ended := self._handling.get(job.job_id)) is not None:
                # Delivered again while this worker still runs it (the broker requeued its jobs when
                # the connection dropped): wait for that run to end, then settle this copy as usual.
                log.info("job_already_in_hand")
                await ended.wait()
            ended = self._handling[job.job_id] = asyncio.Event()
            closing = _closing(message)
            lose = functools.partial(self._lose_run, job.job_id, ended)
            if closing is None:
                lose()
            else:
                closing.add_done_callback(lose)
            try:
                await self._settle(message, job, run)
            finally:
                if closing is not None:
                    closing.remove_done_callback(lose)
                    closing.cancel()  # aiormq's observer of the channel, made for this run: detached
                self._lost.discard(job.job_id)
                del self._handling[job.job_id]
                ended.set()

    def _cancel_heard(self, job: JobMessage, record: JobRecord) -> bool:
        """Whether a cancel broadcast for this job reached this worker and applies: a download
        that has started cannot be cancelled (the gateway answered 409), so a broadcast sent just
        as it started does not stop a later delivery of it."""
        if job.mode == "download" and record.status == JobStatus.RUNNING:
            return False
        return job.job_id in self._cancelled

    def _lose_run(self, job_id: str, run: asyncio.Event, _closed: object = None) -> None:
        """The channel of this run's message closed: the run is lost if it is still under way (a
        channel that closes just after the run settled its message and ended loses nothing)."""
        if self._handling.get(job_id) is run:
            self._lose(job_id)

    def _lose(self, job_id: str) -> None:
        """The channel the job's message came on closed (the connection dropped, the broker
        restarted): the broker has put the job back in its queue, and another worker (or this
        one, once this run has ended) may be running it already. From here this run reports no
        progress: if it is still denoising it stops at the next step, if it is decoding or
        encoding at its next phase write. A run already uploading finishes its upload and writes
        its end only if the record is still as it left it (JobReporter), so a copy that finds it
        ended is acknowledged without running again."""
        if job_id not in self._lost:
            self._lost.add(job_id)
            log.warning("job_delivery_lost", job_id=job_id)

    async def _settle(self, message: AbstractIncomingMessage, job: JobMessage, run: Runner) -> None:
        """Run the job unless it already ended, then settle its message: exceptions decide how."""
        reporter: JobReporter | None = None
        try:
            found = await patiently(
                lambda: self._store.get_record_tagged(job.job_id), self.settings.store_patience_s, "read_record"
            )
            record, etag = found or (_record_from(job), None)
            if record.status.is_terminal:
                # A redelivery of a job that already ended: never run it twice.
                log.info("job_already_finished", status=record.status)
                await message.ack()
                await self._tell_dropped(record)
                await self._publish_end_again(record)
                return
            reporter = JobReporter(
                record,
                etag,
                self._store,
                self._publish_event,
                self.settings.store_patience_s,
                lost=lambda: job.job_id in self._lost,
                on_cancel_requested=lambda: self._cancel(job.job_id),
                on_taken_over=lambda: self._lose(job.job_id),
                worker_id=self.worker_id,
            )
            try:
                await self._run_to_end(job, reporter, run)
            except EndedElsewhere as exc:
                # Cancelled or expired by the gateway just as this run started: that end stands.
                await reporter.flush()
                log.info("job_ended_elsewhere", status=exc.record.status)
                await message.ack()
                await self._tell_dropped(exc.record)
                return
            await message.ack()
            self.jobs_done += 1
            _summarise(reporter.record)
            await self._tell_dropped(reporter.record)
        except Exception as exc:
            if job.job_id in self._lost:  # whatever this run was doing, the job is queued again
                with contextlib.suppress(Exception):
                    if reporter is not None:
                        await reporter.flush()
                log.warning("job_left_to_its_redelivery", status=reporter and reporter.record.status)
                # Its channel has closed (then this fails), or another run took the job over: that
                # run holds a delivery of its own, so this one is settled, not left to time out.
                with contextlib.suppress(Exception):
                    await message.ack()
                return
            if reporter is not None:
                await reporter.flush()
            if self._stopping:  # the worker is stopping (a download ended early): hand it back now
                log.info("job_handed_back", status=reporter and reporter.record.status, error=repr(exc))
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
                return
            # Infrastructure trouble (store or broker), or another run's write refused this
            # run's start: give the job back for another try. The queue's delivery limit
            # dead-letters a job that keeps failing this way.
            if not isinstance(exc, StartRefused):  # logged as job_start_refused
                log.exception("job_interrupted")
            await asyncio.sleep(REQUEUE_DELAY_S)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)

    async def _run_to_end(self, job: JobMessage, reporter: JobReporter, run: Runner) -> None:
        """Run the job; a cancelled or failed run writes its end here."""
        try:
            # Cancelled while it ran elsewhere (that worker crashed): the record carries the request.
            if self._cancel_heard(job, reporter.record) or reporter.record.cancel_requested_at is not None:
                raise JobCancelled()
            await run(job, reporter)
        except JobCancelled:
            if job.job_id in self._lost:  # stopped because the job went back to its queue
                raise DeliveryLost() from None
            await reporter.flush()
            started = reporter.record.status == JobStatus.RUNNING
            await reporter.update(
                status=JobStatus.CANCELLED,
                phase=Phase.CANCELLED,
                message="cancelled while running" if started else "cancelled before it started",
            )
            log.info("job_cancelled", running=started)
        except JobFailed as exc:
            await reporter.flush()
            await reporter.update(status=JobStatus.FAILED, phase=Phase.FAILED, error=exc.error)
            log.warning("job_failed", code=exc.error.code, error=exc.error.message)

    async def run_job(
        self, job: JobMessage, reporter: JobReporter, on_gpu_free: Callable[[], None] = lambda: None
    ) -> None:
        """The life of a job: check it is still wanted, fetch inputs, generate, encode, upload, report.

        `on_gpu_free` is called once the job is done with the GPU, before its encode and upload.
        """
        params = job.params
        if not isinstance(params, GenerationParams) or job.mode == "download":
            raise JobFailed(wrong_queue(f"a {job.mode} job came through a generation queue"))
        if params.model not in self._runners:
            raise JobFailed(
                wrong_queue(f"model {params.model!r} came through a queue of this worker, which does not serve it")
            )
        spec = self._registry.models[params.model]
        queued_s = (utcnow() - reporter.record.created_at).total_seconds()
        # Only a job that never started can have waited too long; a redelivery after a crash runs.
        if reporter.record.attempts == 0 and queued_s > spec.max_queue_s:
            raise JobFailed(errors.expired(spec.id, spec.max_queue_s))
        started = time.perf_counter()
        plan = await self._memory_plan(spec, job.mode, params)
        await reporter.start(
            status=JobStatus.RUNNING,
            phase=Phase.LOADING,
            started_at=utcnow(),
            worker=self.worker_id,
            timings=PhaseSeconds(queued=round(queued_s, 3)),
            memory_plan=plan,
        )
        inputs = await self._fetch_inputs(job)

        cancel = threading.Event()
        self._running[job.job_id] = (cancel, job)
        if job.job_id in self._cancelled:  # asked while the inputs were fetched
            cancel.set()
        RUNNING.labels(params.model).inc()
        try:
            await self._generate_and_deliver(job, reporter, inputs, cancel, queued_s, started, on_gpu_free)
        finally:
            if self._running.get(job.job_id, (None,))[0] is cancel:
                del self._running[job.job_id]
            RUNNING.labels(params.model).dec()

    async def _generate_and_deliver(
        self,
        job: JobMessage,
        reporter: JobReporter,
        inputs: Inputs,
        cancel: threading.Event,
        queued_s: float,
        started: float,
        on_gpu_free: Callable[[], None],
    ) -> None:
        params = job.params
        assert isinstance(params, GenerationParams)
        eta = EtaEstimator(self._finish_times.expected(params.model, params.num_frames, params.width, params.height))

        def on_step(step: int, total: int) -> None:
            # Runs on the generation thread, between two denoising steps.
            if cancel.is_set() or job.job_id in self._lost:
                raise JobCancelled()  # diffusers' own interrupt would still decode the video
            reporter.update_threadsafe(
                phase=Phase.DENOISING,
                step=step,
                total_steps=total,
                progress=DENOISE_SHARE * step / total,
                eta_s=eta.step(step, total),
            )
            if step == total:
                reporter.update_threadsafe(phase=Phase.DECODING, progress=PROGRESS_AT[Phase.DECODING])

        runner = self._runners[params.model]
        loop = asyncio.get_running_loop()
        before_pipeline_s = time.perf_counter() - started  # the inputs' download and decoding

        def generate() -> Generated:
            # Asked before the generation thread got to it (the inputs' decoding, the last job's
            # release of the thread): not even the prompt encoding and a first step.
            if cancel.is_set() or job.job_id in self._lost:
                raise JobCancelled()
            return runner.generate(job.mode, params, inputs, on_step)

        try:
            # An interrupted generation's tensors live on in the frames its exception's traceback
            # holds: only once out of the `except` clause, with the exception dropped, can the
            # memory be freed, and it is freed before the next job may start generating.
            cancelled = False
            failure: JobError | None = None
            try:
                generated: Generated = await loop.run_in_executor(self._gpu, generate)
            except JobCancelled:
                cancelled = True
            except torch.OutOfMemoryError as exc:
                # The job does not fit now; the worker must: free what it held and take the next job.
                log.warning("out_of_memory", width=params.width, height=params.height, frames=params.num_frames)
                failure = errors.out_of_memory(params.width, params.height, params.num_frames, str(exc))
            except Exception as exc:
                log.exception("generation_failed")
                failure = JobError(code="generation_failed", message=f"{type(exc).__name__}: {exc}")
            if cancelled or failure is not None:
                await loop.run_in_executor(self._gpu, runner.release_memory)
                if failure is not None:
                    raise JobFailed(failure)
                raise JobCancelled()
        finally:
            on_gpu_free()  # the next job may start generating while this one is encoded and uploaded
        await reporter.flush()
        finish_started = time.perf_counter()

        _raise_if(cancel)  # asked during the last step or the decode: still no video
        await reporter.update(phase=Phase.ENCODING, progress=PROGRESS_AT[Phase.ENCODING])
        _raise_if(cancel)  # a cancel marked on the record, found by that write
        with tempfile.TemporaryDirectory(prefix="videogen-") as tmp:
            path = Path(tmp) / "video.mp4"
            started = time.perf_counter()
            try:
                await asyncio.to_thread(encode_mp4, generated.frames, params.fps, path)
            except Exception as exc:
                raise JobFailed(JobError(code="encode_failed", message=f"{type(exc).__name__}: {exc}")) from exc
            encode_s = time.perf_counter() - started

            _raise_if(cancel)  # the last moment a cancel can still keep the video out of the store
            await reporter.update(phase=Phase.UPLOADING, progress=PROGRESS_AT[Phase.UPLOADING])
            _raise_if(cancel)  # a cancel marked on the record, found by that write
            started = time.perf_counter()
            key = output_key(job.job_id, reporter.record.attempts)  # this run's own
            await self._upload(key, path)
            upload_s = time.perf_counter() - started
            size = path.stat().st_size
        if cancel.is_set():  # asked during the upload: the job ends cancelled, its video removed
            await self._remove_output(key, "cancelled")
            raise JobCancelled()

        frames, height, width = generated.frames.shape[:3]
        self._finish_times.observe(
            params.model, frames, width, height, generated.decode_s + time.perf_counter() - finish_started
        )
        timings = PhaseSeconds(
            queued=round(queued_s, 3),
            load=round(before_pipeline_s + generated.load_s, 3),
            denoise=round(generated.denoise_s, 3),
            decode=round(generated.decode_s, 3),
            encode=round(encode_s, 3),
            upload=round(upload_s, 3),
        )
        try:
            await reporter.update(
                status=JobStatus.SUCCEEDED,
                phase=Phase.SUCCEEDED,
                progress=1.0,
                output=JobOutput(key=key, bytes=size, num_frames=frames, width=width, height=height, fps=params.fps),
                timings=timings,
            )
        except (DeliveryLost, EndedElsewhere, RecordChanged):
            # Another run owns the job, it ended, or the record changed under this run: the write
            # was refused (never half done), so no record names this run's video.
            await self._remove_output(key, "ended_elsewhere")
            raise
        for attempt in range(1, reporter.record.attempts):  # runs that died after their upload
            await self._remove_output(output_key(job.job_id, attempt), "earlier_attempt")

    async def _memory_plan(self, spec: ModelSpec, mode: str, params: GenerationParams) -> MemoryPlan | None:
        """The preflight again, for this worker's GPU: pick the plan, arrange the pipeline for it."""
        if spec.cost is None:
            return None
        runner = self._runners[params.model]
        budget = self._gpu_memory_gib(runner.device)
        plan: MemoryPlan = "resident"
        if budget is not None:
            try:
                plan = estimate_job(spec, mode, params, budget).plan
            except DoesNotFit as exc:
                raise JobFailed(errors.does_not_fit(str(exc))) from exc
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._gpu, runner.apply_plan, plan)
        except torch.OutOfMemoryError as exc:  # rearranging the weights did not fit: this job cannot run here
            await loop.run_in_executor(self._gpu, runner.release_memory)
            raise JobFailed(errors.does_not_fit(f"moving the model to the {plan} plan ran out of memory")) from exc

    def _gpu_memory_gib(self, device: torch.device) -> float | None:
        if self.settings.gpu_memory_gib is not None:
            return self.settings.gpu_memory_gib
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory / 2**30
        return None

    async def _fetch_inputs(self, job: JobMessage) -> Inputs:
        params = job.params
        assert isinstance(params, GenerationParams)
        decoded: dict[str, Any] = {}
        for name, key in job.inputs.items():
            data = await patiently(
                lambda key=key: self._store.get_bytes(key), self.settings.store_patience_s, "read_input"
            )
            if data is None:
                raise JobFailed(JobError(code="input_missing", message=f"the job's {name} ({key}) is not in the store"))
            try:
                if name == "image":
                    decoded["image"] = await asyncio.to_thread(load_image, data, params.width, params.height)
                else:
                    decoded["video"] = await asyncio.to_thread(
                        load_video, data, params.num_frames, params.width, params.height
                    )
            except Exception as exc:
                raise JobFailed(JobError(code="invalid_input", message=f"{name}: {exc}")) from exc
        return Inputs(**decoded)

    async def run_download(self, job: JobMessage, reporter: JobReporter) -> None:
        """Fetch a model into the Hugging Face cache, reporting progress per finished file."""
        params = job.params
        if not isinstance(params, DownloadParams) or job.mode != "download":
            raise JobFailed(wrong_queue(f"a {job.mode} job came through the downloads queue"))
        spec = self._registry.get(params.model)
        if spec is None:  # workers share the downloads queue: another one's registry may have it
            raise LookupError(f"model {params.model!r} is not in this worker's registry; handed back")
        await reporter.start(
            status=JobStatus.RUNNING,
            phase=Phase.DOWNLOADING,
            started_at=utcnow(),
            worker=self.worker_id,
        )

        def on_progress(done: int, total: int) -> None:
            reporter.update_threadsafe(progress=0.99 * done / total, message=f"{done} of {total} files")

        try:
            summary = await in_daemon_thread(
                download, spec, self.settings.models_dir, on_progress, self._stop_downloads
            )
        except DownloadFailed as exc:
            raise JobFailed(JobError(code=exc.code, message=exc.message)) from exc
        await reporter.flush()
        await reporter.update(status=JobStatus.SUCCEEDED, phase=Phase.SUCCEEDED, progress=1.0, message=summary)
        log.info("model_downloaded", summary=summary)

    async def _upload(self, key: str, path: Path) -> None:
        """Upload, waiting out a store outage; if it outlasts the patience, the job is handed back."""
        await patiently(lambda: self._store.put_file(key, path, "video/mp4"), self.settings.store_patience_s, "upload")

    async def _remove_output(self, key: str, why: str) -> None:
        """Remove a video this run uploaded that no record will name."""
        try:
            await self._store.delete(key)
        except Exception as exc:  # the job ends all the same; the bucket's retention removes it later
            log.warning("output_not_removed", key=key, why=why, error=f"{type(exc).__name__}: {exc}")

    async def _publish_end_again(self, record: JobRecord) -> None:
        """A job a worker ended (ran, or ended as it took it), delivered again after its end was
        written: the run that wrote the end may not have got its event out (the broker went away before it could, and the
        message came back), so it is published again, once, best effort. Clients may see the end
        twice, with the same seq (streams drop the copy; webhooks carry the same webhook-id)."""
        if (record.attempts == 0 and record.ended_by is None) or record.deleted_at is not None:
            return  # ended by a gateway, which published it; or deleted since, and its video with it
        try:
            await self._publish_event(JobEvent.from_record(record))
        except Exception as exc:
            log.warning("end_not_published_again", error=f"{type(exc).__name__}: {exc}")

    async def _tell_dropped(self, record: JobRecord) -> None:
        """The message just acknowledged was of a job that ended before any worker started it:
        tell the gateways it has left its queue (they stop counting it apart). Best effort: a
        gateway that misses it counts one waiting job too few until it reads the queue with
        fewer messages than it counts ended (at the latest when the queue is empty)."""
        if not left_in_queue(record):
            return
        assert self._events is not None and isinstance(record.params, GenerationParams)
        notice = JobDropped(job_id=record.job_id, model=record.model, priority=record.params.priority)
        try:
            await self._events.publish(to_amqp(notice), routing_key=Topology.dropped_key(record.job_id))
        except Exception as exc:
            log.warning("dropped_notice_not_sent", error=f"{type(exc).__name__}: {exc}")

    async def _publish_event(self, event: JobEvent) -> None:
        assert self._events is not None
        await self._events.publish(to_amqp(event), routing_key=Topology.event_key(event.job_id, event.status))


def wrong_queue(why: str) -> JobError:
    """A message that another service published to a queue whose workers cannot run it."""
    return JobError(code="wrong_queue", message=f"{why}: the job's message was published with the wrong routing key")


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` on a thread of its own that does not hold up the process's exit (a download stuck
    in a network read, say), unlike asyncio.to_thread's pool, which Python waits for at exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not done.done():
            if error is None:
                done.set_result(result)
            else:
                done.set_exception(error)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the awaiting task
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=f"{getattr(fn, '__name__', 'task')}-thread", daemon=True).start()
    return await done


async def _ignore(message: AbstractIncomingMessage) -> None:
    """Presence queues never hold messages; should one arrive, it is dropped."""


def _summarise(record: JobRecord) -> None:
    """The one line that sums up a job's attempt, whatever its end (job_id and model are bound)."""
    job_ended(record)
    timings = record.timings.model_dump() if record.timings else {}
    output = record.output
    log.info(
        "job_summary",
        status=record.status.value,
        attempts=record.attempts,
        worker=record.worker,
        error=record.error.code if record.error else None,
        memory_plan=record.memory_plan,
        tier=getattr(record.params, "tier", None),
        bytes=output.bytes if output else None,
        frames=output.num_frames if output else None,
        **{f"{name}_s": value for name, value in timings.items()},
    )


def _raise_if(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise JobCancelled()


def _closing(message: AbstractIncomingMessage) -> asyncio.Future[Any] | None:
    """What completes when the channel the message came on closes; None if it has closed already."""
    try:
        return message.channel.closing
    except ChannelInvalidStateError:
        return None


def _record_from(job: JobMessage) -> JobRecord:
    """A record for a job whose stored record is missing (e.g. published by another service)."""
    record = JobRecord(
        job_id=job.job_id,
        mode=job.mode,
        model=job.params.model,
        status=JobStatus.QUEUED,
        phase=Phase.QUEUED,
        progress=0.0,
        seq=0,
        created_at=job.timestamp,
        updated_at=utcnow(),
        params=job.params,
    )
    record.events = [record.last_event()]
    return record
