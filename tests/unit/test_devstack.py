"""`scripts/stack`: its ports and broker namespace (StackState.configure), what it records of the
processes it starts and how `up` and `down` use that, its messages, its lock and its state file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scripts import devstack
from scripts.devstack import MAX_PORT_OFFSET, STACK_GATEWAY_PORT, STACK_S3_PORT, StackState


def test_defaults_then_what_up_was_given() -> None:
    state = StackState()
    state.configure(None, None)
    assert (state.port(STACK_S3_PORT), state.gateway_url, state.namespace) == (
        9000,
        "http://127.0.0.1:8080",
        "videogen",
    )
    state.configure(100, "second")
    assert (state.port(STACK_S3_PORT), state.port(STACK_GATEWAY_PORT), state.namespace) == (9100, 8180, "second")


def test_a_running_stack_keeps_its_ports_namespace_and_broker() -> None:
    running = {"gateway": devstack.process_identity(os.getpid())}
    url = "amqp://guest:guest@127.0.0.1:5999/"
    state = StackState(started=running, port_offset=100, namespace="second", amqp_url=url)
    state.configure(None, None)  # `scripts/demo` runs `up` without options
    assert (state.port_offset, state.namespace, state.amqp_url) == (100, "second", url)
    state.configure(None, None, url)
    with pytest.raises(SystemExit, match="run scripts/stack down before changing them"):
        state.configure(0, None)
    with pytest.raises(SystemExit, match="down before"):
        state.configure(None, "third")
    with pytest.raises(SystemExit, match="broker amqp://guest:\\*\\*\\*@127.0.0.1:5999/"):
        state.configure(None, None, "amqp://guest:guest@127.0.0.1:5672/")


def test_a_stopped_stack_starts_again_where_it_was_unless_told_otherwise() -> None:
    """A clone set up beside another stack stays beside it: after `down`, a plain `up` (or
    `scripts/demo`) must not join the default ports and namespace."""
    state = StackState(port_offset=100, namespace="second")  # everything stopped
    state.configure(None, None)
    assert (state.port_offset, state.namespace) == (100, "second")
    state.configure(0, "videogen")
    assert (state.port_offset, state.namespace) == (0, "videogen")


@pytest.mark.parametrize(
    ("offset", "namespace", "message"),
    [
        (-1, None, "--port-offset must be 0 or more"),
        (MAX_PORT_OFFSET + 1, None, "puts an internal port of the S3 store on 65536, past 65535: the largest"),
        (5, None, "puts an internal port of the S3 store on port 19005, which a stack without an offset uses"),
        (918, None, "puts worker-wan's health port on port 9000, which a stack without an offset uses for the S3"),
        (920, None, "puts the gateway on port 9000"),
        (10000, None, "puts the S3 store on port 19000, which a stack without an offset uses for an internal"),
        (10009, None, "puts the S3 store on port 19009"),
        (10929, None, "puts the gateway on port 19009"),
        (10918, None, "puts worker-wan's health port on port 19000"),
        (0, "two words", "--namespace may hold only letters"),
    ],
)
def test_bad_options_are_refused(offset, namespace, message) -> None:
    with pytest.raises(SystemExit, match=message):
        StackState().configure(offset, namespace)


@pytest.mark.parametrize("offset", [10, 917, 921, 9999, 10010, 10917, 10930, MAX_PORT_OFFSET])
def test_offsets_clear_of_the_default_stack_are_taken(offset) -> None:
    state = StackState()
    state.configure(offset, None)
    assert state.port_offset == offset


# --- what `up` records of a process, and what `down` and `status` make of it ------------------


@pytest.fixture
def sleeper() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start processes that sleep (with extra arguments, to look like another command); killed after the test."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        cmd = [sys.executable, "-c", "import time; time.sleep(120)", *args] if args else ["sleep", "120"]
        procs.append(subprocess.Popen(cmd, cwd=devstack.ROOT))
        # Just after the start, /proc/<pid>/cmdline can read empty here for a while: wait until
        # it shows the command, as it does for the long-running processes the stack records.
        deadline = time.monotonic() + 10
        while devstack.process_cmdline(procs[-1].pid) != cmd:
            assert time.monotonic() < deadline, f"the command line of {cmd} never showed"
            time.sleep(0.01)
        return procs[-1]

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(devstack, "STATE_DIR", tmp_path)
    monkeypatch.setenv("VIDEOGEN_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")  # nothing listens there
    return tmp_path


def test_a_process_is_known_by_its_start_time_and_boot() -> None:
    me = devstack.process_identity(os.getpid())
    assert devstack._alive(me, "gateway")
    assert not devstack._alive(dict(me, start=me["start"] + 1), "gateway")  # type: ignore[operator]
    assert not devstack._alive(dict(me, boot="another-boot"), "gateway")


def test_down_stops_its_processes_and_leaves_a_reused_pid_alone(state_dir, sleeper, capsys) -> None:
    ours, other = sleeper(), sleeper()
    reused = dict(devstack.process_identity(other.pid), start=devstack.process_start(other.pid) - 1)  # type: ignore[operator]
    StackState(started={"gateway": devstack.process_identity(ours.pid), "worker-ltx": reused}).save()
    assert devstack.stack_down() == 0
    assert devstack.process_start(ours.pid) is None  # stopped and reaped
    assert other.poll() is None, "a process that got a recorded pid later was signalled"
    assert StackState.load().started == {}
    assert f"worker-ltx: pid {other.pid} is now another process; left alone" in capsys.readouterr().out


def test_entries_of_older_versions_count_only_if_the_command_is_ours(state_dir, sleeper, capsys) -> None:
    """An entry without a start time: its process is stopped only if it runs the part's command
    from this checkout."""
    gateway, worker, unrelated = sleeper("-m", "gateway.main"), sleeper("-m", "worker.main"), sleeper()
    started = {"gateway": {"pid": gateway.pid}, "worker": {"pid": worker.pid}, "s3": {"pid": unrelated.pid}}
    StackState(started=started).save()
    assert not devstack._alive({"pid": unrelated.pid}, "s3")
    assert not devstack._alive({"pid": gateway.pid}, "worker-ltx")
    assert devstack.stack_down() == 0
    assert [devstack.process_start(p.pid) for p in (gateway, worker)] == [None, None]
    assert unrelated.poll() is None
    assert f"s3: pid {unrelated.pid} is now another process; left alone" in capsys.readouterr().out


def test_down_stops_the_workers_at_once_before_the_gateway(state_dir, sleeper, monkeypatch) -> None:
    calls = []
    real = devstack.stop_pids
    monkeypatch.setattr(devstack, "stop_pids", lambda pids, *args: calls.append(sorted(pids)) or real(pids, *args))
    procs = {name: sleeper() for name in ("worker-ltx", "worker-wan", "gateway")}
    StackState(started={name: devstack.process_identity(p.pid) for name, p in procs.items()}).save()
    assert devstack.stack_down() == 0
    workers = sorted([procs["worker-ltx"].pid, procs["worker-wan"].pid])
    assert calls == [workers, [procs["gateway"].pid]]
    assert devstack.STACK_WORKER_GRACE_S < devstack.STOP_TIMEOUT_S


def test_status_says_when_its_process_runs_but_does_not_answer(state_dir, sleeper, monkeypatch, capsys) -> None:
    gateway = sleeper()
    StackState(started={"gateway": devstack.process_identity(gateway.pid)}).save()
    for check in ("bucket_ready", "amqp_answers"):
        monkeypatch.setattr(devstack, check, lambda *_: False)
    monkeypatch.setattr(devstack, "readiness", lambda *_: (False, None))
    assert devstack.stack_status() == 1
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert f"its process {gateway.pid} (started by scripts/stack) runs but does not answer" in lines["gateway"]
    assert str(state_dir / "logs" / "gateway.log") in lines["gateway"]
    assert lines["worker-ltx"].endswith("(-)")


def test_status_tells_a_part_that_answers_but_is_not_ready_from_a_hung_one(
    state_dir, sleeper, monkeypatch, capsys
) -> None:
    """A gateway whose store is away answers /ready with 503 and says why: it is up, not hung."""
    import http.server
    import threading

    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b'{"status": "unavailable", "broker": "ok", "store": "unreachable"}'
            self.send_response(503 if self.path == "/ready" else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gateway = sleeper()
        state = StackState(started={"gateway": devstack.process_identity(gateway.pid)})
        state.save()
        for check in ("bucket_ready", "amqp_answers"):
            monkeypatch.setattr(devstack, check, lambda *_: True)
        monkeypatch.setattr(StackState, "gateway_url", f"http://127.0.0.1:{server.server_port}")
        assert devstack.stack_status() == 1
    finally:
        server.shutdown()
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["gateway"].split()[1] == "unready", lines["gateway"]
    assert (
        'answers but is not ready: /ready 503 {"status": "unavailable", "broker": "ok", "store": "unreachable"}'
        in (lines["gateway"])
    )
    assert "does not answer" not in lines["gateway"]


# --- `up` records what it starts before waiting for it ------------------------------------------


@pytest.fixture
def fake_up(state_dir, monkeypatch) -> dict[str, list]:
    """`up` with the store and broker answering, nothing else, and every process it spawns a
    sleeping one (or the command in `commands[name]`, by log name); what it spawned is in "spawned"."""
    seen: dict[str, list] = {"spawned": [], "commands": {}}
    for check, answer in (("bucket_ready", True), ("amqp_answers", True), ("http_ok", False)):
        monkeypatch.setattr(devstack, check, lambda *_, answer=answer: answer)
    monkeypatch.setattr(devstack, "build_tiny_models", lambda _: None)
    monkeypatch.setattr(devstack, "_port_free", lambda _: True)
    real_spawn = devstack.spawn

    def spawn(cmd, env, log):
        proc = real_spawn(seen["commands"].get(log.stem, ["sleep", "120"]), env, log)
        seen["spawned"].append((log.stem, env, proc))
        return proc

    monkeypatch.setattr(devstack, "spawn", spawn)
    yield seen
    for _, _, proc in seen["spawned"]:
        proc.kill()
        proc.wait()


def run_main(monkeypatch, *args: str) -> int:
    monkeypatch.setattr("sys.argv", ["scripts/stack", *args])
    return devstack.main()


def test_up_records_each_process_before_waiting_and_gives_workers_a_short_grace(fake_up, monkeypatch, capsys) -> None:
    recorded = []

    def wait_until(check, timeout, what, proc=None, log=None, log_offset=0):
        recorded.append((what, StackState.load().started[what]["pid"], proc.pid))

    monkeypatch.setattr(devstack, "wait_until", wait_until)
    assert run_main(monkeypatch, "up", "--port-offset", "800", "--namespace", "unit") == 0
    assert [(what, pid) for what, pid, _ in recorded] == [(what, pid) for what, _, pid in recorded]
    assert [what for what, _, _ in recorded] == ["gateway", "worker-ltx", "worker-wan"]
    state = StackState.load()
    assert state.amqp_url == "amqp://guest:guest@127.0.0.1:1/" and state.namespace == "unit"
    for name, env, proc in fake_up["spawned"]:
        assert state.started[name] == devstack.process_identity(proc.pid)
        if name.startswith("worker"):
            assert float(env["VIDEOGEN_SHUTDOWN_GRACE_S"]) < devstack.STOP_TIMEOUT_S


def test_an_interrupted_up_stops_the_part_it_was_starting(fake_up, monkeypatch, capsys) -> None:
    def wait_until(check, timeout, what, proc=None, log=None, log_offset=0):
        assert StackState.load().started["gateway"]["pid"] == proc.pid  # recorded before the wait
        raise KeyboardInterrupt  # Ctrl-C while the gateway starts

    monkeypatch.setattr(devstack, "wait_until", wait_until)
    assert run_main(monkeypatch, "up", "--port-offset", "800", "--namespace", "unit") == 130
    [(name, _, proc)] = fake_up["spawned"]
    assert name == "gateway" and proc.poll() is not None, "the gateway that was starting still runs"
    assert "gateway" not in StackState.load().started
    err = capsys.readouterr().err
    assert "gateway: interrupted while starting; what had started is stopped" in err
    assert "Traceback" not in err


def test_a_part_that_fails_to_start_is_named_in_one_line(fake_up, state_dir, monkeypatch, capsys) -> None:
    """One line: the part, its exit status, the last line its log got from this start (not from an
    earlier one) and the log's path; no traceback."""
    log = state_dir / "logs" / "gateway.log"
    log.parent.mkdir()
    log.write_text("a line from an earlier start\n")
    message = "videogen-gateway: cannot listen on 127.0.0.1:8880: [Errno 98] address already in use"
    fake_up["commands"]["gateway"] = ["sh", "-c", f"echo starting; echo '{message}'; exit 1"]
    assert run_main(monkeypatch, "up", "--port-offset", "800", "--namespace", "unit") == 1
    err = capsys.readouterr().err
    assert err == (f"scripts/stack up: gateway: process exited with 1; its log's last line: {message} (log: {log})\n")
    assert "gateway" not in StackState.load().started


