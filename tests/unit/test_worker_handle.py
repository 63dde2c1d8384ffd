"""The worker's message handling with fakes that behave like the broker and the store."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Callable

import pytest
import torch
from aio_pika.exceptions import ChannelInvalidStateError, MessageProcessError
from prometheus_client import REGISTRY

from common.settings import WorkerSettings
from common.store import output_key
from schemas.jobs import DownloadParams, JobRecord, JobStatus, Phase
from schemas.messages import CancelMessage, JobMessage, decode, encode
from schemas.registry import load_registry
from tests.helpers import FakeRecords, tiny_params
from worker.pipelines import Generated
from worker.worker import LANES, Worker, _record_from


class FakeStore(FakeRecords):
    def __init__(self) -> None:
        super().__init__()
        self.objects = {}

    async def get_bytes(self, key):
        return self.objects.get(key)

    async def put_file(self, key, path, content_type):
        self.objects[key] = path.read_bytes()

    async def delete(self, key):
        self.objects.pop(key, None)


class FakeChannel:
    """The channel a message came on, as aiormq's: each read of `closing` while it is open makes
    a new observer, a future that completes when the channel closes and stays attached to the
    channel until then, or until it is cancelled."""

    def __init__(self) -> None:
        self._closed = asyncio.get_running_loop().create_future()
        self.observers: set[asyncio.Future[None]] = set()  # attached to the channel

    @property
    def closing(self) -> asyncio.Future[None]:
        if self._closed.done():
            return self._closed
        observer = asyncio.get_running_loop().create_future()
        self.observers.add(observer)
        observer.add_done_callback(self.observers.discard)
        return observer

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    def close(self) -> None:  # the connection dropped: the broker puts the message back in its queue
        if not self._closed.done():
            self._closed.set_result(None)
            for observer in list(self.observers):
                observer.set_result(None)


class FakeControl:
    """A control message (a cancel broadcast, a new-job notice): only its body is read."""

    def __init__(self, body: bytes) -> None:
        self.body = body


class FakeMessage:
    """Records how the worker settled it; like aio-pika's IncomingMessage, settling it twice or
    after its channel closed raises."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.settled: list[str] = []
        self._channel = FakeChannel()

    @property
    def channel(self) -> FakeChannel:
        if self._channel.is_closed:
            raise ChannelInvalidStateError()
        return self._channel

    def _settle(self, how: str) -> None:
        if self.settled:
            raise MessageProcessError("Message already processed", self)
        self.channel  # noqa: B018 - raises once the channel has closed
        self.settled.append(how)

    async def ack(self):
        self._settle("ack")

    async def nack(self, requeue=True):
        self._settle(f"nack(requeue={requeue})")

    async def reject(self, requeue=False):
        self._settle(f"reject(requeue={requeue})")


class OomRunner:
    """Raises what a real CUDA allocation failure raises, then behaves on the next job."""

    def __init__(self) -> None:
        self.calls = 0
        self.released = 0

    def generate(self, mode, params, inputs, on_step):
        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        import numpy as np

        on_step(1, 1)
        return Generated(
            frames=np.zeros((params.num_frames, params.height, params.width, 3), np.uint8),
            load_s=0.01,
            denoise_s=0.01,
            decode_s=0.01,
        )

    def release_memory(self):
        self.released += 1


def job(job_id: str) -> JobMessage:
    return JobMessage(
        job_id=job_id,
        mode="text-to-video",
        params=tiny_params(num_inference_steps=1),
    )


@pytest.fixture
def worker():
    runner = OomRunner()
    store = FakeStore()
    w = Worker(WorkerSettings(serve_models=["ltx-tiny"]), store, {"ltx-tiny": runner}, load_registry())
    published = []

    async def publish(event):
        published.append(event)

    w._publish_event = publish
    w._events = NoticeExchange()
    return w, store, runner, published


