"""Bad input is refused at the gateway with a 4xx JSON error naming the field and the rule."""

from __future__ import annotations

import base64
import json

import pytest

from tests.helpers import client, object_names, submit

URL = "/api/v1/generate/text-to-video"


@pytest.fixture
async def http():
    async with client() as session:
        yield session


CASES = [
    # (body, status, code, field, rule, text in the message)
    ({}, 422, "validation_error", "prompt", "missing", "Field required"),
    ({"prompt": ""}, 422, "validation_error", "prompt", "string_too_short", "at least 1 character"),
    ({"prompt": "x", "colour": "red"}, 422, "validation_error", "colour", "extra_forbidden", "not permitted"),
    ({"prompt": "x", "width": "wide"}, 422, "validation_error", "width", "int_type", "valid integer"),
    ({"prompt": "x", "width": 33.5}, 422, "validation_error", "width", "int_type", "valid integer"),
    # JSON types are strict: nothing is silently turned into a number.
    ({"prompt": "x", "width": "32"}, 422, "validation_error", "width", "int_type", "valid integer"),
    ({"prompt": "x", "width": 32.0}, 422, "validation_error", "width", "int_type", "valid integer"),
    ({"prompt": "x", "seed": True}, 422, "validation_error", "seed", "int_type", "valid integer"),
    ({"prompt": "x", "guidance_scale": "1.5"}, 422, "validation_error", "guidance_scale", "float_type", "valid number"),
    ({"prompt": "x", "guidance_scale": 51}, 422, "validation_error", "guidance_scale", "less_than_equal", "50"),
    ({"prompt": "x", "seed": -1}, 422, "validation_error", "seed", "greater_than_equal", "0"),
    ({"prompt": "x", "fps": 0}, 422, "validation_error", "fps", "greater_than_equal", "1"),
    (
        {"prompt": "x", "webhook_url": "https://example.com/h", "webhook_events": "job.succeeded,job.succeeded"},
        422,
        "validation_error",
        "webhook_events",
        "unique",
        "repeated: job.succeeded",
    ),
    (
        {"prompt": "x", "num_inference_steps": 0},
        422,
        "validation_error",
        "num_inference_steps",
        "greater_than_equal",
        "1",
    ),
    (
        {"prompt": "x", "width": 40},
        422,
        "validation_error",
        "width",
        "multiple_of_32",
        "nearest valid values: 32 or 64",
    ),
    ({"prompt": "x", "height": 100}, 422, "validation_error", "height", "multiple_of_32", "96 or 128"),
    ({"prompt": "x", "width": 512}, 422, "validation_error", "width", "range", "between 32 and 256"),
    ({"prompt": "x", "num_frames": 10}, 422, "validation_error", "num_frames", "8k+1", "nearest valid values: 9 or 17"),
    ({"prompt": "x", "num_frames": 73}, 422, "validation_error", "num_frames", "maximum", "at most 65"),
    (
        {"prompt": "x", "num_inference_steps": 21},
        422,
        "validation_error",
        "num_inference_steps",
        "maximum",
        "at most 20",
    ),
    ({"prompt": "x", "model": "sora"}, 422, "validation_error", "model", "known_model", "unknown model 'sora'"),
    # A prompt says something to the model: no control characters, and not only invisible ones.
    ({"prompt": "a\u0000b"}, 422, "validation_error", "prompt", "control_characters", "U+0000"),
    ({"prompt": " \u200b\u200d "}, 422, "validation_error", "prompt", "visible_text", "visible character"),
    # Control characters that count as whitespace are refused at either end too, not stripped.
    ({"prompt": "\u0085a red fox\u0085"}, 422, "validation_error", "prompt", "control_characters", "U+0085"),
    (
        {"prompt": "x", "negative_prompt": "\u000c"},
        422,
        "validation_error",
        "negative_prompt",
        "control_characters",
        "U+000C",
    ),
    (
        {"prompt": "x", "negative_prompt": "\u0007"},
        422,
        "validation_error",
        "negative_prompt",
        "control_characters",
        "U+0007",
    ),
    (  # an empty item is refused, not dropped
        {"prompt": "x", "webhook_url": "https://example.com/h", "webhook_events": "job.running,,job.succeeded"},
        422,
        "validation_error",
        "webhook_events.1",
        "literal_error",
        "'job.queued'",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "field", "rule", "text"), CASES, ids=[f"{c[3]}-{c[4]}" for c in CASES]
)
async def test_bad_field_is_named(stack, http, body, status, code, field, rule, text) -> None:
    async with http.post(stack.gateway_url + URL, json=body) as response:
        payload = await response.json()
    assert response.status == status, payload
    error = payload["error"]
    assert error["code"] == code
    detail = next(d for d in error["details"] if d["field"] == field)
    assert detail["rule"] == rule
    assert text in detail["message"] and field in detail["message"]


