"""What the processes say when a service they need at start does not answer (not a traceback)."""

from __future__ import annotations

import pytest

from common.settings import WorkerSettings
from common.topology import BrokerUnreachable, connect


async def test_an_unreachable_broker_is_named_without_its_password_and_is_no_oserror() -> None:
    with pytest.raises(BrokerUnreachable) as raised:
        await connect("amqp://guest:s3cret@127.0.0.1:1/", timeout=0)
    message = str(raised.value)
    assert message.startswith("RabbitMQ at amqp://guest:***@127.0.0.1:1/ did not take a connection within 0 s (")
    assert "s3cret" not in message
    assert not isinstance(raised.value, OSError)  # the gateway reads an OSError as a port it cannot listen on


def test_the_gateway_says_the_broker_did_not_answer_not_that_it_cannot_listen(monkeypatch, capsys) -> None:
    import gateway.main

    def run_app(*_args, **_kwargs) -> None:  # as aiohttp's, when the broker's start-up context raises
        raise BrokerUnreachable("RabbitMQ at amqp://guest:***@127.0.0.1:1/ did not take a connection within 30 s (x)")

    monkeypatch.setenv("VIDEOGEN_AUTH_DISABLED", "true")
    monkeypatch.setattr("sys.argv", ["videogen-gateway"])  # not pytest's arguments
    monkeypatch.setattr(gateway.main.web, "run_app", run_app)
    monkeypatch.setattr(gateway.main, "configure_logging", lambda *_: None)  # the tests' logging stays
    with pytest.raises(SystemExit) as exited:
        gateway.main.main()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert (
        err == "videogen-gateway: RabbitMQ at amqp://guest:***@127.0.0.1:1/ did not take a connection within 30 s (x)\n"
    )


class _Store:
    def __init__(self, failures: int) -> None:
        self.failures = failures

    async def ensure_bucket(self) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionRefusedError("connection refused")


async def test_a_worker_waits_for_the_store_then_gives_up_naming_it() -> None:
    from worker.main import _bucket_checked

    settings = WorkerSettings(s3_endpoint="127.0.0.1:1")
    store = _Store(failures=2)
    await _bucket_checked(store, settings, patience_s=60, pause_s=0)  # answers on the third try
    assert store.failures == 0
    with pytest.raises(SystemExit) as exited:
        await _bucket_checked(_Store(failures=10**6), settings, patience_s=0, pause_s=0)
    assert str(exited.value.code).startswith("the object store at 127.0.0.1:1 did not let the bucket be checked")
