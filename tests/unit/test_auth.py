"""API key files and the per-key rate limiter."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import Keys, hash_token, load_keys, main, new_token


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_a_key_file_is_read_and_tokens_are_found_by_hash(tmp_path: Path) -> None:
    token = new_token()
    path = write(tmp_path, f'[[keys]]\nid = "alice"\nsha256 = "{hash_token(token)}"\nmax_concurrent_jobs = 3\n')
    keys = Keys(load_keys(path), "10/second", 8)
    key = keys.find(token)
    assert key is not None and key.id == "alice" and keys.quota(key) == 3
    assert keys.find(token + "x") is None
    assert token not in path.read_text()


def test_a_key_may_have_no_job_quota(tmp_path: Path) -> None:
    token = new_token()
    path = write(tmp_path, f'[[keys]]\nid = "svc"\nsha256 = "{hash_token(token)}"\nmax_concurrent_jobs = "unlimited"\n')
    keys = Keys(load_keys(path), "10/second", 8)
    key = keys.find(token)
    assert key is not None and keys.quota(key) is None


@pytest.mark.parametrize(
    "entry, complaint",
    [
        ('id = "alice"\nsha256 = "' + "0" * 64 + '"\nmax_concurrent_jobs = 0', "max_concurrent_jobs"),
        ('id = "alice"\nsha256 = "' + "0" * 64 + '"\nmax_concurrent_jobs = "lots"', "max_concurrent_jobs"),
        # No silent coercion: a boolean or a number in a string is not a quota.
        ('id = "alice"\nsha256 = "' + "0" * 64 + '"\nmax_concurrent_jobs = true', "max_concurrent_jobs"),
        ('id = "alice"\nsha256 = "' + "0" * 64 + '"\nmax_concurrent_jobs = "8"', "max_concurrent_jobs"),
        ('id = "alice"\nsha256 = "' + "0" * 64 + '"\nadmin = "yes"', "admin"),
        # limits would keep only the first of several rates; a rate of 0 refuses every request.
        ('id = "alice"\nsha256 = "' + "0" * 64 + '"\nrate_limit = "20/second;100/minute"', "not several"),
        ('id = "alice"\nsha256 = "' + "0" * 64 + '"\nrate_limit = "0/second"', "at least 1 request"),
        ('id = "alice"\nsha256 = "abc"', "sha256"),
        ('id = "Alice!"\nsha256 = "' + "0" * 64 + '"', "id"),
        ('id = "alice"\nsha256 = "' + "0" * 64 + '"\nrate_limit = "fast"', "rate_limit"),
        ('id = "alice"\nsha256 = "' + "0" * 64 + '"\ncolour = "red"', "colour"),
    ],
)
def test_a_wrong_key_file_names_the_problem(tmp_path: Path, entry: str, complaint: str) -> None:
    with pytest.raises(ValueError) as error:
        load_keys(write(tmp_path, f"[[keys]]\n{entry}\n"))
    assert complaint in str(error.value) and "keys.toml" in str(error.value)


def test_a_wrong_entry_is_named_by_its_place_and_id_one_line_per_problem(tmp_path: Path) -> None:
    good = 'id = "bob"\nsha256 = "' + "0" * 64 + '"\n'
    bad = 'id = "lim"\nsha256 = "' + "1" * 64 + '"\nmax_concurrent_jobs = 0\n'
    with pytest.raises(ValueError) as error:
        load_keys(write(tmp_path, f"[[keys]]\n{good}\n[[keys]]\n{bad}"))
    assert str(error.value).endswith(
        """[[keys]] 2 ('lim'): max_concurrent_jobs: must be a whole number of at least 1, or "unlimited" (got 0)"""
    )


def test_key_ids_and_token_hashes_are_unique(tmp_path: Path) -> None:
    entry = '[[keys]]\nid = "alice"\nsha256 = "' + "0" * 64 + '"\n'
    with pytest.raises(ValueError) as error:
        load_keys(write(tmp_path, entry + entry.replace("0" * 64, "1" * 64)))
    assert str(error.value).endswith("[[keys]] 2 ('alice'): the id 'alice' is also entry 1's; each key needs its own")
    # One token for two keys: the one looked up last would shadow the other (an admin, here).
    second = '[[keys]]\nid = "root"\nadmin = true\nsha256 = "' + "0" * 64 + '"\n'
    with pytest.raises(ValueError) as error:
        load_keys(write(tmp_path, entry + second))
    assert "[[keys]] 2 ('root'): the token hash of 'root' is also entry 1's" in str(error.value)


async def test_the_rate_limit_counts_per_key(tmp_path: Path) -> None:
    a, b = new_token(), new_token()
    path = write(
        tmp_path,
        f'[[keys]]\nid = "a"\nsha256 = "{hash_token(a)}"\nrate_limit = "3/minute"\n'
        f'[[keys]]\nid = "b"\nsha256 = "{hash_token(b)}"\n',
    )
    keys = Keys(load_keys(path), "100/second", 8)
    key_a, key_b = keys.find(a), keys.find(b)
    assert [await keys.retry_after(key_a) for _ in range(3)] == [None] * 3
    wait = await keys.retry_after(key_a)
    assert wait is not None and 1 <= wait <= 60
    assert await keys.retry_after(key_b) is None


def test_new_prints_a_token_and_its_entry(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["new", "ci-bot"]) == 0
    captured = capsys.readouterr()
    token = captured.err.split("stored nowhere): ")[1].split()[0]
    assert token not in captured.out
    keys = Keys(load_keys(write(tmp_path, captured.out)), "1/second", 1)
    assert keys.find(token).id == "ci-bot"
    assert main(["new", "Not Valid"]) == 2


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"Authorization: Bearer \xe9\xff", "unknown API key"),  # not UTF-8: hashed as sent, matches no key
        (b"Authorization: Basic YWxpY2U6cHc=", "the Authorization header must be `Bearer <key>`"),
        (b"X-Nothing: 1", "no API key: send `Authorization: Bearer <key>`"),
    ],
)
async def test_a_bad_authorization_header_is_401_naming_the_problem(tmp_path: Path, raw: bytes, reason: str) -> None:
    import asyncio
    import json

    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from gateway.auth import auth_middleware
    from gateway.errors import error_middleware

    path = write(tmp_path, f'[[keys]]\nid = "alice"\nsha256 = "{hash_token(new_token())}"\n')
    app = web.Application(middlewares=[error_middleware, auth_middleware(Keys(load_keys(path), "10/second", 8))])
    app.router.add_get("/api/v1/models", lambda request: web.json_response({}))
    async with TestServer(app) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        # Raw bytes: an HTTP client library would not send a header that is not UTF-8.
        writer.write(b"GET /api/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + raw + b"\r\n\r\n")
        answer = await reader.read()
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), answer
    assert json.loads(body)["error"] == {"code": "unauthorized", "message": reason}