class NoticeExchange:
    """The worker's events exchange, for what it publishes there itself (drop notices)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    async def publish(self, message, routing_key: str, **_: object) -> None:
        self.sent.append((routing_key, decode(message.body)))


async def test_out_of_memory_fails_the_job_frees_memory_and_the_next_job_runs(worker) -> None:
    w, store, runner, published = worker
    first = FakeMessage(encode(job("a")))
    await w.handle(first, w.run_job)
    record = store.records["a"]
    assert first.settled == ["ack"]
    assert record.status == JobStatus.FAILED and record.error.code == "out_of_memory"
    assert "fewer frames or a smaller size" in record.error.message and runner.released == 1

    second = FakeMessage(encode(job("b")))
    await w.handle(second, w.run_job)
    assert second.settled == ["ack"] and store.records["b"].status == JobStatus.SUCCEEDED
    assert "jobs/b/video.mp4" in store.objects


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out_of_memory"),
        (RuntimeError("a kernel failed"), "generation_failed"),
    ],
    ids=["out_of_memory", "generation_failed"],
)
async def test_a_failed_generations_tensors_are_freed_before_the_next_job_generates(failure, code) -> None:
    """The frames of a failed generation (and their tensors) hang from its exception's traceback:
    the memory is released once nothing holds them, and before the next job starts."""

    class ActivationsRunner(RecordingRunner):
        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            super().__init__(loop)
            self.activations: weakref.ref[torch.Tensor] | None = None
            self.alive_at_release: list[bool] = []
            self.alive_at_next_start: bool | None = None

        def generate(self, mode, params, inputs, on_step):
            if params.prompt == "a":
                activations = torch.empty(2**20, dtype=torch.uint8)  # stands in for GiBs on a GPU
                self.activations = weakref.ref(activations)
                raise type(failure)(*failure.args)  # a new one, as a real failure is
            self.alive_at_next_start = self.activations() is not None
            return super().generate(mode, params, inputs, on_step)

        def release_memory(self):
            gc.collect()
            self.alive_at_release.append(self.activations() is not None)

    runner = ActivationsRunner(asyncio.get_running_loop())
    store = FakeStore()
    w, messages, _ = dispatching_worker(runner, store, "ab")
    w._dispatcher = asyncio.create_task(w._dispatch())
    try:
        await asyncio.wait_for(wait_settled(messages["b"]), 10)
        await asyncio.wait_for(wait_settled(messages["a"]), 10)
    finally:
        await w.stop(5)
    assert store.records["a"].error.code == code
    assert runner.alive_at_release == [False], "released while the failed job's tensors were still referenced"
    assert runner.alive_at_next_start is False
    assert store.records["b"].status == JobStatus.SUCCEEDED


async def test_a_run_of_a_job_started_before_begins_with_no_step(worker) -> None:
    """The record of a job handed back mid-denoising keeps its last step; the next run's start
    clears it: no step of this run has run yet."""
    w, store, runner, published = worker
    runner.calls = 1  # past the out-of-memory call
    message = FakeMessage(encode(job("r")))
    store.records["r"] = _record_from(decode(message.body)).advance(
        status=JobStatus.RUNNING, phase=Phase.DENOISING, attempts=1, worker="worker-old", step=3, total_steps=4
    )
    await w.handle(message, w.run_job)
    start = next(e for e in published if e.phase == Phase.LOADING)
    assert (start.step, start.total_steps) == (None, None)
    assert store.records["r"].status == JobStatus.SUCCEEDED and store.records["r"].attempts == 2


async def test_a_finished_job_delivered_again_is_acked_without_running(worker) -> None:
    """... and its end is published again: the run that wrote it may have lost its event (the
    broker went away for longer than the store patience, and the message came back)."""
    w, store, runner, published = worker
    runner.calls = 1  # past the out-of-memory call
    await w.handle(FakeMessage(encode(job("c"))), w.run_job)
    assert store.records["c"].status == JobStatus.SUCCEEDED and runner.calls == 2
    end = published[-1]
    again = FakeMessage(encode(job("c")))
    await w.handle(again, w.run_job)
    assert again.settled == ["ack"] and runner.calls == 2, "not run twice"
    same = [e.model_dump(exclude={"message_id"}) for e in published[-2:]]
    assert published[-2] == end and same[0] == same[1]  # the same event again, seq and all


async def test_the_end_of_a_job_a_worker_ended_without_starting_it_is_published_again(worker, monkeypatch) -> None:
    """Expired as this worker took it (attempts 0): if its message comes back (its end's event
    may have been lost with the broker), the end goes out again; a gateway's end does not."""
    w, store, runner, published = worker
    monkeypatch.setitem(w._registry.models["ltx-tiny"].__dict__, "max_queue_s", 0)  # it waited too long
    await w.handle(FakeMessage(encode(job("x"))), w.run_job)
    ended = store.records["x"]
    assert ended.error.code == "expired" and ended.attempts == 0 and ended.ended_by == w.worker_id
    await w.handle(FakeMessage(encode(job("x"))), w.run_job)
    assert [(e.job_id, e.seq, e.status) for e in published] == [("x", ended.seq, JobStatus.FAILED)] * 2

    store.records["g"] = _record_from(job("g")).advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED)
    await w.handle(FakeMessage(encode(job("g"))), w.run_job)
    assert [e.job_id for e in published] == ["x", "x"] and runner.calls == 0


async def test_dropping_a_job_that_ended_while_queued_tells_the_gateways(worker, monkeypatch) -> None:
    """Cancelled, or expired, before any worker started it: its message leaves the queue here."""
    w, store, runner, published = worker
    runner.calls = 1  # past the out-of-memory call
    store.records["q"] = _record_from(job("q")).advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED)
    high = job("h").model_copy(update={"params": tiny_params(num_inference_steps=1, priority="high")})
    monkeypatch.setitem(w._registry.models["ltx-tiny"].__dict__, "max_queue_s", 0)  # it waited too long
    await w.handle(FakeMessage(encode(job("q"))), w.run_job)
    await w.handle(FakeMessage(encode(high)), w.run_job)
    assert store.records["h"].error.code == "expired" and runner.calls == 1, "neither ran"
    assert [e.job_id for e in published] == ["h"]  # the end this worker wrote; q's was the gateway's
    assert [(key, type(n).__name__, n.job_id, n.model, n.priority) for key, n in w._events.sent] == [
        ("dropped.q", "JobDropped", "q", "ltx-tiny", "normal"),
        ("dropped.h", "JobDropped", "h", "ltx-tiny", "high"),
    ]


async def test_no_drop_notice_for_a_job_that_was_taken_to_run(worker) -> None:
    """Its message left the queue when a worker first took it; the gateways never counted it."""
    w, store, runner, _ = worker
    await w.handle(FakeMessage(encode(job("o"))), w.run_job)  # fails: out of memory
    await w.handle(FakeMessage(encode(job("s"))), w.run_job)  # succeeds
    await w.handle(FakeMessage(encode(job("s"))), w.run_job)  # delivered again: already finished
    w._cancel("c")
    store.records["c"] = _record_from(job("c")).advance(status=JobStatus.RUNNING, phase=Phase.LOADING, attempts=1)
    await w.handle(FakeMessage(encode(job("c"))), w.run_job)  # cancelled while it ran elsewhere
    assert store.records["c"].status == JobStatus.CANCELLED
    assert w._events.sent == []


