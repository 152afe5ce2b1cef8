"""Ports chosen ahead of their listener come from outside the kernel's ephemeral range, where
no outgoing connection can take them before the listener binds (``services/mesh/ports.py``)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from services.mesh import ports


def test_the_range_is_read_from_the_kernel_or_defaults(tmp_path: Path) -> None:
    source = tmp_path / "range"
    source.write_text("40000\t50000\n")
    assert ports.ephemeral_range(source) == (40000, 50000)
    for garbage in ("", "40000", "a b", "50000 40000", "0 70000"):
        source.write_text(garbage)
        assert ports.ephemeral_range(source) == (32768, 60999), garbage
    assert ports.ephemeral_range(tmp_path / "absent") == (32768, 60999)


def test_candidates_are_the_larger_stretch_outside_the_ephemeral_range() -> None:
    assert ports.candidates((32768, 60999)) == range(10_000, 32768)
    assert ports.candidates((12000, 30000)) == range(30001, 65536)
    assert len(ports.candidates((1024, 65535))) == 0


def test_a_chosen_port_is_free_and_outside_the_ephemeral_range() -> None:
    low, high = ports.ephemeral_range()
    chosen = {ports.free_port() for _ in range(20)}
    if ports.candidates((low, high)):
        assert all(not low <= port <= high for port in chosen), chosen
    assert len(chosen) > 1  # random, so that concurrent pickers rarely meet
    for port in chosen:
        assert ports.port_free(port)


def test_a_bound_port_is_not_free() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        assert not ports.port_free(taken)
        # With no room outside the ephemeral range, the kernel picks: still a free port.
        port = ports.free_port(ephemeral=(1024, 65535))
        assert port != taken and ports.port_free(port)


def test_ports_already_handed_out_are_not_handed_out_again() -> None:
    """Three cluster routes or a dozen metrics ports are picked before any is bound."""
    low, high = ports.ephemeral_range()
    room = ports.candidates((low, high))
    if not room:
        pytest.skip("no room outside the ephemeral range on this machine")
    taken = set(room[::2])
    for _ in range(20):
        port = ports.free_port(ephemeral=(low, high), avoid=taken)
        assert port not in taken and port in room