def test_wait_until_shows_only_what_this_start_logged(tmp_path) -> None:
    log = tmp_path / "part.log"
    log.write_text("old\n")
    offset = log.stat().st_size
    proc = devstack.spawn(["sh", "-c", "echo new; exit 3"], dict(os.environ), log)
    with pytest.raises(devstack.StartFailed) as failed:
        devstack.wait_until(lambda: False, 30, "part", proc, log, offset)
    assert failed.value.lines == ["new"] and str(failed.value) == "part: process exited with 3\nnew"


def test_a_process_not_ready_in_time_is_stopped(tmp_path) -> None:
    spawned = []
    with pytest.raises(devstack.StartTimedOut) as failed:
        devstack.launch(
            ["sleep", "120"], dict(os.environ), tmp_path / "part.log", lambda: False, 0.2, "part", spawned.append
        )
    assert failed.value.summary() == f"part: not ready after 0s (its process is stopped) (log: {tmp_path / 'part.log'})"
    assert devstack.process_start(spawned[0].pid) is None


def test_up_says_which_port_is_taken_and_by_whom(state_dir) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(devstack.StackError) as taken:
            devstack.check_ports_free({port: "the gateway"})
    assert f"port {port} (the gateway) is taken by pid {os.getpid()} (" in str(taken.value)


