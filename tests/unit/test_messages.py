from __future__ import annotations

import json

import pytest

from schemas.jobs import JobStatus, Phase
from schemas.messages import DecodeError, JobEvent, JobMessage, decode, encode
from tests.helpers import queued_record, tiny_params

PARAMS = tiny_params()


def test_round_trip() -> None:
    message = JobMessage(job_id="j", mode="text-to-video", params=PARAMS)
    assert decode(encode(message)) == message
    event = JobEvent(
        job_id="j", seq=3, status=JobStatus.RUNNING, phase=Phase.DENOISING, progress=0.5, step=1, total_steps=2
    )
    assert decode(encode(event)) == event


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"{}",
        json.dumps(
            {
                "type": "job.submit",
                "schema_version": 2,
                "job_id": "j",
                "mode": "text-to-video",
                "params": PARAMS.model_dump(),
            }
        ).encode(),
        json.dumps({"type": "job.unknown"}).encode(),
    ],
)
def test_bad_payloads_raise_one_error_keeping_the_bytes(raw: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(raw)
    assert info.value.raw == raw and info.value.reason


def test_terminal_event_carries_the_record() -> None:
    record = queued_record(status=JobStatus.SUCCEEDED, phase=Phase.SUCCEEDED, progress=1.0, seq=8, params=PARAMS)
    assert JobEvent.from_record(record).job == record
    running = record.model_copy(update={"status": JobStatus.RUNNING})
    assert JobEvent.from_record(running).job is None
