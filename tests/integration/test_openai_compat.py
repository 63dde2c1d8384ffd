"""The OpenAI-compatible Videos API, driven by the official `openai` package against the running gateway."""

from __future__ import annotations

import io
import json

import openai
import pytest

from tests.helpers import TOKENS, bucket_of, object_names, png_bytes, s3_client
from worker.encode import probe_mp4

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

TINY = {"model": "ltx-tiny", "size": "32x32", "seconds": "1"}  # 8 fps: 1 s is 9 frames


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(api_key=TOKENS["tester"], base_url=f"{stack.gateway_url}/v1", max_retries=0)


def test_create_poll_download(client, tmp_path) -> None:
    video = client.videos.create(prompt="a lighthouse at dusk", **TINY)
    assert (video.object, video.status, video.model, video.size, video.seconds) == (
        "video",
        "queued",
        "ltx-tiny",
        "32x32",
        "1",
    )
    assert video.progress == 0 and isinstance(video.created_at, int)
    done = client.videos.poll(video.id, poll_interval_ms=100)
    assert done.status == "completed" and done.progress == 100 and done.completed_at >= done.created_at
    assert done.error is None
    path = tmp_path / "video.mp4"
    client.videos.download_content(video.id).write_to_file(path)
    info = probe_mp4(path)
    assert (info.num_frames, info.width, info.height) == (9, 32, 32)


def test_image_reference_makes_an_image_to_video_job(client, stack, tmp_path) -> None:
    video = client.videos.create(
        prompt="the picture, moving", input_reference=("in.png", png_bytes(32, 32), "image/png"), **TINY
    )
    done = client.videos.poll(video.id, poll_interval_ms=100)
    assert done.status == "completed", done.error
    import requests

    job = requests.get(
        f"{stack.gateway_url}/api/v1/jobs/{video.id}",
        timeout=10,
        headers={"Authorization": f"Bearer {TOKENS['tester']}"},
    ).json()
    assert job["mode"] == "image-to-video"


def test_list_pages_in_both_orders(client) -> None:
    made = [client.videos.create(prompt=f"page {i}", **TINY).id for i in range(3)]
    newest = client.videos.list(limit=2, order="desc")
    assert [v.id for v in newest.data] == made[::-1][:2] and newest.has_more
    following = client.videos.list(limit=1, order="desc", after=newest.data[-1].id)
    assert [v.id for v in following.data] == [made[0]]
    # Oldest first, every page (the package follows `after` itself): the key has many other jobs.
    ids = [v.id for v in client.videos.list(limit=100, order="asc")]
    assert ids.index(made[0]) < ids.index(made[1]) < ids.index(made[2])
    for video_id in made:
        client.videos.poll(video_id, poll_interval_ms=100)


def test_delete_removes_the_video_of_every_attempt(client, stack) -> None:
    """A first run that died after its upload left jobs/<id>/video.mp4; the second succeeded with
    video-2.mp4, which the record names: deleting the video removes both."""
    video = client.videos.create(prompt="run twice", **TINY)
    client.videos.poll(video.id, poll_interval_ms=100)
    s3, bucket, prefix = s3_client(stack), bucket_of(stack), f"jobs/{video.id}/"
    record = json.loads(s3.get_object(bucket, prefix + "job.json").read())
    data = s3.get_object(bucket, prefix + "video.mp4").read()
    s3.put_object(bucket, prefix + "video-2.mp4", io.BytesIO(data), len(data))
    record["attempts"], record["output"]["key"] = 2, prefix + "video-2.mp4"
    body = json.dumps(record).encode()
    s3.put_object(bucket, prefix + "job.json", io.BytesIO(body), len(body))
    assert client.videos.delete(video.id).deleted
    assert object_names(stack, prefix) == {prefix + "job.json"}


