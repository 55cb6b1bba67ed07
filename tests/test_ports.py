"""The ports the tests' and the local stack's servers get: never one another process holds, never one any
process on this machine claimed recently (a killed broker gets its port back), and a server counts as
started only once its own process listens."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest

from edgefleet import ports
from edgefleet.broker import Broker
from edgefleet.ports import PORTS_ENV, free_port, port_range

# Outside the default range, so that the other test worker's draws cannot touch it; the claims of these tests
# go to their own folder besides.
SMALL = range(19990, 19994)


@pytest.fixture
def own_claims(monkeypatch, tmp_path):
    """A claims folder of this test's own and a four-port range outside the default one, for this process and
    the processes it starts."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv(PORTS_ENV, f"{SMALL.start}-{SMALL.stop - 1}")
    if not all(ports.bindable("127.0.0.1", p) for p in SMALL):
        pytest.skip(f"something on this machine holds a port in {SMALL}")
    return tmp_path


def test_a_broker_whose_port_another_process_holds_does_not_start_and_the_error_names_the_holder():
    """A connection to the port would succeed (to the holder): only the broker's own listening socket counts."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        broker = Broker(port=port)
        with pytest.raises(RuntimeError, match=f"port {port} is held by pid {os.getpid()}") as refused:
            broker.start()
        assert "Address already in use" in "\n".join(refused.value.__notes__), "the broker's log tail"
        assert broker.process.poll() is not None
        broker.close()


def test_a_killed_brokers_port_is_claimed_until_it_restarts_on_it_in_this_process_and_in_others(own_claims):
    broker = Broker().start()
    try:
        assert broker.port in SMALL
        broker.kill()
        others = {free_port() for _ in range(2)}
        assert broker.port not in others and others <= set(SMALL)
        # Another process on the same machine draws the one port left, never the killed broker's.
        child = subprocess.run([sys.executable, "-c", "from edgefleet.ports import free_port; print(free_port())"],
                               capture_output=True, text=True, check=True, timeout=60)
        assert int(child.stdout) == (set(SMALL) - others - {broker.port}).pop()
        with pytest.raises(RuntimeError, match="no free loopback port"):
            free_port()  # all four claimed, though the broker's is free
        broker.start()  # its port is still its own
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
            pass
    finally:
        broker.close()


def test_a_claim_runs_out_after_its_time_and_a_bound_port_is_never_drawn(own_claims, monkeypatch):
    taken = {free_port() for _ in SMALL}
    assert taken == set(SMALL)
    monkeypatch.setattr(ports, "CLAIM_S", 0)
    with socket.socket() as holder:  # bound, not listening: still not free
        holder.bind(("127.0.0.1", SMALL.start))
        drawn = {free_port() for _ in range(20)}  # claims no longer hold: a port may come twice
        assert drawn and drawn <= set(SMALL) - {SMALL.start}


def test_the_range_the_kernel_draws_outgoing_ports_from_is_found_overlapping(tmp_path):
    kernel = tmp_path / "ip_local_port_range"
    kernel.write_text("32768\t60999\n")
    assert not ports.ephemeral_overlap(ports.DEFAULT_PORTS, kernel)
    kernel.write_text("1024\t65535\n")
    assert ports.ephemeral_overlap(ports.DEFAULT_PORTS, kernel) == ports.DEFAULT_PORTS
    assert not ports.ephemeral_overlap(ports.DEFAULT_PORTS, tmp_path / "missing")


@pytest.mark.parametrize("value", ["20000", "30000-20000", "80-90", "20000-70000", "a-b"])
def test_a_malformed_port_range_is_refused_naming_the_key(monkeypatch, value):
    monkeypatch.setenv(PORTS_ENV, value)
    with pytest.raises(ValueError, match=PORTS_ENV):
        free_port()
    monkeypatch.delenv(PORTS_ENV)
    assert port_range() == ports.DEFAULT_PORTS