async def test_a_cancel_that_comes_while_the_job_waits_for_the_generation_thread_skips_generation(worker) -> None:
    w, store, runner, _ = worker
    runner.calls = 1  # past the out-of-memory call
    busy = threading.Event()
    w._gpu.submit(busy.wait, 30)  # the generation thread is still busy (releasing the last job, say)
    run = asyncio.create_task(w.handle(FakeMessage(encode(job("k"))), w.run_job))
    for _ in range(1000):
        if "k" in w._running:  # the run has handed its generation to the thread
            break
        await asyncio.sleep(0.01)
    await w._on_control(FakeControl(encode(CancelMessage(job_id="k"))))
    busy.set()
    await asyncio.wait_for(run, 10)
    assert runner.calls == 1 and store.records["k"].message == "cancelled while running"


async def test_a_job_published_to_the_wrong_queue_fails_once_naming_the_routing_key(worker) -> None:
    """Other services may publish jobs themselves: one this worker cannot run fails at once
    instead of being handed back until the delivery limit ends it as a crash."""
    w, store, runner, _ = worker
    other_model = job("m").model_copy(update={"params": tiny_params(model="wan-tiny")})
    download = JobMessage(job_id="d", mode="download", params=DownloadParams(model="ltx-tiny", repo=None))
    for message, run in [(other_model, w.run_job), (download, w.run_job), (job("g"), w.run_download)]:
        settled = FakeMessage(encode(message))
        await w.handle(settled, run)
        error = store.records[message.job_id].error
        assert settled.settled == ["ack"] and error.code == "wrong_queue" and "routing key" in error.message
    assert runner.calls == 0


async def test_a_download_of_a_model_this_worker_does_not_know_is_handed_back(worker, monkeypatch) -> None:
    """Workers share the downloads queue, and registries differ during a rolling update."""
    w, store, _, _ = worker
    monkeypatch.setattr("worker.worker.REQUEUE_DELAY_S", 0.0)
    message = JobMessage(job_id="u", mode="download", params=DownloadParams(model="newer-model", repo=None))
    settled = FakeMessage(encode(message))
    await w.handle(settled, w.run_download)
    assert settled.settled == ["nack(requeue=True)"] and "u" not in store.records  # nothing written


@pytest.mark.parametrize("body", [b"{not json", b'{"type": "job.submit", "schema_version": 9}'])
async def test_malformed_or_unknown_version_goes_to_the_dead_letter_queue(worker, body) -> None:
    w, *_ = worker
    message = FakeMessage(body)
    await w.handle(message, w.run_job)
    assert message.settled == ["reject(requeue=False)"]


async def test_a_job_cancelled_just_as_it_was_taken_is_acked_without_running(worker) -> None:
    """The gateway cancelled it between this worker's read of the record and its first write."""
    w, store, runner, published = worker
    runner.calls = 1  # past the out-of-memory call
    read = store.get_record_tagged

    async def read_then_cancelled(job_id):
        found = await read(job_id)
        if not found[0].status.is_terminal:  # once
            store.records[job_id] = found[0].advance(status=JobStatus.CANCELLED, phase=Phase.CANCELLED)
        return found

    store.get_record_tagged = read_then_cancelled
    store.records["f"] = _record_from(job("f"))
    message = FakeMessage(encode(job("f")))
    await w.handle(message, w.run_job)
    assert message.settled == ["ack"] and runner.calls == 1, "acked, never generated"
    assert store.records["f"].status == JobStatus.CANCELLED and store.records["f"].seq == 1
    assert published == [] and "jobs/f/video.mp4" not in store.objects
    assert [key for key, _ in w._events.sent] == ["dropped.f"]


async def test_progress_is_given_to_four_decimals(worker) -> None:
    """0.9 x 9 / 20 is 0.40499999999999997 in floating point: clients see 0.405."""
    w, store, runner, published = worker
    runner.calls = 1  # past the out-of-memory call
    generate = runner.generate

    def twenty_steps(mode, params, inputs, on_step):
        for k in range(1, 20):
            on_step(k, 20)
        return generate(mode, params, inputs, lambda k, n: on_step(20, 20))

    runner.generate = twenty_steps
    await w.handle(FakeMessage(encode(job("p"))), w.run_job)
    progress = [entry.progress for entry in store.records["p"].events]
    assert 0.405 in progress and all(value == round(value, 4) for value in progress), progress


@pytest.mark.parametrize("removal", ["works", "fails"])
async def test_a_cancel_that_arrives_during_the_upload_ends_the_job_cancelled_without_its_video(
    worker, removal
) -> None:
    w, store, runner, published = worker
    runner.calls = 1  # past the out-of-memory call
    upload = store.put_file

    async def upload_then_cancel(key, path, content_type):
        await upload(key, path, content_type)
        # The cancel broadcast reaches the worker while the upload is under way.
        await w._on_control(FakeControl(encode(CancelMessage(job_id="u"))))

    async def delete_fails(key):
        raise ConnectionError("store down")

    store.put_file = upload_then_cancel
    if removal == "fails":
        store.delete = delete_fails
    message = FakeMessage(encode(job("u")))
    await w.handle(message, w.run_job)
    record = store.records["u"]
    assert message.settled == ["ack"]
    assert record.status == JobStatus.CANCELLED and record.message == "cancelled while running"
    assert record.output is None
    assert [e.status for e in published][-1] == JobStatus.CANCELLED
    assert ("jobs/u/video.mp4" in store.objects) is (removal == "fails")


