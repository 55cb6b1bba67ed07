"""The ports the tests' and the local stack's servers get: never one another process holds, never one this
process handed out already, and each xdist worker's from its own share."""

from __future__ import annotations

import os
import socket

import pytest

from edgefleet import ports
from edgefleet.broker import Broker
from edgefleet.ports import PORTS_ENV, free_port, port_range, share


def test_a_broker_whose_port_another_process_holds_does_not_start_and_the_error_names_the_holder():
    """A connection to the port would succeed (to the holder): only the broker's own listening socket counts."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        broker = Broker(port=port)
        with pytest.raises(RuntimeError, match=f"another process listens on port {port}: pid {os.getpid()}"):
            broker.start()
        broker.close()


def test_a_killed_brokers_port_is_not_handed_out_again_and_it_restarts_on_it(monkeypatch):
    monkeypatch.setenv(PORTS_ENV, "29990-29993")
    monkeypatch.setattr(ports, "_handed_out", type(ports._handed_out)())
    broker = Broker().start()
    try:
        assert broker.port in port_range()
        broker.kill()
        others = {free_port() for _ in range(2)}
        assert broker.port not in others and others <= set(port_range())
        broker.start()  # its port is still its own
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
            pass
    finally:
        broker.close()


def test_the_workers_shares_are_disjoint_within_the_range_and_this_worker_draws_from_its_own(monkeypatch):
    own = os.environ.get(PORTS_ENV)
    monkeypatch.delenv(PORTS_ENV, raising=False)
    slices = [share(i, 3) for i in range(3)]
    taken = [set(range(int(low), int(high) + 1)) for low, high in (s.split("-") for s in slices)]
    assert all(len(t) == len(ports.DEFAULT_PORTS) // 3 for t in taken)
    assert set.union(*taken) <= set(ports.DEFAULT_PORTS) and sum(map(len, taken)) == len(set.union(*taken))
    with pytest.raises(ValueError):
        share(3, 3)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # scripts/test.sh runs two
        worker = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw"))
        assert own == share(worker, int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
        monkeypatch.setenv(PORTS_ENV, own)
        assert free_port() in port_range()


@pytest.mark.parametrize("value", ["20000", "30000-20000", "80-90", "20000-70000", "a-b"])
def test_a_malformed_port_range_is_refused_naming_the_key(monkeypatch, value):
    monkeypatch.setenv(PORTS_ENV, value)
    with pytest.raises(ValueError, match=PORTS_ENV):
        free_port()
