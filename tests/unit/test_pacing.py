"""A paced rollout (RolloutPacing): each device's turn (membership.start_delay), the machines waiting it
before they touch the registry, the wait ended by a newer rollout, the field's wire compatibility, and
how the operator's CLI sizes it (fleet_rollout.plan_pacing). Pure logic, so tested as such; the sync
service's rollouts against real processes are tests/test_sync.py and tests/test_rollout_pacing.py."""

from __future__ import annotations

import threading
import time

import pytest

from edgefleet.fleet_rollout import (
    PACING_SINCE,
    plan_pacing,
    promoted_devices,
    targeted_at_promote,
    targeted_at_start,
    too_old_for_pacing,
)
from services.sync.membership import is_member, pacing_position, position, start_delay, supersedes
from services.sync.registry_io import RegistryIo
from services.sync.rollout import Machine, StepFailed, Superseded, wait_turn
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import SyncSettings, load
from shared.lifecycle import Progress
from shared.schemas import MAX_SPREAD_S, Rollout, RolloutPacing, RolloutPhase, RolloutTarget, SyncState
from tests.unit import wire_v1
from tests.unit.test_plugin_rollout_machine import FakeIo as PluginFakeIo

FLEET = [f"dev-{i}" for i in range(2000)]
PACED = RolloutPacing(spread_s=20.0, max_concurrent=50)
FORMATS = [WireFormat.JSON, WireFormat.MSGPACK, WireFormat.MSGPACK_ZLIB]


def _rollout(pacing: RolloutPacing | None = PACED, version: int = 2, phase=RolloutPhase.PROMOTED,
             issued_at: float = 1.0, **target) -> Rollout:
    return Rollout(rollout_id="r-1", model="efficientnet-lite0", version=version, phase=phase,
                   target=RolloutTarget(**target), issued_at=issued_at, pacing=pacing)


def _turn(rollout: Rollout, device: str) -> float:
    """The device's whole turn: its wait when it takes the rollout as it is issued."""
    assert rollout.pacing is not None
    return start_delay(rollout.rollout_id, device, rollout.pacing, rollout.issued_at, rollout.issued_at)


def _fresh(**fields) -> Rollout:
    """A rollout issued a moment from now by the operator's clock: a device takes it with its whole turn
    ahead (clamped to it), whatever the moments between the test's lines."""
    return _rollout(issued_at=time.time() + 60, **fields)


# -- each device's turn ---------------------------------------------------------------------------------


def test_a_devices_turn_is_its_pacing_position_times_the_spread_and_the_same_every_time():
    rollout = _rollout()
    delays = [_turn(rollout, d) for d in FLEET]
    assert delays == [_turn(rollout, d) for d in FLEET], "a retry or restart has the same turn"
    assert all(0 <= delay < PACED.spread_s for delay in delays)
    assert delays[7] == pacing_position("r-1", "dev-7") * PACED.spread_s


def test_the_turns_spread_the_fleet_evenly_over_the_spread():
    delays = [_turn(_rollout(), d) for d in FLEET]
    per_second = [sum(second <= delay < second + 1 for delay in delays) for second in range(20)]
    # 2000 devices over 20 s: 100 a second, binomial spread (sd ~10): never a stampede, never a gap.
    assert all(60 <= n <= 140 for n in per_second), per_second


def _per_quarter(delays: list[float]) -> list[int]:
    return [sum(q * PACED.spread_s / 4 <= delay < (q + 1) * PACED.spread_s / 4 for delay in delays) for q in range(4)]


def test_a_drawn_canarys_turns_cover_the_whole_spread_and_so_do_the_promoted_rest():
    """The canary is drawn by position() < share; were the turns position() * spread too, the ~100 canary
    devices of 2000 would all start within the first 5 % of the spread (in 1 s of 20), and the promote's
    devices never in it."""
    canary = _rollout(phase=RolloutPhase.CANARY, share=0.05)
    members = [d for d in FLEET if is_member(canary, d, [])]
    delays = [_turn(canary, d) for d in members]
    assert 80 <= len(members) <= 120
    assert all(n >= 12 for n in _per_quarter(delays)), _per_quarter(delays)  # ~25 each: the whole [0, spread)
    assert max(delays) > 0.9 * PACED.spread_s and min(delays) < 0.1 * PACED.spread_s
    rest = promoted_devices(canary, FLEET)
    early = sum(_turn(canary, d) < 0.05 * PACED.spread_s for d in rest)
    assert early >= 60, "the promote's devices start from the spread's first moment too (~95 in its first 5 %)"