async def test_a_job_cancelled_while_it_ran_elsewhere_ends_cancelled_when_delivered_again(worker) -> None:
    """Its worker crashed after the gateway marked the running record with the cancel (a worker
    that never heard the broadcast): the job is not run again."""
    w, store, runner, published = worker
    runner.calls = 1  # past the out-of-memory call
    running = _record_from(job("r")).advance(status=JobStatus.RUNNING, attempts=1, worker="worker-gone")
    store.records["r"] = running.model_copy(update={"cancel_requested_at": running.updated_at})
    message = FakeMessage(encode(job("r")))
    await w.handle(message, w.run_job)
    record = store.records["r"]
    assert message.settled == ["ack"] and runner.calls == 1, "acked, never generated"
    assert record.status == JobStatus.CANCELLED and record.message == "cancelled while running"
    assert [e.status for e in published] == [JobStatus.CANCELLED]


async def test_a_cancel_marked_on_the_record_while_encoding_stops_the_job_before_its_upload(worker) -> None:
    """The broadcast did not reach this worker; the gateway's mark on the record did, at the
    worker's next write (phase uploading): nothing is uploaded."""
    w, store, runner, published = worker
    runner.calls = 1  # past the out-of-memory call
    uploads = []
    write = store.replace_record

    async def mark_after_the_encoding_write(record, etag):
        written = await write(record, etag)
        if record.phase == Phase.ENCODING:  # the gateway's cancel arrives now
            store.records[record.job_id] = record.model_copy(update={"cancel_requested_at": record.updated_at})
        return written

    async def put_file(key, path, content_type):
        uploads.append(key)

    store.replace_record, store.put_file = mark_after_the_encoding_write, put_file
    message = FakeMessage(encode(job("m")))
    await w.handle(message, w.run_job)
    record = store.records["m"]
    assert message.settled == ["ack"] and uploads == []
    assert record.status == JobStatus.CANCELLED and record.cancel_requested_at is not None


async def test_a_job_run_again_after_a_crash_uploads_its_video_under_its_own_attempt(worker) -> None:
    """... and, once it has succeeded, removes the video the crashed run left behind."""
    w, store, runner, _ = worker
    runner.calls = 1  # past the out-of-memory call
    crashed = _record_from(job("c2")).advance(status=JobStatus.RUNNING, attempts=1, worker="worker-gone")
    store.records["c2"] = crashed
    store.objects[output_key("c2")] = b"uploaded by the run that died before writing its end"
    await w.handle(FakeMessage(encode(job("c2"))), w.run_job)
    record = store.records["c2"]
    assert record.status == JobStatus.SUCCEEDED and record.attempts == 2
    assert record.output.key == output_key("c2", 2) == "jobs/c2/video-2.mp4" and list(store.objects) == [
        record.output.key
    ]


async def test_store_trouble_longer_than_the_patience_hands_the_job_back(worker, monkeypatch) -> None:
    w, store, *_ = worker
    monkeypatch.setattr("worker.worker.REQUEUE_DELAY_S", 0.0)
    w.settings.store_patience_s = 0.3

    async def down(job_id):
        raise ConnectionError("store down")

    store.get_record_tagged = down
    message = FakeMessage(encode(job("d")))
    await asyncio.wait_for(w.handle(message, w.run_job), 5)
    assert message.settled == ["nack(requeue=True)"]


async def test_a_short_store_outage_is_waited_out_without_handing_the_job_back(worker) -> None:
    w, store, runner, _ = worker
    runner.calls = 1  # past the out-of-memory call
    failures = {"replace_record": 2, "put_file": 1}
    real_replace_record, real_put_file = store.replace_record, store.put_file

    def flaky(name, real):
        async def op(*args):
            if failures[name] > 0:
                failures[name] -= 1
                raise ConnectionError("store down")
            return await real(*args)

        return op

    store.replace_record = flaky("replace_record", real_replace_record)
    store.put_file = flaky("put_file", real_put_file)
    message = FakeMessage(encode(job("e")))
    await asyncio.wait_for(w.handle(message, w.run_job), 30)
    assert message.settled == ["ack"] and store.records["e"].status == JobStatus.SUCCEEDED
    assert store.records["e"].attempts == 1 and "jobs/e/video.mp4" in store.objects


async def test_a_store_failure_on_the_read_after_a_refused_write_is_waited_out_too(worker) -> None:
    """The decode's progress write is stored but its answer lost, so the encode's write is refused
    and the record read back: that read failing once does not hand the job back either."""
    w, store, runner, _ = worker
    runner.calls = 1  # past the out-of-memory call
    real_replace_record, real_get_record_tagged = store.replace_record, store.get_record_tagged
    blips = {"write": 1, "read": 0}

    async def replace_record(record, etag):
        stored = await real_replace_record(record, etag)
        if record.phase == Phase.DECODING and blips["write"]:
            blips["write"], blips["read"] = 0, 1
            raise ConnectionError("answer lost")
        return stored

    async def get_record_tagged(job_id):
        if blips["read"]:
            blips["read"] = 0
            raise ConnectionError("connection reset")
        return await real_get_record_tagged(job_id)

    store.replace_record, store.get_record_tagged = replace_record, get_record_tagged
    message = FakeMessage(encode(job("e")))
    await asyncio.wait_for(w.handle(message, w.run_job), 30)
    assert blips == {"write": 0, "read": 0}
    assert message.settled == ["ack"] and store.records["e"].status == JobStatus.SUCCEEDED
    assert store.records["e"].attempts == 1


