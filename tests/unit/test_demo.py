"""`scripts/demo`'s options: nothing starts before they are read, and the API key's sources."""

from __future__ import annotations

import pytest

from scripts import demo


@pytest.fixture
def ups(monkeypatch) -> list[list[str]]:
    """The `scripts/stack up` commands the demo runs (each answered as a failure: the demo stops there)."""
    ran: list[list[str]] = []

    def run(command):
        ran.append(command[1:])
        return 1

    monkeypatch.setattr(demo, "run_to_its_end", run)
    return ran


def test_help_starts_nothing(ups, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        demo.main(["--help"])
    assert done.value.code == 0 and "--port-offset" in capsys.readouterr().out
    assert ups == []


def test_the_stack_is_brought_up_with_the_options_given(ups) -> None:
    assert demo.main(["--port-offset", "500", "--namespace", "st1", "a prompt"]) == 1
    assert ups == [[str(demo.ROOT / "scripts" / "devstack.py"), "up", "--port-offset", "500", "--namespace", "st1"]]


def test_another_gateway_is_used_as_it_is(ups, tmp_path, capsys) -> None:
    key = tmp_path / "key"
    key.write_text("a-token\n")
    assert demo.main(["--gateway", "http://127.0.0.1:1", "--api-key-file", str(key)]) == 1
    assert ups == []
    [line] = capsys.readouterr().err.strip().splitlines()  # one line, no traceback
    assert line.startswith("cannot reach the gateway at http://127.0.0.1:1")
    with pytest.raises(SystemExit):
        demo.main(["--gateway", "http://127.0.0.1:1", "--namespace", "st1"])


def test_a_key_file_asked_for_wins_over_the_environment(monkeypatch, tmp_path) -> None:
    key = tmp_path / "key"
    key.write_text("from-the-file\n")
    monkeypatch.setattr(demo, "DEFAULT_KEY_FILE", tmp_path / "stack-key")
    monkeypatch.setenv("VIDEOGEN_API_KEY", "from-the-environment")
    assert demo.api_key(key) == ("from-the-file", str(key))
    assert demo.api_key(None) == ("from-the-environment", "VIDEOGEN_API_KEY")
    monkeypatch.delenv("VIDEOGEN_API_KEY")
    assert demo.api_key(None) == (None, str(tmp_path / "stack-key"))
    (tmp_path / "stack-key").write_text("from-the-stack\n")
    assert demo.api_key(None) == ("from-the-stack", str(tmp_path / "stack-key"))
    with pytest.raises(SystemExit, match="no API key file at"):
        demo.api_key(tmp_path / "missing")


def test_ctrl_c_lets_scripts_stack_up_finish_stopping_what_it_started(monkeypatch) -> None:
    """The interrupt reaches `up` too; the demo waits for it to stop what it was starting (however
    many times Ctrl-C comes) instead of killing it half way, and ends with its status."""

    class Up:
        def __init__(self, command, cwd):
            self.interrupts = 2

        def wait(self):
            if self.interrupts:
                self.interrupts -= 1
                raise KeyboardInterrupt
            return 130

    monkeypatch.setattr(demo.subprocess, "Popen", Up)
    assert demo.run_to_its_end(["up"]) == 130


def test_a_missing_key_file_is_said_before_anything_starts(ups, tmp_path) -> None:
    with pytest.raises(SystemExit, match="no API key file at"):
        demo.main(["--api-key-file", str(tmp_path / "missing")])
    assert ups == []
