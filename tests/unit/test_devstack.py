"""`scripts/stack up`'s ports and broker namespace (StackState.configure)."""

from __future__ import annotations

import pytest

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


def test_a_running_stack_keeps_its_ports_and_namespace() -> None:
    state = StackState(started={"gateway": {"pid": 1}}, port_offset=100, namespace="second")
    state.configure(None, None)  # `scripts/demo` runs `up` without options
    assert (state.port_offset, state.namespace) == (100, "second")
    with pytest.raises(SystemExit, match="run scripts/stack down before changing them"):
        state.configure(0, None)
    with pytest.raises(SystemExit, match="down before"):
        state.configure(None, "third")


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
        (-1, None, "--port-offset must be 0, or from 10 to"),
        (MAX_PORT_OFFSET + 1, None, "--port-offset must be 0, or from 10 to"),
        (5, None, "overlaps the ports of a stack without an offset"),
        (0, "two words", "--namespace may hold only letters"),
    ],
)
def test_bad_options_are_refused(offset, namespace, message) -> None:
    with pytest.raises(SystemExit, match=message):
        StackState().configure(offset, namespace)
