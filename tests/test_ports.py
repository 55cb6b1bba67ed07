"""The ports the tests' and the local stack's servers get: never one another process holds, never one a
process of this user claimed recently (a killed broker gets its port back), and a server counts as started
only once its own process (or one it started) listens."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from edgefleet import broker as broker_module
from edgefleet import ports
from edgefleet.broker import Broker
from edgefleet.ports import PORTS_ENV, claims_dir, free_port, port_range, wait_listening

# One worker runs these in order: the ones on SMALL would otherwise meet on its ports from two workers.
pytestmark = pytest.mark.xdist_group("ports")
SMALL = range(19990, 19994)  # outside the default range, so no other test's draw comes near it
DRAW_IN_A_CHILD = "from edgefleet.ports import free_port; print('ready', flush=True); print(free_port(), flush=True)"


@pytest.fixture
def own_claims(monkeypatch, tmp_path):
    """A claims folder of this test's own and the four-port range SMALL, for this process and the processes it
    starts."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv(PORTS_ENV, f"{SMALL.start}-{SMALL.stop - 1}")
    if not all(ports.bindable("127.0.0.1", p) for p in SMALL):
        pytest.skip(f"something on this machine holds a port in {SMALL}")
    return tmp_path


def _listener(port: int) -> str:
    return (f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); "
            "time.sleep(60)")


def test_a_broker_whose_port_another_process_holds_does_not_start_and_the_error_names_the_holder():
    """A connection to the port would succeed (to the holder): only the broker's own listening socket counts."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        broker = Broker(port=port)
        with pytest.raises(RuntimeError, match=f"pid {os.getpid()} listens on port {port}") as refused:
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
        # Another process of this user draws the one port left, never the killed broker's.
        child = subprocess.run([sys.executable, "-c", DRAW_IN_A_CHILD], capture_output=True, text=True, check=True,
                               timeout=60)
        assert int(child.stdout.split()[-1]) == (set(SMALL) - others - {broker.port}).pop()
        with pytest.raises(RuntimeError, match="no free loopback port"):
            free_port()  # all four claimed, though the broker's is free
        broker.start()  # its port is still its own
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
            pass
    finally:
        broker.close()


def test_a_broker_killed_long_after_its_draw_claims_its_port_again(own_claims, monkeypatch):
    broker = Broker().start()
    try:
        os.utime(claims_dir() / str(broker.port), (0, 0))  # drawn long ago: the claim ran out
        broker.kill()
        assert time.time() - (claims_dir() / str(broker.port)).stat().st_mtime < ports.CLAIM_S
        assert broker.port not in {free_port() for _ in range(3)}
    finally:
        broker.close()


def test_a_claim_runs_out_and_is_renewed_when_drawn_and_a_time_ahead_of_the_clock_is_none(own_claims, monkeypatch):
    monkeypatch.setenv(PORTS_ENV, f"{SMALL.start}-{SMALL.start}")
    assert free_port() == SMALL.start
    with pytest.raises(RuntimeError, match="no free loopback port"):
        free_port()
    claim = claims_dir() / str(SMALL.start)
    os.utime(claim, (0, 0))
    assert free_port() == SMALL.start
    assert time.time() - claim.stat().st_mtime < 60, "drawn again, claimed again"
    os.utime(claim, (time.time() + 10 * ports.CLAIM_S,) * 2)  # the clock was set back since
    assert free_port() == SMALL.start


def test_a_bound_port_is_never_drawn(own_claims, monkeypatch):
    monkeypatch.setattr(ports, "CLAIM_S", 0)  # no claim holds: only binding decides
    holders = [socket.socket() for _ in range(3)]
    try:
        for holder, port in zip(holders, SMALL, strict=False):  # bound, not listening: still not free
            holder.bind(("127.0.0.1", port))
        assert {free_port() for _ in range(5)} == {SMALL[-1]}
    finally:
        for holder in holders:
            holder.close()


def test_a_draw_waits_for_the_claims_lock_another_process_holds(own_claims):
    claims_dir().mkdir(mode=0o700)
    with (claims_dir() / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        child = subprocess.Popen([sys.executable, "-c", DRAW_IN_A_CHILD], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        assert child.poll() is None, "it drew a port while another process held the lock"
    assert int(child.stdout.readline()) in SMALL
    assert child.wait(60) == 0


def test_a_claims_folder_others_can_write_or_a_linked_lock_is_refused(own_claims):
    folder = claims_dir()
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(RuntimeError, match="must be a folder of user"):
        free_port()
    folder.chmod(0o700)
    victim = own_claims / "victim"
    (folder / ".lock").symlink_to(victim)
    with pytest.raises(OSError):
        free_port()
    assert not victim.exists()


def test_a_server_that_listens_through_a_child_process_counts(own_claims):
    port = free_port()
    # `; true` keeps the shell as the parent rather than letting it become Python.
    shell = subprocess.Popen(["sh", "-c", f'{sys.executable} -c "{_listener(port)}"; true'], start_new_session=True)
    try:
        wait_listening(shell, port, 30, "the shell's child")
        assert psutil.Process(shell.pid).children()
    finally:
        os.killpg(shell.pid, 9)
        shell.wait()


def test_where_psutil_may_not_read_a_process_its_listening_is_read_from_the_system_table(own_claims, monkeypatch):
    def denied(self, *args, **kwargs):
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "net_connections", denied)
    monkeypatch.setattr(psutil.Process, "children", denied)
    broker = Broker().start()
    broker.close()


def test_whatever_ends_a_brokers_start_it_leaves_no_broker_running(monkeypatch):
    def interrupted(process, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(broker_module, "wait_listening", interrupted)
    broker = Broker()
    with pytest.raises(KeyboardInterrupt):
        broker.start()
    assert broker.process.poll() is not None
    broker.close()


def test_the_range_the_kernel_draws_outgoing_ports_from_is_found_overlapping_and_a_draw_warns(own_claims, caplog,
                                                                                                monkeypatch):
    kernel = own_claims / "ip_local_port_range"
    kernel.write_text("32768\t60999\n")
    assert not ports.ephemeral_overlap(ports.DEFAULT_PORTS, kernel)
    assert not ports.ephemeral_overlap(ports.DEFAULT_PORTS, own_claims / "missing")
    kernel.write_text("1024\t65535\n")
    assert ports.ephemeral_overlap(ports.DEFAULT_PORTS, kernel) == ports.DEFAULT_PORTS
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", kernel)
    monkeypatch.setattr(ports, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=ports.__name__):
        free_port()
    assert f"set {PORTS_ENV} outside it" in caplog.text and f"{SMALL.start}-{SMALL.stop - 1}" in caplog.text


@pytest.mark.parametrize("value", ["20000", "30000-20000", "80-90", "20000-70000", "a-b"])
def test_a_malformed_port_range_is_refused_naming_the_key(monkeypatch, value):
    monkeypatch.setenv(PORTS_ENV, value)
    with pytest.raises(ValueError, match=PORTS_ENV):
        free_port()
    monkeypatch.delenv(PORTS_ENV)
    assert port_range() == ports.DEFAULT_PORTS