async def test_settled_messages_leave_nothing_attached_to_their_channel(worker) -> None:
    """The job channels live as long as the worker: watching one for a message's run must not
    leave an observer on it once the message is settled."""
    w, store, runner, _ = worker
    runner.calls = 1  # past the out-of-memory call
    channel = FakeChannel()
    for job_id in "fgh":
        message = FakeMessage(encode(job(job_id)))
        message._channel = channel
        await w.handle(message, w.run_job)
        assert message.settled == ["ack"]
    await asyncio.sleep(0)  # a future's done callbacks run on the loop's next turn
    assert not channel.observers


class FakeQueue:
    """A job queue the dispatcher reads with basic.get, as from aio-pika's Queue.get(fail=False)."""

    def __init__(self, messages: list[FakeMessage], lane: int = 0) -> None:
        self.messages, self.lane = messages, lane

    async def get(self, no_ack=False, fail=False):
        if not self.messages:
            return None
        message = self.messages.pop(0)
        message.lane = self.lane  # the channel it was taken on
        return message


class RecordingRunner(OomRunner):
    """Generates at once and notes the order of the jobs it generated."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.calls = 1  # no out-of-memory call
        self.loop = loop
        self.generated: list[str] = []
        self.second_generated = asyncio.Event()

    def generate(self, mode, params, inputs, on_step):
        self.generated.append(params.prompt)
        if len(self.generated) == 2:
            self.loop.call_soon_threadsafe(self.second_generated.set)
        return super().generate(mode, params, inputs, on_step)


class HeldStore(FakeStore):
    """Holds the upload of job "a" until let go."""

    def __init__(self) -> None:
        super().__init__()
        self.upload_of_a_started, self.let_a_finish = asyncio.Event(), asyncio.Event()

    async def put_file(self, key, path, content_type):
        if key == output_key("a"):
            self.upload_of_a_started.set()
            await self.let_a_finish.wait()
        await super().put_file(key, path, content_type)


def dispatching_worker(runner, store, job_ids: str) -> tuple[Worker, dict[str, FakeMessage], FakeQueue]:
    """A worker whose dispatcher reads one fake job queue holding a job per id, prompts named after them."""
    w = Worker(WorkerSettings(serve_models=["ltx-tiny"]), store, {"ltx-tiny": runner}, load_registry())

    async def publish(event):
        pass

    w._publish_event = publish
    messages = {}
    for job_id in job_ids:
        body = JobMessage(job_id=job_id, mode="text-to-video", params=tiny_params(prompt=job_id, num_inference_steps=1))
        messages[job_id] = FakeMessage(encode(body))
    queue = FakeQueue(list(messages.values()))
    # One queue, read through each of the worker's lanes (channels).
    w._job_queues = [[[FakeQueue(queue.messages, lane)]] for lane in range(LANES)]
    return w, messages, queue


async def test_the_next_job_generates_while_the_last_one_uploads_and_never_two_finish_at_once() -> None:
    """One job on the GPU at a time; its encode and upload overlap the next job's generation only."""
    runner, store = RecordingRunner(asyncio.get_running_loop()), HeldStore()
    upload_of_a_started, let_a_finish = store.upload_of_a_started, store.let_a_finish
    w, messages, queue = dispatching_worker(runner, store, "abc")
    dispatcher = w._dispatcher = asyncio.create_task(w._dispatch())
    try:
        await asyncio.wait_for(upload_of_a_started.wait(), 10)
        await asyncio.wait_for(runner.second_generated.wait(), 10)
        assert runner.generated == ["a", "b"] and messages["a"].settled == []  # b generated before a ended
        await asyncio.wait_for(wait_settled(messages["b"]), 10)
        # b is done, but c waits for a: never two jobs finishing beside a third.
        assert messages["a"].settled == [] and queue.messages == [messages["c"]]
        let_a_finish.set()
        await asyncio.wait_for(wait_settled(messages["c"]), 10)
    finally:
        let_a_finish.set()
        await w.stop(5)
    assert dispatcher.done()
    # The two jobs in hand at once came on different channels (a consumer_timeout hands back
    # the messages of one channel); c, taken once a had ended, on a's.
    assert [messages[j].lane for j in "abc"] == [0, 1, 0]
    assert [messages[j].settled for j in "abc"] == [["ack"], ["ack"], ["ack"]]
    assert [store.records[j].status for j in "abc"] == [JobStatus.SUCCEEDED] * 3
    assert runner.generated == ["a", "b", "c"]


async def wait_settled(message: FakeMessage) -> None:
    while not message.settled:
        await asyncio.sleep(0.005)