def test_delete_cancels_or_removes(client, stack) -> None:
    video = client.videos.create(prompt="short-lived", **TINY)
    client.videos.poll(video.id, poll_interval_ms=100)
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)
    # The record stays as a tombstone without its video, so a late delivery of the job is dropped.
    names = object_names(stack, f"jobs/{video.id}/")
    assert names == {f"jobs/{video.id}/job.json"}
    import requests

    job = requests.get(
        f"{stack.gateway_url}/api/v1/jobs/{video.id}",
        timeout=10,
        headers={"Authorization": f"Bearer {TOKENS['tester']}"},
    )
    assert job.status_code == 404


def test_delete_of_a_queued_video_deletes_it_of_a_running_one_cancels_it(client, stack) -> None:
    """Queued (a model no worker serves): cancelled and deleted at once. Running: cancelled, and
    `deleted` false until a delete after its end."""
    import time

    import requests

    queued = client.videos.create(prompt="never runs", model="ltx-video", size="256x256", seconds="1")
    assert client.videos.delete(queued.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(queued.id)

    headers = {"Authorization": f"Bearer {TOKENS['tester']}"}
    slow = {"prompt": "long", "model": "ltx-slow", "num_inference_steps": 200}
    started = requests.post(
        f"{stack.gateway_url}/api/v1/generate/text-to-video", json=slow, headers=headers, timeout=30
    )
    job_id = started.json()["job_id"]
    deadline = time.monotonic() + 60
    while client.videos.retrieve(job_id).status != "in_progress":
        assert time.monotonic() < deadline, "the slow job did not start"
        time.sleep(0.05)
    first = client.videos.delete(job_id)
    assert (first.id, first.deleted) == (job_id, False)
    ended = client.videos.poll(job_id, poll_interval_ms=100)
    assert (ended.status, ended.error.code) == ("failed", "cancelled")
    assert client.videos.delete(job_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(job_id)


def test_errors_name_openai_fields(client, stack) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.videos.create(prompt="odd size", model="ltx-tiny", size="33x32", seconds="1")
    assert error.value.body["param"] == "size" and "32" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.videos.create(prompt="too long", model="ltx-tiny", size="32x32", seconds="60")
    assert error.value.body["param"] == "seconds"
    with pytest.raises(openai.BadRequestError) as error:
        client.videos.create(prompt="too short", model="ltx-tiny", size="32x32", seconds="0")
    assert error.value.body["param"] == "seconds" and error.value.body["message"] == (
        "seconds: model 'ltx-tiny' makes videos of at least 1 s (9 frames at 8 fps); less than 0.625 s rounds to none"
    )
    with pytest.raises(openai.BadRequestError) as error:  # both problems at once
        client.videos.create(prompt="odd and long", model="ltx-tiny", size="33x32", seconds="60")
    assert error.value.body["param"] == "seconds"
    assert error.value.body["message"].startswith(
        "seconds: model 'ltx-tiny' makes at most 8 s (65 frames at 8 fps); 8.625 s or more rounds to more; "
    )
    assert "; size: width must be a multiple of 32" in error.value.body["message"], error.value.body
    with pytest.raises(openai.BadRequestError) as error:  # under half a step rounds to none
        client.videos.create(prompt="too short", model="ltx-tiny", size="32x32", seconds="0.6")
    assert error.value.body["param"] == "seconds"
    # Half a step rounds up, whether the step below is odd or even (round() would go to the even one).
    # (the video object's seconds are its frames' duration: 9, 25, 33 and 65 frames at 8 fps)
    for seconds, made in [("0.625", "1"), ("2.625", "3"), ("3.625", "4"), ("8.5", "8")]:
        video = client.videos.create(prompt="halves", model="ltx-tiny", size="32x32", seconds=seconds)
        assert video.seconds == made, seconds
    with pytest.raises(openai.BadRequestError) as error:
        client.videos.create(prompt="just too long", model="ltx-tiny", size="32x32", seconds="8.625")
    assert error.value.body["param"] == "seconds" and "8.625 s or more rounds to more" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.videos.create(prompt="who", model="sora-2")
    assert error.value.body["param"] == "model"
    stranger = openai.OpenAI(api_key="vg_wrong", base_url=f"{stack.gateway_url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        stranger.videos.list()
    assert refused.value.body == {
        "message": "unknown API key",
        "type": "authentication_error",
        "param": None,
        "code": "unauthorized",
    }
    other = openai.OpenAI(api_key=TOKENS["other"], base_url=f"{stack.gateway_url}/v1", max_retries=0)
    mine = client.videos.create(prompt="mine", **TINY)
    with pytest.raises(openai.NotFoundError):
        other.videos.retrieve(mine.id)
    client.videos.poll(mine.id, poll_interval_ms=100)


def test_a_problem_with_several_fields_is_named_once(client) -> None:
    """A job too large for the GPUs is one problem of width, height and num_frames, which are size
    and seconds here: the message names it once, with both fields."""
    with pytest.raises(openai.BadRequestError) as error:
        client.videos.create(prompt="huge", model="ltx-costed", size="256x256", seconds="8")  # 65 frames
    body = error.value.body
    assert (body["param"], body["code"]) == ("size", "validation_error"), body
    assert body["message"].startswith("size, seconds: 256x256x65 needs about "), body
    assert body["message"].count("needs about") == 1 and body["message"].count("seconds") == 1, body


def test_a_deleted_job_is_not_replayed_by_its_idempotency_key(client, stack) -> None:
    import uuid

    import requests

    headers = {"Authorization": f"Bearer {TOKENS['tester']}", "Idempotency-Key": f"deleted-{uuid.uuid4()}"}
    body = {"prompt": "once", "model": "ltx-tiny"}
    first = requests.post(f"{stack.gateway_url}/api/v1/generate/text-to-video", json=body, headers=headers, timeout=30)
    assert first.status_code == 202
    job_id = first.json()["job_id"]
    client.videos.poll(job_id, poll_interval_ms=100)
    client.videos.delete(job_id)
    again = requests.post(f"{stack.gateway_url}/api/v1/generate/text-to-video", json=body, headers=headers, timeout=30)
    assert again.status_code == 409 and again.json()["error"]["code"] == "idempotency_conflict"


def test_every_answer_under_v1_is_in_openais_shape(stack) -> None:
    """Answers given before a /v1 handler runs too: the key check's 401 and 429, unknown paths and methods."""
    import requests

    url = f"{stack.gateway_url}/v1/videos"
    mine, limited = ({"Authorization": f"Bearer {TOKENS[key]}"} for key in ("tester", "limited-openai"))
    answers = [requests.get(url, timeout=30)]  # no key
    answers.append(requests.get(f"{stack.gateway_url}/v1/nothing-here", headers=mine, timeout=30))
    answers.append(requests.put(url, headers=mine, timeout=30))
    for _ in range(20):  # past the key's 5 a second
        answers.append(requests.get(url, headers=limited, timeout=30))
        if answers[-1].status_code == 429:
            break
    expected = [(401, "authentication_error", "unauthorized"), (404, "invalid_request_error", "not_found")]
    expected += [(405, "invalid_request_error", "method_not_allowed"), (429, "rate_limit_error", "rate_limited")]
    got = [(a.status_code, a.json()["error"]["type"], a.json()["error"]["code"]) for a in answers[:3] + answers[-1:]]
    assert got == expected
    assert all(set(a.json()["error"]) == {"message", "type", "param", "code"} for a in answers if a.status_code >= 400)
    assert answers[-1].headers["Retry-After"]
    # A body with two problems: both in the message, the first as `param`.
    bad = requests.post(url, json={"prompt": "", "size": "big"}, headers=mine, timeout=30)
    error = bad.json()["error"]
    assert (bad.status_code, error["type"], error["param"]) == (400, "invalid_request_error", "prompt")
    assert error["message"].startswith("prompt: ") and "; size: " in error["message"]
    # The service's own routes keep the service's shape.
    own = requests.get(f"{stack.gateway_url}/api/v1/jobs", timeout=30)
    assert own.status_code == 401 and set(own.json()["error"]) == {"code", "message"}