def test_a_device_that_restarts_or_joins_late_waits_only_what_is_left_of_its_turn():
    device = next(d for d in FLEET if pacing_position("r-1", d) > 0.5)  # a turn of more than 10 s
    turn, issued = pacing_position("r-1", device) * PACED.spread_s, 1000.0
    assert start_delay("r-1", device, PACED, issued, issued) == turn
    assert start_delay("r-1", device, PACED, issued, issued + 4) == pytest.approx(turn - 4)  # restarted 4 s in
    assert start_delay("r-1", device, PACED, issued, issued + turn + 1) == 0  # joined after its turn: at once
    # A device clock behind the operator's (the rollout seems issued in its future) waits its turn, no more.
    assert start_delay("r-1", device, PACED, issued, issued - 3600) == turn


def _waits(rollout: Rollout, device: str = "dev-7") -> list[tuple[str, object]]:
    seen: list[tuple[str, object]] = []
    wait_turn(rollout, device, lambda reason: seen.append(("report", reason)),
              lambda seconds: seen.append(("pause", seconds)))
    return seen


def test_a_rollout_without_pacing_or_past_every_turn_starts_every_device_at_once():
    assert all(_waits(_fresh(pacing=None), d) == [] for d in FLEET[:100])
    assert all(_waits(_fresh(pacing=RolloutPacing()), d) == [] for d in FLEET[:100])
    late = _rollout(issued_at=time.time() - PACED.spread_s - 1)  # every turn is over
    assert all(_waits(late, d) == [] for d in FLEET[:100])


# -- the model machine waits its turn ------------------------------------------------------------------