async def test_stopping_hands_back_both_jobs_in_hand_and_takes_no_third() -> None:
    """Past the grace, the job uploading and the job generating both stay unacknowledged."""
    loop = asyncio.get_running_loop()
    generating_b, let_b_finish = asyncio.Event(), threading.Event()

    class HeldRunner(RecordingRunner):
        def generate(self, mode, params, inputs, on_step):
            if params.prompt == "b":
                loop.call_soon_threadsafe(generating_b.set)
                let_b_finish.wait(30)
            return super().generate(mode, params, inputs, on_step)

    store = HeldStore()
    w, messages, queue = dispatching_worker(HeldRunner(loop), store, "abc")
    w._dispatcher = asyncio.create_task(w._dispatch())
    try:
        await asyncio.wait_for(store.upload_of_a_started.wait(), 10)
        await asyncio.wait_for(generating_b.wait(), 10)
        assert await w.stop(0.2) is False
    finally:
        let_b_finish.set()
        store.let_a_finish.set()
    assert messages["a"].settled == [] and messages["b"].settled == []  # both go back when the connection closes
    assert queue.messages == [messages["c"]] and not w._in_hand


async def test_a_job_delivered_again_while_in_hand_waits_for_that_run_and_does_not_run_twice() -> None:
    runner, store = RecordingRunner(asyncio.get_running_loop()), HeldStore()
    w, messages, _ = dispatching_worker(runner, store, "a")
    first = asyncio.create_task(w.handle(messages["a"], w.run_job))
    await asyncio.wait_for(store.upload_of_a_started.wait(), 10)
    again = FakeMessage(messages["a"].body)
    second = asyncio.create_task(w.handle(again, w.run_job))
    store.let_a_finish.set()
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert runner.generated == ["a"] and messages["a"].settled == ["ack"] and again.settled == ["ack"]
    assert store.records["a"].status == JobStatus.SUCCEEDED


async def test_a_job_that_never_reaches_the_gpu_does_not_hold_up_the_next_one() -> None:
    """A redelivered finished job is acknowledged at once; the next job generates beside the upload."""
    runner, store = RecordingRunner(asyncio.get_running_loop()), HeldStore()
    w, messages, queue = dispatching_worker(runner, store, "axc")
    store.records["x"] = _record_from(decode(messages["x"].body)).model_copy(update={"status": JobStatus.SUCCEEDED})
    w._dispatcher = asyncio.create_task(w._dispatch())
    try:
        await asyncio.wait_for(store.upload_of_a_started.wait(), 10)
        await asyncio.wait_for(runner.second_generated.wait(), 10)
        assert runner.generated == ["a", "c"] and messages["x"].settled == ["ack"] and messages["a"].settled == []
    finally:
        store.let_a_finish.set()
        await w.stop(5)
    assert [messages[j].settled for j in "axc"] == [["ack"]] * 3


class SteppingRunner(RecordingRunner):
    """Denoises in three steps and waits after the first until let go."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.first_step, self.go_on = asyncio.Event(), threading.Event()

    def generate(self, mode, params, inputs, on_step):
        on_step(1, 3)
        self.loop.call_soon_threadsafe(self.first_step.set)
        self.go_on.wait(30)
        on_step(2, 3)
        on_step(3, 3)
        return super().generate(mode, params, inputs, lambda k, n: None)


def capture_events(w: Worker) -> list:
    """The events the worker publishes, in order."""
    published = []

    async def publish(event):
        published.append(event)

    w._publish_event = publish
    return published


async def test_a_job_whose_delivery_is_lost_while_denoising_stops_and_writes_nothing_more() -> None:
    """The broker has the job again (another worker may run it): this run stops at its next step."""
    runner, store = SteppingRunner(asyncio.get_running_loop()), FakeStore()
    w, messages, _ = dispatching_worker(runner, store, "a")
    published = capture_events(w)
    run = asyncio.create_task(w.handle(messages["a"], w.run_job))
    await asyncio.wait_for(runner.first_step.wait(), 10)
    messages["a"]._channel.close()
    for _ in range(1000):  # the worker learns of the closed channel on the event loop
        if "a" in w._lost:
            break
        await asyncio.sleep(0.01)
    runner.go_on.set()
    await asyncio.wait_for(run, 10)
    record = store.records["a"]
    assert record.status == JobStatus.RUNNING and record.step == 1 and record.attempts == 1
    assert messages["a"].settled == [] and output_key("a") not in store.objects
    assert [e.step for e in published if e.status == JobStatus.RUNNING][-1] == 1
    assert not [e for e in published if e.status.is_terminal] and not w._lost


async def test_a_job_lost_while_uploading_ends_once_and_its_copy_here_is_acked_without_running() -> None:
    """The broker restarted during the upload and gave the job back to this worker."""
    runner, store = RecordingRunner(asyncio.get_running_loop()), HeldStore()
    w, messages, _ = dispatching_worker(runner, store, "a")
    first = asyncio.create_task(w.handle(messages["a"], w.run_job))
    await asyncio.wait_for(store.upload_of_a_started.wait(), 10)
    messages["a"]._channel.close()
    again = FakeMessage(messages["a"].body)
    second = asyncio.create_task(w.handle(again, w.run_job))  # waits for the first run to end
    store.let_a_finish.set()
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert runner.generated == ["a"] and messages["a"].settled == [] and again.settled == ["ack"]
    assert store.records["a"].status == JobStatus.SUCCEEDED and output_key("a") in store.objects


async def test_a_job_lost_while_uploading_leaves_its_end_to_the_worker_that_took_it_over() -> None:
    runner, store = RecordingRunner(asyncio.get_running_loop()), HeldStore()
    w, messages, _ = dispatching_worker(runner, store, "a")
    published = capture_events(w)
    run = asyncio.create_task(w.handle(messages["a"], w.run_job))
    await asyncio.wait_for(store.upload_of_a_started.wait(), 10)
    messages["a"]._channel.close()
    # Another worker takes the job back from the queue and starts it (attempt 2).
    mine = store.records["a"]
    store.records["a"] = mine.advance(attempts=2, worker="worker-other")
    store.objects[output_key("a", 2)] = b"the other run's video"
    store.let_a_finish.set()
    await asyncio.wait_for(run, 10)
    assert store.records["a"].worker == "worker-other" and store.records["a"].status == JobStatus.RUNNING
    # This run's video went to its own attempt's key, and is removed: the other run's stays.
    assert list(store.objects) == [output_key("a", 2)]
    assert not [e for e in published if e.status.is_terminal] and messages["a"].settled == []


async def test_a_cancel_during_the_upload_of_a_lost_job_leaves_the_video_of_the_run_that_took_it_over() -> None:
    """The job went back to its queue during the upload and another worker ran it (attempt 2,
    its own video key): a cancel that reaches this worker removes this run's video only."""
    runner, store = RecordingRunner(asyncio.get_running_loop()), HeldStore()
    w, messages, _ = dispatching_worker(runner, store, "a")
    run = asyncio.create_task(w.handle(messages["a"], w.run_job))
    await asyncio.wait_for(store.upload_of_a_started.wait(), 10)
    messages["a"]._channel.close()
    store.records["a"] = store.records["a"].advance(attempts=2, worker="worker-other")
    store.objects[output_key("a", 2)] = b"the other run's video"
    await w._on_control(FakeControl(encode(CancelMessage(job_id="a"))))
    store.let_a_finish.set()
    await asyncio.wait_for(run, 10)
    assert output_key("a", 2) in store.objects and output_key("a") not in store.objects
    assert messages["a"].settled == []