MALFORMED_JSON = {
    "cut-short": b'{"prompt": "x",',
    "not-utf8": b'{"prompt": "\xff"}',
    "integer-past-python-digit-limit": b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}",
    "nested-too-deep": b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nan": b'{"prompt": "x", "guidance_scale": NaN}',
    "number-past-a-double": b'{"prompt": "x", "guidance_scale": 1e400}',
    "number-below-a-double": b'{"prompt": "x", "guidance_scale": 1e-400}',  # not 0, yet it would be 0.0
    # json.loads alone would take these three as they came
    "utf16": '{"prompt": "x"}'.encode("utf-16"),
    "utf32-without-byte-order-mark": '{"prompt": "x"}'.encode("utf-32-le"),
    "utf8-byte-order-mark": b'\xef\xbb\xbf{"prompt": "x"}',
    # which seed was meant? (json.loads would keep the last)
    "a-key-twice": b'{"prompt": "x", "seed": 1, "seed": 2}',
}


@pytest.mark.parametrize("body", MALFORMED_JSON.values(), ids=MALFORMED_JSON.keys())
async def test_malformed_json_is_400(stack, http, body) -> None:
    async with http.post(stack.gateway_url + URL, data=body, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_json"
    async with http.post(
        stack.gateway_url + "/v1/videos", data=body, headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"


async def test_a_key_twice_and_a_body_not_in_utf8_are_named(stack, http) -> None:
    twice = b'{"prompt": "x", "seed": 1, "seed": 2}'
    async with http.post(stack.gateway_url + URL, data=twice, headers={"Content-Type": "application/json"}) as r:
        assert "the key 'seed' appears more than once" in (await r.json())["error"]["message"]
    utf16 = '{"prompt": "x"}'.encode("utf-16")
    async with http.post(stack.gateway_url + URL, data=utf16, headers={"Content-Type": "application/json"}) as r:
        assert "not UTF-8" in (await r.json())["error"]["message"]
    digits = b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}"
    async with http.post(stack.gateway_url + URL, data=digits, headers={"Content-Type": "application/json"}) as r:
        message = (await r.json())["error"]["message"]
    assert message.endswith("a number of more than 4300 digits") and "sys." not in message, message
    utf16le = '{"prompt": "x"}'.encode("utf-16-le")  # no byte order mark: NULs, which decode
    async with http.post(stack.gateway_url + URL, data=utf16le, headers={"Content-Type": "application/json"}) as r:
        assert "send it in UTF-8" in (await r.json())["error"]["message"]


async def test_errors_speak_of_the_request_not_of_the_libraries_reading_it(stack, http) -> None:
    json_type = {"Content-Type": "application/json"}
    bom = b'\xef\xbb\xbf{"prompt": "x"}'
    async with http.post(stack.gateway_url + URL, data=bom, headers=json_type) as r:
        message = (await r.json())["error"]["message"]
    assert message.endswith("it starts with a byte order mark; send it without one"), message
    cut = b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
    url = stack.gateway_url + "/api/v1/generate/image-to-video"
    async with http.post(url, data=cut, headers={"Content-Type": "multipart/form-data; boundary=b"}) as r:
        message = (await r.json())["error"]["message"]
    assert message == "malformed multipart body: it ends before its closing boundary (--BOUNDARY--)", message
    async with http.post(url, json={"prompt": "x", "image": "abc!"}) as r:
        detail = (await r.json())["error"]["details"][0]
    assert detail["rule"] == "base64" and "outside the base64 alphabet" in detail["message"], detail
    junk = base64.b64encode(b"\x1a\x45\xdf\xa3" + b"not a video" * 50).decode()  # Matroska's signature only
    async with http.post(
        stack.gateway_url + "/api/v1/generate/video-to-video", json={"prompt": "x", "video": junk}
    ) as r:
        detail = (await r.json())["error"]["details"][0]
    assert detail["rule"] == "decodable", detail
    assert detail["message"] == "video: not a readable video file (Invalid data found when processing input)", detail


MALFORMED_MULTIPART = {
    # (the body, the boundary the Content-Type names)
    "no-closing-boundary": (b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n', "b"),
    "other-boundary": (b'--a\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--a--\r\n', "b"),
    "part-without-name": (b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n", "b"),
    "part-with-an-empty-name": (b'--b\r\nContent-Disposition: form-data; name=""\r\n\r\nx\r\n--b--\r\n', "b"),
    "part-name-not-utf8": (b'--b\r\nContent-Disposition: form-data; name="pr\xf6mpt"\r\n\r\nx\r\n--b--\r\n', "b"),
    "empty-boundary": (b'--\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n----\r\n', ""),
    "no-blank-line-after-part-headers": (b'--b\r\nContent-Disposition: form-data; name="a"\r\nv\r\n--b--\r\n', "b"),
    "too-many-fields": (
        b"".join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(40))
        + b"--b--\r\n",
        "b",
    ),
}


@pytest.mark.parametrize(("body", "boundary"), MALFORMED_MULTIPART.values(), ids=MALFORMED_MULTIPART.keys())
async def test_malformed_multipart_is_400(stack, http, body, boundary) -> None:
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with http.post(stack.gateway_url + "/api/v1/generate/image-to-video", data=body, headers=headers) as response:
        payload = await response.json()
    assert response.status == 400, payload
    assert payload["error"]["code"] == "bad_request" and "multipart" in payload["error"]["message"]


async def test_a_multipart_body_past_its_limits_is_refused_before_it_is_read(stack, http) -> None:
    """An upload and 32 fields of 64 KiB at most: a larger Content-Length is refused at once."""
    headers = {"Content-Type": "multipart/form-data; boundary=b"}

    async def endless():
        chunk = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\n' + b"x" * 60_000 + b"\r\n"
        for _ in range(2000):  # 120 MB if the gateway read it all
            yield chunk

    for path in ("/api/v1/generate/image-to-video", "/v1/videos"):
        big = {**headers, "Content-Length": str(200 * 2**20)}
        async with http.post(stack.gateway_url + path, data=endless(), headers=big) as response:
            payload = await response.json()
        assert response.status == 413, payload


async def test_body_must_be_an_object(stack, http) -> None:
    async with http.post(stack.gateway_url + URL, json=["prompt"]) as response:
        assert response.status == 422
        assert (await response.json())["error"]["details"][0]["field"] == "body"


async def test_wrong_content_type_is_415(stack, http) -> None:
    async with http.post(
        stack.gateway_url + URL, data="prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"}
    ) as response:
        assert response.status == 415
        assert (await response.json())["error"]["code"] == "unsupported_media_type"
    # A route that also takes uploads says so.
    async with http.post(
        stack.gateway_url + "/api/v1/generate/image-to-video", data="x", headers={"Content-Type": "text/plain"}
    ) as response:
        payload = await response.json()
    assert response.status == 415 and "multipart/form-data" in payload["error"]["message"], payload
    # No Content-Type at all is told as such (aiohttp would call it application/octet-stream).
    async with http.post(
        stack.gateway_url + URL, data=b'{"prompt": "x"}', skip_auto_headers=["Content-Type"]
    ) as response:
        payload = await response.json()
    assert response.status == 415 and "sent no Content-Type" in payload["error"]["message"], payload
    assert "octet-stream" not in payload["error"]["message"]


@pytest.mark.parametrize("charset", ["utf-16", "latin-1", "UTF8"])
async def test_a_json_charset_other_than_utf8_is_415(stack, http, charset) -> None:
    body = b'{"prompt": "x", "num_inference_steps": 1}'
    headers = {"Content-Type": f"application/json; charset={charset}"}
    async with http.post(stack.gateway_url + URL, data=body, headers=headers) as response:
        payload = await response.json()
    assert response.status == 415 and payload["error"]["code"] == "unsupported_media_type", payload
    assert "must be UTF-8" in payload["error"]["message"] and charset in payload["error"]["message"]
    async with http.post(stack.gateway_url + "/v1/videos", data=body, headers=headers) as response:
        assert response.status == 415, await response.text()
    # utf-8, in any case, is the one charset a JSON body may name.
    headers = {"Content-Type": "application/json; charset=UTF-8"}
    async with http.post(stack.gateway_url + URL, data=body, headers=headers) as response:
        assert response.status == 202, await response.text()


async def test_oversized_body_is_413(stack, http) -> None:
    gateway, _ = stack.start_gateway(
        "gateway-small-body", VIDEOGEN_MAX_BODY_BYTES="4096", VIDEOGEN_MAX_UPLOAD_BYTES="4096"
    )
    body = json.dumps({"prompt": "x" * 5000}).encode()
    async with http.post(gateway + URL, data=body, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "body_too_large"
    async with http.post(gateway + URL, json={"prompt": "fits"}) as response:
        assert response.status == 202
    # An upload past its limit names the field and the rule, sent as a file or as base64.
    image = b"\x89PNG" + bytes(5000)
    upload = gateway + "/api/v1/generate/image-to-video"
    as_form = form_with_file("image", "i.png", image, ("prompt", b"p"))
    sent = [
        http.post(upload, data=as_form, headers={"Content-Type": "multipart/form-data; boundary=b"}),
        http.post(upload, json={"prompt": "p", "image": base64.b64encode(image).decode()}),
    ]
    for request in sent:
        async with request as response:
            payload = await response.json()
        assert response.status == 413 and payload["error"]["code"] == "body_too_large", payload
        assert [(d["field"], d["rule"]) for d in payload["error"]["details"]] == [("image", "max_bytes")]


async def test_refused_requests_leave_no_job_behind(stack, http, s3_store) -> None:
    def job_records() -> set[str]:
        # Records only: a job accepted by an earlier test may meanwhile get its video uploaded.
        return {name for name in object_names(s3_store, "jobs/") if name.endswith("/job.json")}

    before = job_records()
    for body, *_ in CASES:
        async with http.post(stack.gateway_url + URL, json=body) as response:
            assert response.status == 422
    assert job_records() == before
    accepted = await (await http.post(stack.gateway_url + URL, json={"prompt": "counted"})).json()
    assert f"jobs/{accepted['job_id']}/job.json" in job_records()


async def test_unknown_route_and_method_are_json(stack, http) -> None:
    async with http.get(stack.gateway_url + "/api/v1/nothing-here") as response:
        assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
    async with http.get(stack.gateway_url + URL) as response:
        assert response.status == 405 and (await response.json())["error"]["code"] == "method_not_allowed"


def form(*parts: tuple[str, bytes]) -> bytes:
    body = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value + b"\r\n"
        for name, value in parts
    )
    return body + b"--b--\r\n"


def form_with_file(name: str, filename: str, data: bytes, *parts: tuple[str, bytes]) -> bytes:
    """A multipart body (boundary `b`) of text parts and one file part."""
    head = form(*parts).removesuffix(b"--b--\r\n")
    disposition = f'form-data; name="{name}"; filename="{filename}"'.encode()
    return head + b"--b\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n--b--\r\n"


FORM_CASES = {
    # (the parts, the field, the rule)
    "field-twice": ((("prompt", b"a"), ("prompt", b"b")), "prompt", "single_value"),
    "not-utf8": ((("prompt", b"\xff\xfe"),), "prompt", "utf8"),
    # Numbers are read as plain ASCII decimals, never fixed up.
    "integer-as-decimal": ((("prompt", b"p"), ("seed", b"7.0")), "seed", "int_type"),
    "integer-with-a-sign": ((("prompt", b"p"), ("seed", b"+7")), "seed", "int_type"),
    "integer-in-other-digits": ((("prompt", b"p"), ("seed", "\u0665".encode())), "seed", "int_type"),
    "integer-with-spaces": ((("prompt", b"p"), ("num_frames", b" 9")), "num_frames", "int_type"),
    "number-not-a-number": ((("prompt", b"p"), ("guidance_scale", b"nan")), "guidance_scale", "float_type"),
    "integer-past-python-digit-limit": ((("prompt", b"p"), ("seed", b"1" * 5000)), "seed", "int_type"),
    "number-without-a-leading-digit": ((("prompt", b"p"), ("guidance_scale", b".5")), "guidance_scale", "float_type"),
}


@pytest.mark.parametrize(("parts", "field", "rule"), FORM_CASES.values(), ids=FORM_CASES.keys())
async def test_form_fields_are_taken_as_sent_or_refused(stack, http, parts, field, rule) -> None:
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    url = stack.gateway_url + "/api/v1/generate/image-to-video"
    async with http.post(url, data=form(*parts), headers=headers) as response:
        payload = await response.json()
    assert response.status == 422, payload
    assert [(d["field"], d["rule"]) for d in payload["error"]["details"]] == [(field, rule)]


async def test_a_query_parameter_given_twice_is_refused(stack, http) -> None:
    async with http.get(stack.gateway_url + "/api/v1/jobs?limit=5&limit=6") as response:
        payload = await response.json()
    assert response.status == 422, payload
    assert [(d["field"], d["rule"]) for d in payload["error"]["details"]] == [("limit", "single_value")]


# Names other routes read, given twice and not in UTF-8: ignored where the route reads none.
FOREIGN_QUERY = "?limit=1&limit=2&status=%FF&since=1&since=2&cursor=a&cursor=b&model=a&model=b&job_id=%FF"


async def test_routes_ignore_query_parameters_they_do_not_read(stack, http) -> None:
    async with http.post(stack.gateway_url + URL + FOREIGN_QUERY, json={"prompt": "p"}) as response:
        job = await response.json()
    assert response.status == 202, job
    for path in [
        "/health",
        "/ready",
        "/openapi.json",
        "/metrics",
        "/",
        "/api/v1/models",
        f"/api/v1/jobs/{job['job_id']}",
    ]:
        async with http.get(stack.gateway_url + path + FOREIGN_QUERY) as response:
            assert response.status == 200, (path, await response.text())
    async with http.get(stack.gateway_url + "/v1/videos" + FOREIGN_QUERY.replace("limit", "variant")) as response:
        assert response.status == 200, await response.text()


# Every query parameter each route reads (`reads_query`): given twice, it is refused.
READ_QUERIES = [
    *(("/api/v1/jobs", name) for name in ("status", "model", "limit", "cursor")),
    ("/api/v1/model/info", "model"),
    *((stream, name) for stream in ("/api/v1/events", "/api/v1/ws") for name in ("all", "since", "access_token")),
    *(("/v1/videos", name) for name in ("limit", "order", "after")),
    ("/v1/videos/00000000-0000-4000-8000-000000000000/content", "variant"),
]


@pytest.mark.parametrize(("path", "name"), READ_QUERIES)
async def test_every_query_parameter_a_route_reads_is_refused_twice(stack, http, path, name) -> None:
    async with http.get(f"{stack.gateway_url}{path}?{name}=1&{name}=2") as response:
        payload = await response.json()
    if path.startswith("/v1/"):  # in OpenAI's shape
        assert (response.status, payload["error"]["param"]) == (400, name), payload
    else:
        assert response.status == 422, payload
        assert [(d["field"], d["rule"]) for d in payload["error"]["details"]] == [(name, "single_value")]


@pytest.mark.parametrize(
    "query",
    ["/api/v1/jobs?model=%ff", "/api/v1/model/info?model=%C3", "/api/v1/events?job_id=%ff", "/v1/videos?after=%ff"],
)
async def test_a_query_value_that_is_not_utf8_is_refused_not_replaced(stack, http, query) -> None:
    async with http.get(stack.gateway_url + query) as response:
        payload = await response.json()
    name = query.split("?")[1].split("=")[0]
    if query.startswith("/v1/"):  # in OpenAI's shape
        assert response.status == 400, payload
        assert (payload["error"]["param"], payload["error"]["code"]) == (name, "validation_error"), payload
    else:
        assert response.status == 422, payload
        assert [(d["field"], d["rule"]) for d in payload["error"]["details"]] == [(name, "utf8")]


async def test_an_unknown_model_is_named_with_the_known_ones_everywhere(stack, http) -> None:
    for method, path, body in [
        ("GET", "/api/v1/jobs?model=sora", None),
        ("GET", "/api/v1/model/info?model=sora", None),
        ("POST", "/api/v1/models/download", {"model": "sora"}),
        ("POST", "/api/v1/generate/text-to-video", {"prompt": "p", "model": "sora"}),
    ]:
        async with http.request(method, stack.gateway_url + path, json=body) as response:
            payload = await response.json()
        assert response.status in (404, 422), payload
        assert "unknown model 'sora'; known models: " in payload["error"]["message"], (path, payload)
        assert "ltx-tiny" in payload["error"]["message"]


async def test_static_file_errors_are_json(stack, http) -> None:
    async with http.get(stack.gateway_url + "/static/nope.js") as response:
        assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize("value", ["+5", " 5", "0_5", "\u0665", "5.0"])
async def test_query_integers_are_plain_ascii_digits(stack, http, value) -> None:
    async with http.get(stack.gateway_url + "/api/v1/jobs", params={"limit": value}) as response:
        payload = await response.json()
    assert response.status == 422 and payload["error"]["details"][0]["field"] == "limit", payload
    job = "33e8a532-5095-4c26-82cb-3ee7a8c59e49"
    async with http.get(stack.gateway_url + "/api/v1/events", params={"job_id": job, "since": value}) as response:
        assert response.status == 400 and (await response.json())["error"]["code"] == "bad_parameter"
    async with http.get(stack.gateway_url + "/v1/videos", params={"limit": value}) as response:
        assert response.status == 400 and (await response.json())["error"]["param"] == "limit"


@pytest.mark.parametrize(("field", "value"), [("seconds", "\u0665"), ("size", "\uff13\uff12x\uff13\uff12")])
async def test_openai_seconds_and_size_are_ascii(stack, http, field, value) -> None:
    async with http.post(stack.gateway_url + "/v1/videos", json={"prompt": "p", field: value}) as response:
        payload = await response.json()
    assert response.status == 400 and payload["error"]["param"] == field, payload


async def test_openai_size_takes_no_leading_zeros(stack, http) -> None:
    async with http.post(stack.gateway_url + "/v1/videos", json={"prompt": "p", "size": "0032x032"}) as response:
        payload = await response.json()
    assert response.status == 400 and payload["error"]["param"] == "size", payload


async def test_a_stream_with_all_other_than_true_is_refused_naming_all(stack, http) -> None:
    for path in ("/api/v1/ws", "/api/v1/events"):
        async with http.get(stack.gateway_url + path, params={"all": "maybe"}) as response:
            payload = await response.json()
        assert response.status == 400 and payload["error"]["code"] == "bad_parameter", payload
        assert payload["error"]["message"].startswith("all must be true") and "'maybe'" in payload["error"]["message"]


async def test_a_long_bad_value_is_not_echoed_whole(stack, http) -> None:
    job = "33e8a532-5095-4c26-82cb-3ee7a8c59e49"
    since = "9" * 5000 + "x"
    async with http.get(stack.gateway_url + "/api/v1/events", params={"job_id": job, "since": since}) as response:
        payload = await response.json()
    assert response.status == 400 and payload["error"]["code"] == "bad_parameter"
    assert len(payload["error"]["message"]) < 300 and "(5001 characters)" in payload["error"]["message"]
    long_key = "k" * 100_000
    async with http.post(stack.gateway_url + URL, json={"prompt": "x", long_key: 1}) as response:
        payload = await response.json()
    assert response.status == 422 and len(json.dumps(payload)) < 2000
    assert payload["error"]["details"][0]["field"].endswith("(100000 characters)")
    for path in ("/api/v1/model/info", "/api/v1/jobs", "/v1/videos/x"):
        params = {"model": "z" * 3000} if path != "/v1/videos/x" else None
        async with http.get(stack.gateway_url + path, params=params) as response:
            payload = await response.json()
        assert 400 <= response.status < 500 and len(json.dumps(payload)) < 2000, (path, len(json.dumps(payload)))


async def test_a_negative_since_is_refused(stack, http) -> None:
    url = f"{stack.gateway_url}/api/v1/events?job_id=33e8a532-5095-4c26-82cb-3ee7a8c59e49&since=-5"
    async with http.get(url) as response:
        payload = await response.json()
    assert response.status == 400 and payload["error"]["code"] == "bad_parameter", payload


async def test_a_position_naming_no_job_is_refused(stack, http) -> None:
    """`<job_id>:<seq>` must name the stream's job; an empty job part names none."""
    accepted = await submit(http, stack.gateway_url, {"prompt": "p", "num_inference_steps": 2})
    url = f"{stack.gateway_url}/api/v1/events?job_id={accepted['job_id']}"
    for headers, params in (({"Last-Event-ID": ":1"}, {}), ({}, {"since": ":1"})):
        async with http.get(url, headers=headers, params=params) as response:
            payload = await response.json()
        assert response.status == 400 and payload["error"]["code"] == "bad_parameter", payload
    async with http.get(url, params={"since": "1" * 5000}) as response:
        payload = await response.json()
    assert response.status == 400 and "integers of at most 4300 digits" in payload["error"]["message"], payload


async def test_an_idempotency_key_sent_twice_is_refused(stack, http) -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict([("Idempotency-Key", "twice-a"), ("Idempotency-Key", "twice-b")])
    async with http.post(stack.gateway_url + URL, json={"prompt": "x"}, headers=headers) as response:
        payload = await response.json()
    assert response.status == 400 and payload["error"]["code"] == "bad_header", payload
    assert "given 2 times" in payload["error"]["message"]


async def test_many_problems_are_named_up_to_twenty_then_counted(stack, http) -> None:
    """The answer does not grow with the body: 100 unknown keys, 20 named and 80 counted."""
    body = {"prompt": "x"} | {f"unknown{n}": 1 for n in range(100)}
    async with http.post(stack.gateway_url + URL, json=body) as response:
        payload = await response.json()
    assert response.status == 422 and len(payload["error"]["details"]) == 20, payload
    assert payload["error"]["message"].endswith("; and 80 more problems")
    async with http.post(stack.gateway_url + "/v1/videos", json=body) as response:
        payload = await response.json()
    assert response.status == 400 and payload["error"]["message"].endswith("; and 80 more problems"), payload


async def test_choices_are_stripped_like_other_strings(stack, http) -> None:
    accepted = await submit(
        http, stack.gateway_url, {"prompt": "x", "num_inference_steps": 2, "priority": " high\n", "tier": "standard "}
    )
    assert (accepted["request"]["priority"], accepted["request"]["tier"]) == ("high", "standard")


async def test_openai_errors_speak_of_openai_fields(stack, http) -> None:
    """Problems with our width, height or image are told as OpenAI's size and input_reference."""
    async with http.post(stack.gateway_url + "/v1/videos", json={"prompt": "p", "size": "33x32"}) as response:
        payload = await response.json()
    assert response.status == 400 and payload["error"]["param"] == "size", payload
    assert payload["error"]["message"].startswith("size: width must be a multiple of 32")
    gif = b"GIF89a" + bytes(64)
    parts = form_with_file("input_reference", "a.gif", gif, ("prompt", b"p"))
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    async with http.post(stack.gateway_url + "/v1/videos", data=parts, headers=headers) as response:
        payload = await response.json()
    assert response.status == 400 and payload["error"]["param"] == "input_reference", payload
    assert payload["error"]["message"].startswith("input_reference: ") and "image:" not in payload["error"]["message"]
    parts = form_with_file("input_reference", "empty.png", b"", ("prompt", b"p"))
    async with http.post(stack.gateway_url + "/v1/videos", data=parts, headers=headers) as response:
        payload = await response.json()
    assert response.status == 400 and payload["error"]["param"] == "input_reference", payload
    assert payload["error"]["message"] == "input_reference: the file is empty (0 bytes)"


async def test_a_plain_get_of_a_jobs_websocket_says_what_it_needs(stack, http) -> None:
    accepted = await submit(http, stack.gateway_url, {"prompt": "p", "num_inference_steps": 2})
    async with http.get(f"{stack.gateway_url}/api/v1/ws", params={"job_id": accepted["job_id"]}) as response:
        body = await response.json()
    assert response.status == 400 and body["error"]["code"] == "bad_request", body
    assert "WebSocket upgrade" in body["error"]["message"] and "/api/v1/events" in body["error"]["message"]


async def test_a_websocket_ignores_what_its_client_sends_up_to_64_kib(stack, http) -> None:
    """Frames up to 64 KiB are ignored (the stream goes on); a larger one closes it with 1009."""
    import asyncio

    import aiohttp

    async with http.ws_connect(f"{stack.gateway_url}/api/v1/ws", params={"all": "true"}) as ws:
        await ws.send_str("x" * 64 * 1024)
        accepted = await submit(http, stack.gateway_url, {"prompt": "after a big frame", "num_inference_steps": 2})

        async def ours() -> dict:  # the stream still runs (it also carries the key's other jobs)
            while (frame := await ws.receive_json())["job_id"] != accepted["job_id"]:
                pass
            return frame

        assert (await asyncio.wait_for(ours(), 60))["seq"] >= 0
        await ws.send_str("x" * (64 * 1024 + 1))

        async def closed() -> aiohttp.WSMessage:
            while (msg := await ws.receive()).type == aiohttp.WSMsgType.TEXT:
                pass
            return msg

        msg = await asyncio.wait_for(closed(), 30)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    assert ws.close_code == 1009, (msg, ws.close_code)


async def _expect_continue(
    gateway_url: str, path: str, body: bytes, length: int, content_type: str, version: str = "1.1", expect: str = ""
) -> tuple[list[str], bool]:
    """A raw POST with `Expect: 100-continue` (or `expect`) that sends its body only if invited:
    the status lines it got, in order, and whether the answer closes the connection
    (`Connection: close`)."""
    import asyncio
    from urllib.parse import urlsplit

    from tests.helpers import TOKENS

    url = urlsplit(gateway_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        head = (
            f"POST {path} HTTP/{version}\r\nHost: {url.netloc}\r\nAuthorization: Bearer {TOKENS['tester']}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {length}\r\nExpect: {expect or '100-continue'}\r\n\r\n"
        )
        writer.write(head.encode())
        if version == "1.0":
            writer.write(body)
        await writer.drain()
        first = (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
        lines = [first]
        if first.endswith("100 Continue"):
            await reader.readline()  # the blank line after it
            writer.write(body)
            await writer.drain()
            lines.append((await asyncio.wait_for(reader.readline(), 30)).decode().strip())
        headers = []
        while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
            headers.append(line.decode().strip().lower())
        return lines, "connection: close" in headers
    finally:
        writer.close()


async def test_a_body_refused_on_its_headers_is_not_invited_with_100_continue(stack) -> None:
    body = json.dumps({"prompt": "invited"}).encode()
    ok, _ = await _expect_continue(stack.gateway_url, URL, body, len(body), "application/json")
    assert ok == ["HTTP/1.1 100 Continue", "HTTP/1.1 202 Accepted"], ok
    huge = 10**9  # over every limit: refused by its Content-Length alone
    for path, content_type in [
        (URL, "application/json"),
        ("/api/v1/generate/image-to-video", "multipart/form-data; boundary=b"),
        ("/v1/videos", "application/json"),
        ("/api/v1/models/download", "application/json"),
    ]:
        lines, closed = await _expect_continue(stack.gateway_url, path, b"", huge, content_type)
        assert lines[0].startswith("HTTP/1.1 413") and closed, (path, lines)
    # Refused for its type: answered at once, closing the connection, since the client may never
    # send the body it was not invited to send (nor may it send another request on it).
    lines, closed = await _expect_continue(stack.gateway_url, URL, body, len(body), "text/plain")
    assert lines[0].startswith("HTTP/1.1 415") and closed, lines
    # HTTP/1.0 knows no Expect: the header is ignored, the body read as sent.
    lines, _ = await _expect_continue(stack.gateway_url, URL, body, len(body), "application/json", "1.0", "odd")
    assert lines == ["HTTP/1.0 202 Accepted"], lines