# --- the broker it recorded -------------------------------------------------------------------


def test_status_and_down_use_the_recorded_broker(state_dir, monkeypatch, capsys) -> None:
    recorded = "amqp://guest:guest@127.0.0.1:2/"
    StackState(amqp_url=recorded).save()
    monkeypatch.delenv("VIDEOGEN_AMQP_URL")
    devstack.stack_status()
    out, err = capsys.readouterr()
    assert "rabbitmq     down   amqp://guest:***@127.0.0.1:2/" in out and err == ""
    monkeypatch.setenv("VIDEOGEN_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")
    assert devstack.stack_down(True) == 1
    err = capsys.readouterr().err
    assert "VIDEOGEN_AMQP_URL (amqp://guest:***@127.0.0.1:1/) is not the broker this stack was started with" in err
    assert "RabbitMQ does not answer at amqp://guest:***@127.0.0.1:2/" in err


# --- one `up` or `down` at a time; the state file -----------------------------------------------


def test_a_second_up_or_down_waits_for_the_first(state_dir) -> None:
    waiting, acquired = threading.Event(), threading.Event()

    def second() -> None:
        with devstack.stack_lock(waiting.set):
            acquired.set()

    with devstack.stack_lock():
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(30)
        assert not acquired.is_set()
    assert acquired.wait(30)
    thread.join(30)


@pytest.mark.parametrize(
    "content",
    [
        "",
        '{"started": {"gateway": ',
        "[]",
        "{}",
        '{"started": 3}',
        '{"started": []}',
        '{"started": {}, "port_offset": "700"}',
    ],
)
def test_a_broken_state_file_is_explained_in_one_line(state_dir, monkeypatch, content) -> None:
    (state_dir / "state.json").write_text(content)
    with pytest.raises(SystemExit) as failed:
        run_main(monkeypatch, "status")
    message = str(failed.value.code)
    assert f"{state_dir / 'state.json'} cannot be read" in message and "then delete the file" in message
    assert "\n" not in message


def test_the_state_file_is_replaced_whole(state_dir, monkeypatch) -> None:
    StackState(namespace="first").save()
    assert oct((state_dir / "state.json").stat().st_mode & 0o777) == "0o600"

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        StackState(namespace="second").save()
    assert json.loads((state_dir / "state.json").read_text())["namespace"] == "first"
    assert sorted(p.name for p in state_dir.iterdir()) == ["state.json"]