async def test_a_run_taken_over_before_its_channel_closed_removes_its_video_and_settles_its_copy() -> None:
    """The broker gave the job to another worker (attempt 2) while this worker uploaded, before
    this worker learnt that its delivery was lost: its end is refused, its video removed, and its
    message acknowledged (the other run holds a delivery of its own), not handed back."""
    runner, store = RecordingRunner(asyncio.get_running_loop()), HeldStore()
    w, messages, _ = dispatching_worker(runner, store, "a")
    published = capture_events(w)
    run = asyncio.create_task(w.handle(messages["a"], w.run_job))
    await asyncio.wait_for(store.upload_of_a_started.wait(), 10)
    store.records["a"] = store.records["a"].advance(attempts=2, worker="worker-other")
    store.objects[output_key("a", 2)] = b"the other run's video"
    store.let_a_finish.set()
    await asyncio.wait_for(run, 10)
    assert store.records["a"].worker == "worker-other" and store.records["a"].status == JobStatus.RUNNING
    assert list(store.objects) == [output_key("a", 2)]
    assert messages["a"].settled == ["ack"] and not [e for e in published if e.status.is_terminal]
    assert not w._lost


async def test_a_run_taken_over_while_denoising_writes_nothing_more_and_uploads_nothing() -> None:
    runner, store = SteppingRunner(asyncio.get_running_loop()), FakeStore()
    w, messages, _ = dispatching_worker(runner, store, "a")
    published = capture_events(w)
    run = asyncio.create_task(w.handle(messages["a"], w.run_job))
    await asyncio.wait_for(runner.first_step.wait(), 10)
    taken_over = store.records["a"] = store.records["a"].advance(attempts=2, worker="worker-other")
    runner.go_on.set()
    await asyncio.wait_for(run, 10)
    assert store.records["a"] == taken_over and not store.objects
    assert messages["a"].settled == ["ack"] and [e.step for e in published if e.status == JobStatus.RUNNING][-1] == 1


class LostRunWritesFirst(FakeStore):
    """Between this run's read of the record and its `running` write, the record is written by
    an earlier run whose delivery the broker has taken back (that worker has not noticed yet)."""

    def __init__(self, lost_runs_write: Callable[[JobRecord], JobRecord]) -> None:
        super().__init__()
        self.lost_runs_write = lost_runs_write
        self.written = False

    async def replace_record(self, record, etag):
        if not self.written and record.status == JobStatus.RUNNING and record.worker != "worker-old":
            self.written = True
            self.records[record.job_id] = self.lost_runs_write(self.records[record.job_id])
        return await super().replace_record(record, etag)


@pytest.mark.parametrize(
    ("before", "lost_runs_write"),
    [
        # Its `running` write, held up by a slow store, lands after this run read the job queued.
        ("queued", lambda r: r.advance(status=JobStatus.RUNNING, phase=Phase.LOADING, attempts=1, worker="worker-old")),
        # It writes its next step.
        ("running", lambda r: r.advance(step=4)),
    ],
    ids=["its-start", "its-progress"],
)
async def test_a_start_refused_by_another_runs_write_hands_the_message_back(
    monkeypatch, before, lost_runs_write
) -> None:
    """Which of the two runs holds the live delivery the record cannot tell: this one hands its
    message back (acknowledged, it could leave the job `running` for good with a dead run), and
    the next delivery runs the job as the next attempt."""
    monkeypatch.setattr("worker.worker.REQUEUE_DELAY_S", 0.0)
    runner, store = RecordingRunner(asyncio.get_running_loop()), LostRunWritesFirst(lost_runs_write)
    w, messages, _ = dispatching_worker(runner, store, "a")
    record = _record_from(decode(messages["a"].body))
    if before == "running":
        record = record.advance(
            status=JobStatus.RUNNING, phase=Phase.DENOISING, attempts=1, worker="worker-old", step=3
        )
    store.records["a"] = record
    await asyncio.wait_for(w.handle(messages["a"], w.run_job), 10)
    assert messages["a"].settled == ["nack(requeue=True)"] and runner.generated == []
    assert store.records["a"].worker == "worker-old" and store.records["a"].attempts == 1

    again = FakeMessage(messages["a"].body)  # the broker delivers it again
    await asyncio.wait_for(w.handle(again, w.run_job), 10)
    end = store.records["a"]
    assert again.settled == ["ack"] and runner.generated == ["a"]
    assert end.status == JobStatus.SUCCEEDED and end.attempts == 2 and end.worker == w.worker_id