class PacedIo:
    """The world for the model machine: records reports and pauses; a pause may be ended by a newer
    rollout (`newer`); the registry is unreachable, so a rollout that gets past its turn fails there."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object, object]] = []
        self.newer: Rollout | None = None

    def report(self, state, rollout_id, target=None, reason=None, canary=None, progress=None) -> None:
        self.events.append(("report", state, reason))

    def pause(self, rollout, seconds) -> None:
        self.events.append(("pause", rollout.rollout_id, seconds))
        if self.superseded(rollout):
            raise Superseded()

    def fetch_manifest(self, rollout):
        self.events.append(("fetch", rollout.rollout_id, None))
        raise StepFailed("s3://edgefleet-models/efficientnet-lite0/2/manifest.json: NoSuchKey")

    def superseded(self, rollout) -> bool:
        return supersedes(self.newer, rollout)

    def serving_changed(self, sha256) -> None:
        pass


@pytest.fixture
def settings(tmp_path) -> SyncSettings:
    return load(SyncSettings, None, device_id="dev-7", model_store=tmp_path / "store")


def test_a_paced_device_reports_its_wait_and_waits_it_before_the_registry(store, settings):
    io = PacedIo()
    rollout = _fresh()
    Machine(store, settings, io, "dev-7").handle(rollout)  # type: ignore[arg-type]
    delay = _turn(rollout, "dev-7")
    assert delay > 0
    kinds = [e[0] for e in io.events]
    assert kinds == ["report", "pause", "report", "fetch", "report"], io.events
    (_, state, reason), pause = io.events[0], io.events[1]
    assert state is SyncState.RECEIVED and f"starting the download in {delay:.1f} s" in str(reason)
    assert "over 20 s" in str(reason) and "about 50 at once" in str(reason)
    assert pause == ("pause", "r-1", delay)
    assert io.events[2][1] is SyncState.RECEIVED and io.events[2][2] is None, "its turn came: the wait is over"
    assert io.events[-1][1] is SyncState.FAILED


def test_a_newer_rollout_during_the_wait_ends_it_before_the_registry_is_asked(store, settings):
    io = PacedIo()
    io.newer = _rollout(version=3)
    with pytest.raises(Superseded):
        Machine(store, settings, io, "dev-7").handle(_fresh())  # type: ignore[arg-type]
    assert "fetch" not in [e[0] for e in io.events]


def test_no_wait_unpaced_nor_for_a_device_with_nothing_to_download(store, settings):
    for rollout in (_fresh(pacing=None), _fresh(devices=["dev-8"]),
                    _fresh(phase=RolloutPhase.ABORTED), _fresh(version=1)):  # v1: the seed it serves
        io = PacedIo()
        Machine(store, settings, io, "dev-7").handle(rollout)  # type: ignore[arg-type]
        assert "pause" not in [e[0] for e in io.events], rollout


# -- the plugin machine waits its turn too -------------------------------------------------------------


class PacedPluginIo(PluginFakeIo):
    def __init__(self, store) -> None:
        super().__init__(store)
        self.pauses: list[float] = []

    def pause(self, rollout, seconds) -> None:
        self.pauses.append(seconds)
        if self.superseded(rollout):
            raise Superseded()


def test_a_paced_plugin_rollout_waits_its_turn_before_the_manifest(tmp_path):
    from services.sync.plugin_store import PluginStore
    from services.sync.plugins import PluginMachine
    from shared.schemas import PluginRollout

    settings = load(SyncSettings, None, device_id="dev-7", plugins_dir=tmp_path / "plugins")
    store = PluginStore(settings.plugins.dir, settings.keep_versions)
    io = PacedPluginIo(store)
    rollout = PluginRollout(rollout_id="p-1", plugin="site-labels", version=1, phase=RolloutPhase.PROMOTED,
                            target=RolloutTarget(), issued_at=time.time() + 60, pacing=PACED)
    PluginMachine(store, settings, io, "dev-7").handle(rollout)  # type: ignore[arg-type]
    assert io.pauses == [start_delay("p-1", "dev-7", PACED, rollout.issued_at, rollout.issued_at)]
    assert io.states("p-1")[:2] == ["received", "received"] and "paced: starting" in str(io.reports[0][4])
    assert io.last("p-1")[1] is SyncState.FAILED  # the fake registry holds no such plugin: past the wait


# -- the service's wait (RegistryIo.pause) -------------------------------------------------------------


def _registry_io(settings: SyncSettings, store, latest: list[Rollout], changed: threading.Condition) -> RegistryIo:
    def report(state, rollout_id, target=None, reason=None, canary=None, progress=None) -> None:
        pass

    return RegistryIo(settings, None, {}, store, lambda r: supersedes(latest[-1], r), changed,  # type: ignore[arg-type]
                      Progress("rollouts"), report, lambda n: None)


def test_the_services_wait_ends_when_a_newer_rollout_arrives(tmp_path, settings):
    from services.sync.store import ModelStore

    rollout, changed = _rollout(), threading.Condition()
    latest = [rollout]
    registry_io = _registry_io(settings, ModelStore(tmp_path / "s", 2), latest, changed)

    def newer_arrives() -> None:
        time.sleep(0.2)
        with changed:  # as the service's MQTT callback files a rollout
            latest.append(_rollout(version=3))
            changed.notify_all()

    threading.Thread(target=newer_arrives, daemon=True).start()
    began = time.monotonic()
    with pytest.raises(Superseded):
        registry_io.pause(rollout, 120.0)
    assert time.monotonic() - began < 60, "the wait ended on the notification, not at its end"


def test_the_services_wait_runs_its_course_while_nothing_newer_comes(tmp_path, settings):
    from services.sync.store import ModelStore

    rollout = _rollout()
    registry_io = _registry_io(settings, ModelStore(tmp_path / "s", 2), [rollout], threading.Condition())
    began = time.monotonic()
    registry_io.pause(rollout, 0.2)  # a promote of the same version does not supersede either
    assert time.monotonic() - began >= 0.2


# -- on the wire ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_rollout_without_pacing_encodes_exactly_as_before_the_field(fmt):
    new = _rollout(pacing=None)
    old = wire_v1.Rollout(**new.model_dump(exclude={"pacing"}))
    assert encode(new, fmt) == encode(old, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pacing_round_trips_and_an_old_device_refuses_it_rather_than_half_read_it(fmt):
    payload = encode(_rollout(), fmt)
    assert decode(Rollout, payload, fmt.content_type).pacing == PACED
    with pytest.raises(DecodeError, match="pacing"):
        decode(wire_v1.Rollout, payload, fmt.content_type)


def test_a_spread_beyond_the_bound_is_refused():
    with pytest.raises(ValueError, match="spread_s"):
        RolloutPacing(spread_s=MAX_SPREAD_S + 1)
    with pytest.raises(ValueError, match="spread_s"):
        RolloutPacing(spread_s=-1)


# -- the operator's CLI sizes it -----------------------------------------------------------------------


def test_the_spread_is_devices_times_download_time_over_the_concurrency():
    plan = plan_pacing(950, 1_048_576, 50, 2_000_000)  # 1 MiB: the 1 s floor
    assert plan.pacing == RolloutPacing(spread_s=19.0, max_concurrent=50)
    assert "950 devices' downloads spread over 19 s" in plan.line
    big = plan_pacing(950, 20_000_000, 50, 2_000_000)  # 10 s a device
    assert big.pacing is not None and big.pacing.spread_s == 190.0


def test_no_pacing_for_a_fleet_within_the_concurrency_or_when_turned_off():
    assert plan_pacing(50, 10**9, 50, 2_000_000).pacing is None
    off = plan_pacing(5000, 10**9, 0, 2_000_000)
    assert off.pacing is None and "--max-concurrent-downloads 0" in off.line


def test_a_huge_spread_is_capped_and_says_how_many_download_at_once_then():
    plan = plan_pacing(100_000, 10**9, 10, 1_000_000)  # 1000 s a device, 10 at once: 10^7 s wanted
    assert plan.pacing is not None and plan.pacing.spread_s == MAX_SPREAD_S and "capped from 10000000 s" in plan.line
    assert "about 27778 at once, not 10" in plan.line and "about 10 at once" not in plan.line


def test_no_device_counted_online_means_no_pacing_and_the_line_says_why():
    plan = plan_pacing(0, 10**9, 50, 2_000_000)
    assert plan.pacing is None and "no device counted" in plan.line and "starts at once" in plan.line


def test_a_device_older_than_the_pacing_field_leaves_pacing_out_and_is_named():
    versions = {"a": PACING_SINCE, "b": f"{PACING_SINCE}+g1234", "c": "0.0.9", "d": "test", "e": "99.0"}
    old = too_old_for_pacing(["a", "b", "c", "d", "e", "offline"], versions)
    assert old == ["c", "d"]  # a release before the field, or none named (fail closed); no status: not counted
    plan = plan_pacing(950, 1_048_576, 50, 2_000_000, old)
    assert plan.pacing is None
    assert f"2 of the 950 devices run edgefleet older than {PACING_SINCE}" in plan.line and "c, d" in plan.line
    assert plan_pacing(950, 1_048_576, 50, 2_000_000, too_old_for_pacing(["a", "b", "e"], versions)).pacing


def test_the_devices_counted_are_those_the_phase_sets_downloading():
    known = FLEET[:1000]
    canary = RolloutTarget(share=0.05, canary_devices=known[:50])
    assert targeted_at_start(canary, known) == 50
    assert targeted_at_start(RolloutTarget(), known) == 1000
    assert targeted_at_start(RolloutTarget(share=0.1), known) == 100
    assert targeted_at_start(RolloutTarget(devices=["a", "b"]), known) == 2
    named = _rollout(phase=RolloutPhase.CANARY, share=0.05, canary_devices=known[:50])
    assert targeted_at_promote(named, known) == 950
    drawn = _rollout(phase=RolloutPhase.CANARY, share=0.05)
    assert targeted_at_promote(drawn, known) == sum(position("r-1", d) >= 0.05 for d in known)
    assert targeted_at_promote(_rollout(phase=RolloutPhase.PROMOTED), known) == 0  # all had it at once