async def test_a_channel_that_closes_after_its_run_ended_does_not_stop_the_next_delivery(worker) -> None:
    """The channel closes as the message is acknowledged; the close's callbacks run on a later
    turn of the event loop, after the run ended."""
    w, store, runner, _ = worker
    runner.calls = 1  # past the out-of-memory call

    class ClosingOnAck(FakeMessage):
        async def ack(self):
            await super().ack()
            self._channel.close()

    message = ClosingOnAck(encode(job("z")))
    await w.handle(message, w.run_job)
    await asyncio.sleep(0)  # the close's callbacks run
    assert message.settled == ["ack"] and "z" not in w._lost


async def test_a_cancel_heard_as_a_download_started_does_not_stop_it_when_delivered_again(worker, monkeypatch) -> None:
    """The gateway broadcast the cancel, then found the download running and answered 409: a
    later delivery of it (the worker that ran it stopped) runs to its end."""
    w, store, _, _ = worker
    monkeypatch.setattr("worker.worker.download", lambda spec, models_dir, on_progress, stop: "1 file")
    message = JobMessage(job_id="d", mode="download", params=DownloadParams(model="ltx-tiny", repo=None))
    store.records["d"] = _record_from(message).advance(status=JobStatus.RUNNING, phase=Phase.LOADING, attempts=1)
    await w._on_control(FakeControl(encode(CancelMessage(job_id="d"))))
    await w.handle(FakeMessage(encode(message)), w.run_download)
    assert store.records["d"].status == JobStatus.SUCCEEDED


@pytest.mark.parametrize("storage", ["http", "xet"])
async def test_stopping_ends_a_download_at_its_next_progress_and_hands_it_back(worker, monkeypatch, storage) -> None:
    """A download may take hours: a stopping worker does not wait for it, nor leave its thread behind."""
    w, store, _, _ = worker
    receiving, ended, aborted = threading.Event(), threading.Event(), threading.Event()

    def snapshot_download(repo_id, revision=None, tqdm_class=None):
        """Like huggingface_hub's: a bar counting files, and a bar per file counting bytes as they come.
        Over HTTP the bytes bar is updated on the download's thread; for a Xet-stored file hf_xet
        updates it from its own thread, which logs what the update raises and goes on, and only
        aborting the Xet session ends the transfer."""
        try:
            files = tqdm_class(total=2, unit="it", disable=True)
            for _ in range(2):
                received = tqdm_class(total=10**12, unit="B", disable=True)
                deadline = time.monotonic() + 30  # a big file; bounded, should stopping not work
                while time.monotonic() < deadline:
                    receiving.set()
                    time.sleep(0.01)  # the network
                    if storage == "http":
                        received.update(64 * 1024)
                        continue
                    if aborted.is_set():
                        raise RuntimeError("the Xet session was aborted")
                    try:
                        received.update(64 * 1024)
                    except Exception:  # hf_xet: "Python exception updating progress", and on
                        pass
                files.update(1)
            return "/cache/snapshot"
        finally:
            ended.set()

    monkeypatch.setattr("huggingface_hub.utils._xet.abort_xet_session", aborted.set)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    spec = load_registry().models["wan2-1-t2v-1-3b"]
    message = FakeMessage(
        encode(JobMessage(job_id="dl", mode="download", params=DownloadParams(model=spec.id, repo=spec.repo)))
    )
    handling = asyncio.create_task(w._on_download(message))
    assert await asyncio.to_thread(receiving.wait, 10), "the download started"
    assert await asyncio.wait_for(w.stop(grace_s=30), 10), "stopped without abandoning the download"
    assert ended.is_set() and handling.done()
    assert message.settled == ["nack(requeue=True)"]  # back in its queue, for another worker to resume
    record = store.records["dl"]
    assert record.status == JobStatus.RUNNING and record.phase == Phase.DOWNLOADING


async def test_the_busy_gauge_is_0_while_an_interrupted_job_waits_to_be_handed_back(worker, monkeypatch) -> None:
    w, store, _, _ = worker
    monkeypatch.setattr("worker.worker.REQUEUE_DELAY_S", 0.0)
    w.settings.store_patience_s = 0.0

    async def down(record, etag):
        raise ConnectionError("store down")

    store.replace_record = down  # the job's `running` write fails: it never reaches the GPU
    message = FakeMessage(encode(job("g")))
    busy_when_handed_back = []
    nack = message.nack

    async def noting_nack(requeue=True):
        busy_when_handed_back.append(REGISTRY.get_sample_value("videogen_worker_busy"))
        await nack(requeue)

    message.nack = noting_nack
    await w._handle_job(message, asyncio.Event())
    assert message.settled == ["nack(requeue=True)"] and busy_when_handed_back == [0.0]
