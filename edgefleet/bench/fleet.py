"""`edgefleet bench fleet`: a thousand simulated devices against the cloud side on this machine, in one run.

The rig (edgefleet/bench/fleet_rig.py): the TLS fleet broker as shipped (cloud.conf, cloud.acl), moto,
two cloud_ingest replicas with their shipped settings, P `edgefleet simulate run` processes sharing the
devices. The observers: the console's view of the broker (fleet_watch.py), CPU meters (fleet_cpu.py),
the simulators' loop lag (fleet_lag.py), the telemetry read back from S3 and the S3 server's log
(fleet_s3.py), the devices' outboxes once stopped (fleet_outboxes.py). The phases, in order:

1. connect: every device online (its retained sync status), the broker's CPU while they connect.
2. telemetry: every device appends records at --records-per-s from its start for the telemetry window;
   10 % of the devices lose their link for --cut-for-s inside it. Measured from what S3 holds: records/s
   stored in the window (the goal, beside what the devices offered), end-to-end lag (a record's own time
   to its flush's stored_at), records per replica, S3 objects per minute, ingest CPU per record, the
   broker's PUBLISHes and CPU per PUBLISH. Telemetry goes on through the rollout (a fleet rolls out
   while it reports); the audit comes last.
3. rollout: v2 of a small signed ONNX model through `edgefleet rollout start --canary 5` (paced by
   --max-concurrent-downloads where the canary is larger), every canary device's verdict, then `edgefleet
   rollout promote` (paced), until every device is active: canary p50/p99 (a canary device never active
   counts as inf), time to 50/99/100 % active after the promote (100 %: only when every device ends
   ACTIVE serving v2, in its latest and its retained report), the peak of concurrent downloads against
   K, registry requests and bytes, the broker's CPU.
4. drain and audit: the simulators stop appending (SIGUSR1) and forward what their outboxes hold, then
   stop; every number each device made must be in S3 once (or declared lost); one left in an outbox is
   a finding.

The per-device costs in the JSON (connections, broker PUBLISHes/s, broker CPU, ingest CPU per record, S3
objects per minute and PUTs/s, registry requests and bytes per rollout) are what docs/scale.md sizes 10k
and 100k devices from. Beside them, the load generator's own health: the simulators' peak memory per
device (the goal: RSS only), their devices' state on tmpfs (the devices' flash, not in the goal), their
loop lag per phase, failed tasks, refused publishes and registry errors. Under the goals, notes say when
a figure cannot be taken at face value: a simulator loop that lagged (its timings then measure the load
generator too), a canary the operator's CLI planned on fewer devices than were online, outboxes that
did not drain.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console

from edgefleet import fleet_rollout
from edgefleet.audit import DeviceAudit, audit
from edgefleet.bench.fleet_cpu import MACHINE, CpuMark, CpuMeter
from edgefleet.bench.fleet_lag import LagFigures, LagSampler
from edgefleet.bench.fleet_outboxes import OutboxState, read_outbox
from edgefleet.bench.fleet_rig import BUCKET, CONSOLE, OPERATOR, FleetRig, SimOptions, SimProcess, device_ids
from edgefleet.bench.fleet_s3 import (
    StoredTelemetry,
    best_rate,
    index_count,
    log_size,
    read_records,
    read_stored,
    requests_logged,
)
from edgefleet.bench.fleet_watch import FleetWatch, percentile, wait_for
from edgefleet.bench.report import Goal, emit, summary_line
from edgefleet.progress import QUIET, Reporter
from edgefleet.simulate import stats as sim_stats
from edgefleet.simulate.fleet import cut_devices
from services.sync import membership
from shared.schemas import Rollout, RolloutPhase, SyncReport, SyncState

CANARY_PERCENT = 5.0
CUT_SHARE = 0.10
MB = 1_000_000
LAGGED_S = 1.0  # a simulator loop p99 above this in a phase: its timings measure the load generator too
# A records/s goal is met at this share of its target: the devices append a tick's records at a time
# (flush_interval_s, 1 s), so over a window a fleet offering exactly the target rate shows it to about a
# tick per device at each end: ~0.5 % at --quick's 50 devices and 20 s, ~0.1 % at 1,000 and 120 s. Without
# it an exactly met rate would pass or fail by chance; 99 % still catches a simulator or a pipeline behind.
RATE_SHARE = 0.99
# The goal for the pipeline is literal: >= 5 records/s per device into S3 (5,000/s for 1,000), met in
# full, no tolerance; the devices offer a little more by default (DEFAULT_RECORDS_PER_S) so that a pipeline
# keeping up shows it however the window's edges fall.
GOAL_RECORDS_PER_S = 5.0
DEFAULT_RECORDS_PER_S = 5.1
SATURATED = 0.9  # machine CPU at this share of its cores or more: saturated


@dataclass(frozen=True)
class Plan:
    """One run's sizes and times."""

    devices: int
    processes: int
    telemetry_s: float
    cut_for_s: float
    records_per_s: float
    model_bytes: int
    max_concurrent: int
    connect_timeout_s: float
    rollout_timeout_s: float
    settle_s: float = 2.0  # after every device connected, before the telemetry window opens
    drain_timeout_s: float = 60.0  # how long the outboxes may take to empty before the audit

    @property
    def cut_at_s(self) -> float:
        """When the cut starts, after every device of a process connected (the simulator's --cut-at-s):
        a quarter into what the window leaves around it, so the window holds the catch-up too."""
        return self.settle_s + max(0.0, self.telemetry_s - self.cut_for_s) / 4


def plan_for(quick: bool, devices: int | None, processes: int | None, telemetry_s: float | None,
             cut_for_s: float | None, records_per_s: float | None, model_bytes: int, max_concurrent: int) -> Plan:
    """The run's plan: the issue's sizes, or --quick's small ones, with what the caller overrides."""
    devices = devices or (50 if quick else 1000)
    return Plan(
        devices=devices, processes=processes or (1 if devices <= 200 else max(2, devices // 500)),
        telemetry_s=telemetry_s or (20.0 if quick else 120.0), cut_for_s=cut_for_s or (8.0 if quick else 60.0),
        records_per_s=records_per_s or DEFAULT_RECORDS_PER_S, model_bytes=model_bytes, max_concurrent=max_concurrent,
        connect_timeout_s=60.0 if quick else 180.0, rollout_timeout_s=60.0 if quick else 180.0)


# -- the simulators' own counts ------------------------------------------------------------------------


def sim_totals(processes: list[SimProcess]) -> list[sim_stats.SimStats]:
    """Each simulator's latest stats (those that wrote none yet left out)."""
    found = []
    for process in processes:
        try:
            found.append(sim_stats.read(process.stats_path))
        except (OSError, ValueError):
            continue
    return found


# -- phases (the 50-device test runs the same ones) ------------------------------------------------------


@dataclass
class RolloutResult:
    rollout_id: str
    plan_line: str
    promote_line: str  # the promote's pacing line (spread_s for K concurrent downloads), as the CLI printed it
    known: int  # devices the CLI counted (the canary's base)
    canary: list[str]
    canary_active_s: dict[str, float]  # from the rollout's issue to the first ACTIVE report
    canary_verdict_s: dict[str, float]
    canary_passed: int
    active_after_promote_s: dict[str, float]  # every device: from the promote to its first ACTIVE (canary: 0)
    states_before_promote: dict[str, SyncState]
    promoted_at: float
    complete: bool
    final_states: dict[str, int] = field(default_factory=dict)  # latest state on the rollout -> devices
    failed_verdicts: dict[str, str] = field(default_factory=dict)  # device -> why its canary did not pass
    retained_active: int = 0  # devices whose retained sync state, read afterwards, is ACTIVE on it serving it
    serving_active: int = 0  # devices whose latest report is ACTIVE on the rollout, serving its version
    peak_downloads: int = 0  # most devices between DOWNLOADING and VERIFIED at once (the registry's load)
    cpu_canary: float = 0.0  # broker CPU seconds per second
    cpu_promote: float = 0.0
    cpu_machine: float = float("nan")  # the whole machine's CPU seconds per second, start to the last ACTIVE
    span: tuple[float, float] = (0.0, 0.0)  # wall clock: the start command to the last ACTIVE (or the timeout)
    registry_requests: int = 0
    registry_bytes: int = 0

    def canary_active_all_s(self) -> list[float]:
        """Each canary device's time to ACTIVE; inf for one that never reported it (a p99 then fails)."""
        return [self.canary_active_s.get(d, math.inf) for d in self.canary]

    def all_active_s(self, devices: int) -> float:
        """From the promote until every device was ACTIVE; inf unless every one of `devices` ends ACTIVE on
        the rollout serving its version (latest report and retained state): a device that rolled back
        never counts as there."""
        if not (self.complete and self.serving_active == devices and self.retained_active == devices):
            return math.inf
        return max(self.active_after_promote_s.values(), default=math.inf)


def run_rollout(rig: FleetRig, watch: FleetWatch, devices: list[str], *, version: int, max_concurrent: int | None,
                timeout_s: float, meter: CpuMeter | None = None,
                processes: list[SimProcess] | None = None) -> RolloutResult:
    """A canary rollout of `version` through the operators' commands, then its promote, watched to the end.

    Args:
        rig: the fleet.
        watch: the console's view (started).
        devices: the devices expected to end ACTIVE on it.
        version: the model version to roll out.
        max_concurrent: --max-concurrent-downloads (None: the command's default).
        timeout_s: how long each of the canary and the promote may take before the run goes on without them.
        meter: the broker's CPU meter ("broker"), for each phase's CPU.
        processes: the simulators whose registry counts are summed (default: all of the rig's).

    Returns:
        What happened, with each device's times the later of its report's own time and its arrival.

    Raises:
        RuntimeError: the rollout or its promote never reached the watcher.
    """
    processes = processes if processes is not None else rig.simulators
    began = time.time()
    before = _registry(processes)
    mark0 = meter.mark() if meter else None
    rollout_id, stderr = rig.start_rollout(version, CANARY_PERCENT, max_concurrent)
    issued = _rollout_message(watch, rollout_id, lambda r: True).issued_at
    canary = list(_rollout_message(watch, rollout_id, lambda r: True).target.canary_devices)
    wait_for(lambda: set(canary) <= watch.verdicts(rollout_id).keys(), timeout_s)
    active = watch.first_at(rollout_id, SyncState.ACTIVE)
    verdicts = watch.verdicts(rollout_id)
    states_before = watch.latest_states(rollout_id)
    mark1 = meter.mark() if meter else None
    promote_line = rig.promote(max_concurrent)
    promoted_at = _rollout_message(watch, rollout_id, lambda r: r.phase is RolloutPhase.PROMOTED).issued_at
    complete = wait_for(lambda: set(devices) <= watch.first_at(rollout_id, SyncState.ACTIVE).keys(), timeout_s)
    mark2 = meter.mark() if meter else None
    ended = time.time()
    # A late reader, as `edgefleet rollout status` reads the fleet: the retained states alone (its 2 s
    # also let every simulator write its stats once more, so the registry counts hold the last downloads).
    retained = fleet_rollout.states(rig.client_settings(OPERATOR), wait_s=2)
    # Registry counts from stats written after the last ACTIVE (a stats file is rewritten every second).
    wait_for(lambda: all(s.at > ended + 1 for s in sim_totals(processes)), 5)
    after = _registry(processes)
    final = watch.first_at(rollout_id, SyncState.ACTIVE)
    line = next((x for x in stderr.splitlines() if x.startswith("canary")), stderr.strip())
    result = RolloutResult(
        rollout_id=rollout_id, plan_line=line, promote_line=" ".join(promote_line.split()), known=_known_of(line),
        canary=canary, canary_active_s={d: active[d] - issued for d in canary if d in active},
        canary_verdict_s={d: verdicts[d][0] - issued for d in canary if d in verdicts},
        canary_passed=sum(verdicts[d][1] for d in canary if d in verdicts),
        active_after_promote_s={d: max(0.0, final[d] - promoted_at) for d in devices if d in final},
        states_before_promote=states_before, promoted_at=promoted_at, complete=complete,
        retained_active=sum(_serves(r, rollout_id, version) for d, r in retained.items() if d in set(devices)),
        serving_active=sum(_serves(r, rollout_id, version) for d, r in watch.latest_reports().items()
                           if d in set(devices)),
        peak_downloads=peak_overlap(watch.first_at(rollout_id, SyncState.DOWNLOADING),
                                    watch.first_at(rollout_id, SyncState.VERIFIED)),
        final_states=dict(Counter(s.value for s in watch.latest_states(rollout_id).values())),
        failed_verdicts=watch.failed_verdicts(rollout_id),
        registry_requests=sum(after[0].values()) - sum(before[0].values()), registry_bytes=after[1] - before[1],
        span=(began, ended))
    if meter and mark0 and mark1 and mark2:
        result.cpu_canary = meter.per_s(mark0, mark1, "broker")
        result.cpu_promote = meter.per_s(mark1, mark2, "broker")
        result.cpu_machine = meter.per_s(mark0, mark2, MACHINE)
    return result


def _rollout_message(watch: FleetWatch, rollout_id: str, ready: Callable[[Rollout], bool]) -> Rollout:
    """The rollout message as the watcher got it, once `ready` says it is the one waited for (30 s).

    Raises:
        RuntimeError: it never came (no fallback time: a made-up issue time would skew every figure).
    """
    wait_for(lambda: (r := watch.rollout(rollout_id)) is not None and ready(r), 30)
    found = watch.rollout(rollout_id)
    if found is None or not ready(found):
        raise RuntimeError(f"rollout {rollout_id} was published but its message never reached the watcher")
    return found


def _serves(report: SyncReport, rollout_id: str, version: int) -> bool:
    """ACTIVE on the rollout and serving its version."""
    return (report.rollout_id == rollout_id and report.state is SyncState.ACTIVE and report.serving is not None
            and report.serving.version == version)


def peak_overlap(starts: dict[str, float], ends: dict[str, float]) -> int:
    """The most intervals [starts[d], ends[d]] open at once (a start without an end stays open)."""
    events = sorted([(at, 1) for at in starts.values()]
                    + [(at, -1) for d, at in ends.items() if d in starts])
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


_KNOWN = re.compile(r"\bof (\d+) devices\b")


def _known_of(line: str) -> int:
    """'canary: 3 of 49 devices (...)' -> 49; 0 where the line holds no such count (then a note says
    the canary's base is unknown rather than a guess)."""
    found = _KNOWN.search(line)
    return int(found.group(1)) if found else 0


def _registry(processes: list[SimProcess]) -> tuple[dict[str, int], int]:
    requests: dict[str, int] = {}
    total = 0
    for s in sim_totals(processes):
        for name, n in s.registry.requests.items():
            requests[name] = requests.get(name, 0) + n
        total += s.registry.bytes
    return requests, total


@dataclass
class AuditResult:
    devices: int  # devices the bucket holds records of
    expected: int  # devices simulated
    received: int
    missing: int  # made (below the outbox's next_seq) and neither in S3, nor declared lost, nor in the outbox
    held: int  # still in the outboxes after the drain: never acknowledged by the store (a finding)
    lost: int  # acknowledged by the store and not in it
    duplicates: int
    declared_lost: int
    copies: int
    drained: bool  # every outbox emptied before the simulators stopped

    @property
    def findings(self) -> int:
        return self.missing + self.held + self.lost + self.duplicates + (self.expected - self.devices)


def drain(processes: list[SimProcess], timeout_s: float) -> bool:
    """SIGUSR1 to the simulators (no more records; what the outboxes hold goes on being forwarded), then
    waits until every simulator's stats, written after the signal, show its outboxes empty.

    Returns:
        Whether they emptied within `timeout_s`.
    """
    asked = time.time()
    for process in processes:
        if process.child.alive():
            process.child.proc.send_signal(signal.SIGUSR1)

    def empty() -> bool:
        stats = sim_totals(processes)
        return len(stats) == len(processes) and all(s.at > asked + 1 and s.telemetry.queued == 0 for s in stats)

    return wait_for(empty, timeout_s, 0.5)


def stop_and_audit(rig: FleetRig, processes: list[SimProcess], settle_s: float = 30.0,
                   drain_s: float = 60.0) -> AuditResult:
    """Drains the simulators' outboxes (at most `drain_s`), stops them (SIGTERM: each closes its devices),
    waits until the replicas have written what they took (the bucket's index count steady for 3 s, at
    most `settle_s`), then audits the bucket against every device's outbox: each number a device made
    (1 .. its outbox's next_seq - 1, its last batch's too) must be in S3, declared lost, or still in the
    outbox, and what is still in an outbox after the drain counts as a finding (`held`)."""
    drained = drain(processes, drain_s)
    rig.stop_simulators(processes)
    client = rig.s3()
    counts = [index_count(client, BUCKET)]
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and (len(counts) < 4 or len(set(counts[-4:])) > 1):
        time.sleep(1.0)
        counts.append(index_count(client, BUCKET))
    found = audit(client, BUCKET)
    stored = read_stored(client, BUCKET)
    expected = [d for p in processes for d in p.devices]
    missing = held = 0
    for process in processes:
        for device in process.devices:
            unexplained, in_outbox = _account(found.get(device), read_outbox(process.outbox(device)))
            missing += unexplained
            held += in_outbox
    return AuditResult(
        devices=sum(d in found for d in expected), expected=len(expected),
        received=sum(d.received for d in found.values()), missing=missing, held=held,
        lost=sum(d.lost_count for d in found.values()), duplicates=sum(d.duplicates for d in found.values()),
        declared_lost=sum(sum(d.declared_lost.values()) for d in found.values()), copies=stored.copies,
        drained=drained)


def _account(result: DeviceAudit | None, outbox: OutboxState | None) -> tuple[int, int]:
    """One device's numbers that S3 does not explain: (unexplained, still in its outbox).

    The audit sees the gaps below the highest number stored; the outbox's next_seq adds the numbers made
    after it (a last batch never stored, or never acknowledged, is then visible)."""
    unexplained = in_outbox = 0
    epoch, seqs = (outbox.epoch, outbox.held) if outbox else ("", frozenset[int]())
    covered = 0
    for name, numbers in (result.epochs.items() if result else ()):
        for first, last in numbers.missing:
            held_here = len(seqs & set(range(first, last + 1))) if name == epoch else 0
            in_outbox += held_here
            unexplained += last - first + 1 - held_here
        if name == epoch:
            ranges = numbers.missing + numbers.lost + numbers.before_store
            covered = max([numbers.highest_seq, *(last for _, last in ranges)])
    if outbox is not None:
        tail = set(range(covered + 1, outbox.next_seq))
        in_outbox += len(tail & seqs)
        unexplained += len(tail - seqs)
    return unexplained, in_outbox


@dataclass
class TelemetryResult:
    window: tuple[float, float]  # wall clock, as the CPU marks at its ends were taken
    records: int  # stored in the window (by stored_at)
    records_per_s: float
    flushed_per_s: float  # the replicas' flush-to-flush rate in the window (StoredTelemetry.flush_rate): the goal
    by_replica: dict[str, int]  # records stored in the window, by the replica that stored them
    made_found: int  # records made in the window (their own time) found in S3, whenever they were stored
    made_not_found: int  # the devices' count of records appended in the window, less those found
    best_10s_per_s: float
    offered_per_s: float  # appended by the devices in the window (their own counters)
    lag_p50_s: float  # devices whose link stayed up
    lag_p99_s: float
    lag_samples: int  # the links-up records the percentiles are of
    lag_cut_p99_s: float  # the cut devices' records (their backlog waited for the link)
    lag_cut_max_s: float
    objects_per_min: float
    ingest_cpu_s: float
    broker_cpu_per_s: float
    telemetry_per_s_per_device: float  # PUBLISHes the broker handled per device: 4 a batch (see _broker_messages)
    statuses_per_s_per_device: float  # 2 a status (in from the device, out to the console)
    reports_per_s_per_device: float  # 2 a sync-state report
    stored: StoredTelemetry
    s3_requests: dict[str, int] = field(default_factory=dict)  # the S3 server's logged requests in the window
    cores: dict[str, float] = field(default_factory=dict)  # CPU seconds per second in the window, by group

    @property
    def broker_messages_per_s(self) -> float:
        """Per device, every kind: PUBLISHes in and out of the broker (their PUBACKs not counted)."""
        return self.telemetry_per_s_per_device + self.statuses_per_s_per_device + self.reports_per_s_per_device


@dataclass(frozen=True)
class Counts:
    """The devices' and the console's counters at one moment, to take a window's differences."""

    stats: list[sim_stats.SimStats]
    heard: tuple[int, int]  # statuses and sync-state reports the console received
    log_offset: int  # the S3 server's log size

    def batches(self) -> int:
        """Batches sent (resends too) so far, over every simulator."""
        return sum(s.telemetry.sent_batches + s.telemetry.resent_batches for s in self.stats)


def counts_now(sims: list[SimProcess], watch: FleetWatch, moto_log: Path) -> Counts:
    return Counts(sim_totals(sims), watch.message_counts(), log_size(moto_log))


def offered_per_s(before: Counts, after: Counts) -> float:
    """Records/s the devices appended between two counts: each simulator's own counter over the times its
    stats were written (not the times they were read: a stats file is up to a second old)."""
    was = {s.pid: s for s in before.stats}
    return sum((s.telemetry.appended - was[s.pid].telemetry.appended) / max(s.at - was[s.pid].at, 1e-9)
               for s in after.stats if s.pid in was)


def measure_telemetry(rig: FleetRig, marks: tuple[CpuMark, CpuMark], counts: tuple[Counts, Counts], devices: int,
                      cut: set[str]) -> TelemetryResult:
    """What S3 holds of the window and what it cost (run after the audit: everything made is stored by then).

    Args:
        rig: the fleet.
        marks: the CPU marks at the window's ends (their wall clocks are the window).
        counts: the counters at the window's ends.
        devices: how many devices.
        cut: the devices whose link was cut: their lag is reported apart (records made while the link
            was down wait for it by design).
    """
    client = rig.s3()
    stored = read_stored(client, BUCKET)
    start, end = marks[0].wall, marks[1].wall
    span = end - start
    records = stored.records_between(start, end)
    # Records made in the window (their own time), wherever and whenever they were stored; each lag is a
    # record's own time to its object's stored_at.
    made = [r for r in read_records(client, BUCKET, stored, start, math.inf) if start <= r.at < end]
    lags = [r.stored_at - r.at for r in made if r.device not in cut]
    cut_lags = [r.stored_at - r.at for r in made if r.device in cut]
    offered = offered_per_s(*counts)
    heard = (counts[1].heard[0] - counts[0].heard[0], counts[1].heard[1] - counts[0].heard[1])
    per_device = span * max(devices, 1)
    return TelemetryResult(
        window=(start, end), records=records, records_per_s=records / span, flushed_per_s=stored.flush_rate(start, end),
        by_replica=dict(stored.records_by_replica(start, end)), made_found=len(made),
        made_not_found=max(0, round(offered * span) - len(made)),
        best_10s_per_s=best_rate(stored, start, end), offered_per_s=offered,
        lag_p50_s=percentile(lags, 50), lag_p99_s=percentile(lags, 99), lag_samples=len(lags),
        lag_cut_p99_s=percentile(cut_lags, 99), lag_cut_max_s=max(cut_lags, default=float("nan")),
        objects_per_min=stored.objects_between(start, end) / span * 60,
        ingest_cpu_s=CpuMeter.used(*marks, "ingest"), broker_cpu_per_s=CpuMeter.per_s(*marks, "broker"),
        # No fleet identity may read $SYS in the shipped cloud.acl, so the broker's own counters are out of
        # reach: its PUBLISHes are counted from both sides instead. A batch: in from the device, out to one
        # replica (the shared subscription), its ack in from the replica, out to the device. A status or a
        # report: in from the device, out to its one subscriber here (the console).
        telemetry_per_s_per_device=4 * (counts[1].batches() - counts[0].batches()) / per_device,
        statuses_per_s_per_device=2 * heard[0] / per_device, reports_per_s_per_device=2 * heard[1] / per_device,
        stored=stored, s3_requests=dict(requests_logged(rig.store.workdir / "moto.log", counts[0].log_offset,
                                                         counts[1].log_offset)),
        cores={name: CpuMeter.per_s(*marks, name) for name in marks[1].seconds})


# -- the bench --------------------------------------------------------------------------------------------


def run(quick: bool, json_out: Path | None, plan: Plan, *, progress: Reporter = QUIET) -> int:
    """The whole run: rig, connect, telemetry with the cut, rollout, audit; the table and goals. Whatever
    fails, everything started is stopped (the watcher, the simulators, the replicas, the servers) and the
    devices' state on tmpfs removed."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgefleet-bench-fleet-")))
        with progress.task(f"rig: broker, S3, 2 replicas, {plan.devices} certificates, the model"):
            rig = stack.enter_context(FleetRig(tmp, plan.devices, model_bytes=plan.model_bytes))
            watch = FleetWatch(rig.client_settings(CONSOLE))
            stack.callback(watch.close)  # before start(): a start that fails stops the link too
            watch.start()
        meter = CpuMeter({"broker": [rig.broker_process()], "ingest": rig.ingest_processes(),
                          "s3": [rig.store_process()]})
        measured = _phases(plan, rig, watch, meter, progress)
        rows, goals = _report(plan, measured)
        notes = _notes(plan, measured)
    _emit(quick, json_out, rows, goals, notes, progress)
    return 0


def _emit(quick: bool, json_out: Path | None, rows: list[dict[str, object]], goals: list[Goal], notes: list[str],
          progress: Reporter) -> None:
    """The table, the goals, the notes under them, then the closing line (emit's own summary held back)."""
    emit("fleet", quick, rows, goals, json_out)
    for note in notes:
        Console().print(note, style="bold red", soft_wrap=True, highlight=False, markup=False)
    if json_out is not None:
        document = json.loads(json_out.read_text())
        json_out.write_text(json.dumps({**document, "notes": notes}, indent=1))
    progress.summary(summary_line("fleet", quick, goals, json_out))


@dataclass(frozen=True)
class Phase:
    """One phase of the run, for the simulators' loop lag: its span (wall clock), the machine's CPU
    seconds per second in it, and the simulators' lag figures over it (None: no stats in it)."""

    name: str
    span: tuple[float, float]
    machine_cpu: float
    lag: LagFigures | None


@dataclass
class Connected:
    """The connect phase: devices online, when the last simulator saw all its devices connected, the
    broker's CPU idle and while connecting, the phase's marks."""

    online: int
    all_at: float
    started: float
    broker_idle: float
    broker_connect: float
    marks: tuple[CpuMark, CpuMark]


@dataclass
class Measured:
    """Everything a run measured, for the report."""

    connected: Connected
    telemetry: TelemetryResult
    audit: AuditResult
    rollout: RolloutResult
    stats: list[sim_stats.SimStats]
    phases: list[Phase]
    rollout_reads_logged: tuple[int, int]  # GETs and HEADs in the S3 server's log over the rollout
    connect_spread_s: float


def _phases(plan: Plan, rig: FleetRig, watch: FleetWatch, meter: CpuMeter, progress: Reporter) -> Measured:
    devices = device_ids(rig.prefix, 0, plan.devices)
    spread = 2.0 if plan.devices <= 200 else 5.0
    options = SimOptions(records_per_s=plan.records_per_s, cut_share=CUT_SHARE, cut_at_s=plan.cut_at_s,
                         cut_for_s=plan.cut_for_s, connect_spread_s=spread)
    moto_log = rig.store.workdir / "moto.log"
    with progress.task(f"connect: {plan.devices} devices in {plan.processes} simulator processes"):
        sims = rig.start_simulators(0, plan.devices, plan.processes, options)
    sampler = LagSampler(lambda: sim_totals(sims)).start()
    try:
        connected = _connect(plan, sims, watch, meter, progress)
        with progress.task(f"telemetry: {plan.telemetry_s:g} s, {CUT_SHARE:.0%} of the links cut for "
                           f"{plan.cut_for_s:g} s"):
            time.sleep(max(0.0, connected.all_at + plan.settle_s - time.time()))
            w0, c0 = meter.mark(), counts_now(sims, watch, moto_log)
            time.sleep(max(0.0, connected.all_at + plan.settle_s + plan.telemetry_s - time.time()))
            w1, c1 = meter.mark(), counts_now(sims, watch, moto_log)
        with progress.task(f"rollout: {CANARY_PERCENT:g} % canary, then promote, to {plan.devices} devices"):
            log0 = log_size(moto_log)
            rolled = run_rollout(rig, watch, devices, version=2, max_concurrent=plan.max_concurrent,
                                 timeout_s=plan.rollout_timeout_s, meter=meter)
            logged = requests_logged(moto_log, log0, log_size(moto_log))
        stats = sim_totals(sims)
        c_marks = connected.marks
        phases = [Phase("connect", (connected.started, c_marks[1].wall), CpuMeter.per_s(*c_marks, MACHINE),
                        sampler.over(connected.started, c_marks[1].wall)),
                  Phase("telemetry", (w0.wall, w1.wall), CpuMeter.per_s(w0, w1, MACHINE),
                        sampler.over(w0.wall, w1.wall)),
                  Phase("rollout", rolled.span, rolled.cpu_machine, sampler.over(*rolled.span))]
    finally:
        sampler.close()
    with progress.task("drain the outboxes, stop the devices, then audit the bucket"):
        checked = stop_and_audit(rig, sims, drain_s=plan.drain_timeout_s)
        cut = {d for p in sims for d in cut_devices(p.devices, CUT_SHARE)}
        telemetry = measure_telemetry(rig, (w0, w1), (c0, c1), plan.devices, cut)
    return Measured(connected, telemetry, checked, rolled, stats, phases, (logged["GET"], logged["HEAD"]), spread)


def _connect(plan: Plan, sims: list[SimProcess], watch: FleetWatch, meter: CpuMeter, progress: Reporter) -> Connected:
    """Waits until every device is online; the broker's CPU idle (the 2 s before) and while they connect."""
    idle = meter.mark()
    time.sleep(2)
    idle_end = meter.mark()
    meter.groups["simulators"] = [psutil.Process(s.child.proc.pid) for s in sims]
    started = min(s.started_at for s in sims)
    with progress.task("connect: waiting for every device's online status"):
        wait_for(lambda: watch.online() >= plan.devices, plan.connect_timeout_s, 0.5)
        wait_for(lambda: _all_connected_at(sims) is not None, 10, 0.5)
    all_at = _all_connected_at(sims) or time.time()
    done = meter.mark()
    return Connected(watch.online(), all_at, started, CpuMeter.per_s(idle, idle_end, "broker"),
                     CpuMeter.per_s(idle_end, done, "broker"), (idle_end, done))


def _notes(plan: Plan, m: Measured) -> list[str]:
    """What a reader must know before trusting the figures: a simulator that lagged, a canary planned on
    fewer devices than were online, outboxes that did not drain."""
    notes = []
    cores = os.cpu_count() or 1
    for phase in m.phases:
        if phase.lag is not None and phase.lag.p99_s > LAGGED_S:
            busy = phase.machine_cpu >= SATURATED * cores
            notes.append(
                f"{phase.name}: the simulator lagged (loop p99 {phase.lag.p99_s:.1f} s, max {phase.lag.max_s:.1f} s): "
                f"lag and timing figures measure the load generator too; this machine's CPU was "
                f"{'saturated' if busy else 'not saturated'} (machine CPU {phase.machine_cpu:.2f} of {cores} cores)")
    r = m.rollout
    if r.known < plan.devices:  # 0: its plan line gave no count
        notes.append(f"the operator's CLI counted {r.known} of {plan.devices} devices online (a fresh online sync "
                     f"status), so the canary was planned on {r.known}: the others' statuses were stale or missing "
                     f"when it read them ({r.plan_line.split(' (', 1)[0]})")
    if not m.audit.drained:
        notes.append(f"the outboxes did not empty within {plan.drain_timeout_s:g} s of the drain: {m.audit.held} "
                     "records were still in them at the stop (counted as audit findings)")
    return notes


def _reach(phases: list[Phase]) -> str:
    """' (a minute's figures: telemetry's reach 5 s before it)': where a phase shorter than the
    simulator's lag window also holds the time before it."""
    back = [f"{p.name}'s {p.lag.covers_s:.0f} s" for p in phases if p.lag and p.lag.covers_s >= 1]
    return f" (a minute's figures, reaching back before the phase: {', '.join(back)})" if back else ""


def _reasons(failed: dict[str, str]) -> str:
    """The commonest reasons, counted: 'p95 inference latency ... (12); ...'."""
    counted = Counter(reason[:60] for reason in failed.values()).most_common(2)
    return "; ".join(f"{reason} ({n})" for reason, n in counted)


def _all_connected_at(sims: list[SimProcess]) -> float | None:
    """When the last simulator saw all its devices connected (wall clock); None until every one has."""
    stats = sim_totals(sims)
    times = [s.all_connected_at for s in stats]
    return None if len(stats) < len(sims) or None in times else max(t for t in times if t is not None)


# -- the report -------------------------------------------------------------------------------------------


Row = dict[str, object]


def _row(measure: str, value: object, unit: str = "") -> Row:
    return {"measure": measure, "value": value, "unit": unit}


def _report(plan: Plan, m: Measured) -> tuple[list[Row], list[Goal]]:
    rows = [*_connect_rows(plan, m), *_telemetry_rows(plan, m.telemetry), *_audit_rows(m.audit),
            *_rollout_rows(plan, m), *_simulator_rows(m)]
    return rows, _goals(plan, m)


def _connect_rows(plan: Plan, m: Measured) -> list[Row]:
    c = m.connected
    return [
        _row("devices connected (online sync status)", c.online, f"of {plan.devices}"),
        _row(f"time until all connected (includes the deliberate {m.connect_spread_s:g} s connect spread)",
             round(c.all_at - c.started, 1), "s"),
        _row("simulator processes", plan.processes),
        _row("broker CPU idle / while connecting", f"{c.broker_idle:.3f} / {c.broker_connect:.3f}", "CPU s/s"),
    ]


def _telemetry_rows(plan: Plan, t: TelemetryResult) -> list[Row]:
    n, span = plan.devices, t.window[1] - t.window[0]
    puts = t.s3_requests.get("PUT", 0)
    handled = t.broker_messages_per_s * n
    return [
        _row(f"telemetry window ({plan.records_per_s:g} records/s per device)", round(span, 1), "s"),
        _row("records appended by the devices (offered)", round(t.offered_per_s, 1), "records/s"),
        _row("records into S3 (stored in the window)", round(t.records_per_s, 1), "records/s"),
        _row("records into S3, flush to flush (each replica's flushes in the window)", round(t.flushed_per_s, 1),
             "records/s"),
        _row("records into S3 by replica (stored in the window)",
             " / ".join(f"{k or 'per-batch layout'} {v}" for k, v in sorted(t.by_replica.items())), "records"),
        _row("records made in the window, found in S3 (stored whenever)", t.made_found, "records"),
        _row("records made in the window, not found in S3 (the devices' counters less those found)",
             t.made_not_found, "records (counters read up to a tick apart from the window: the audit counts loss)"),
        _row("records into S3, busiest 10 s", round(t.best_10s_per_s), "records/s"),
        _row("end-to-end lag p50 / p99, links up (record's time -> stored)", f"{t.lag_p50_s:.2f} / {t.lag_p99_s:.2f}",
             f"s (of {t.lag_samples} records)"),
        _row(f"end-to-end lag p99 / max, the {CUT_SHARE:.0%} cut devices",
             f"{t.lag_cut_p99_s:.2f} / {t.lag_cut_max_s:.2f}", "s"),
        _row("S3 objects per minute (written by the replicas, from the indexes)", round(t.objects_per_min),
             "objects/min"),
        _row("S3 PUTs/s (the S3 server's log: every PUT, refused too)",
             round(puts / span, 1) if t.s3_requests else "not logged",
             f"PUT/s ({sum(t.s3_requests.values())} requests in the window)"),
        _row("ingest CPU per record (2 replicas)", round(t.ingest_cpu_s / max(t.records, 1) * 1e6, 1), "µs"),
        _row("broker CPU during telemetry", round(t.broker_cpu_per_s, 3), "CPU s/s"),
        _row("CPU in the telemetry window: " + " / ".join(t.cores), " / ".join(f"{v:.2f}" for v in t.cores.values()),
             f"CPU s/s (of {os.cpu_count()} cores)"),
        _row("broker CPU per device during telemetry", round(t.broker_cpu_per_s / n * 1e6, 1), "µs/s"),
        _row("broker PUBLISHes/s per device: telemetry (4 a batch: in, to a replica, its ack in, out)",
             round(t.telemetry_per_s_per_device, 3), "msg/s"),
        _row("broker PUBLISHes/s per device: statuses (3 services; in, out to the console)",
             round(t.statuses_per_s_per_device, 3), "msg/s"),
        _row("broker PUBLISHes/s per device: sync-state reports (in, out to the console)",
             round(t.reports_per_s_per_device, 3), "msg/s"),
        _row("broker PUBLISHes/s per device, in all (PUBACKs not counted)", round(t.broker_messages_per_s, 3),
             "msg/s"),
        _row("broker CPU per PUBLISH handled", round(t.broker_cpu_per_s / max(handled, 1e-9) * 1e6, 2), "µs"),
    ]


def _audit_rows(a: AuditResult) -> list[Row]:
    return [
        _row("audit: records in S3", a.received, "records"),
        _row("audit: devices in S3", a.devices, f"of {a.expected}"),
        _row("audit: missing / lost / duplicates", f"{a.missing} / {a.lost} / {a.duplicates}", "records"),
        _row("audit: copies of resent batches (harmless) / declared lost", f"{a.copies} / {a.declared_lost}"),
        _row("audit: still in the outboxes after the drain (a finding)", a.held,
             "records" + ("" if a.drained else "  NOT DRAINED")),
    ]


def _rollout_rows(plan: Plan, m: Measured) -> list[Row]:
    r, n = m.rollout, plan.devices
    canary = r.canary_active_all_s()
    after = sorted(r.active_after_promote_s.values())
    reached = [after[math.ceil(share * n) - 1] if len(after) >= math.ceil(share * n) else float("nan")
               for share in (0.5, 0.99)]
    return [
        _row("devices the operator's CLI counted online (the canary's base)", r.known,
             f"of {n}" + ("  LOWER: stale or missing statuses" if r.known < n else "")),
        _row("rollout canary plan", r.plan_line.split(" (", 1)[0]),
        _row("rollout promote pacing (the CLI's line)", r.promote_line or "no pacing line"),
        _row("canary devices / expected (5 % of the devices, rounded up)", len(r.canary),
             f"of {membership.canary_size(CANARY_PERCENT / 100, n)}"),
        _row("canary: first ACTIVE p50 / p99 (never ACTIVE: inf)",
             f"{percentile(canary, 50):.2f} / {percentile(canary, 99):.2f}", "s from start"),
        _row("canary: verdict p50 / p99 (passed)", f"{percentile(r.canary_verdict_s.values(), 50):.2f} / "
             f"{percentile(r.canary_verdict_s.values(), 99):.2f} ({r.canary_passed} of {len(r.canary)})",
             "s from start"),
        _row("time to 50 % / 99 % / 100 % of devices ACTIVE after the promote (canary devices count at 0 s; "
             "100 %: inf unless every device ends ACTIVE serving it)",
             f"{reached[0]:.1f} / {reached[1]:.1f} / {r.all_active_s(n):.1f}", "s"),
        _row("latest states on the rollout", ", ".join(f"{k} {v}" for k, v in sorted(r.final_states.items()))),
        _row("latest reports: ACTIVE on the rollout serving its version", r.serving_active, f"of {n}"),
        _row("canary verdicts not passed (every device judges its switch)", len(r.failed_verdicts),
             _reasons(r.failed_verdicts)),
        _row("retained sync states read afterwards: ACTIVE on the rollout serving its version", r.retained_active,
             f"of {n}"),
        _row("peak concurrent downloads (devices between DOWNLOADING and VERIFIED)", r.peak_downloads,
             f"(--max-concurrent-downloads {plan.max_concurrent})"),
        _row("registry requests (every S3 call) / artifact bytes downloaded (the rollout, the devices' count)",
             f"{r.registry_requests} / {r.registry_bytes}", "manifest and signature bytes not included"),
        _row("registry requests / artifact bytes per device",
             f"{r.registry_requests / n:.2f} / {round(r.registry_bytes / n)}", "requests / bytes"),
        _row("S3 server's log: GET / HEAD requests during the rollout (the devices' and the operator's CLI)",
             " / ".join(str(n) for n in m.rollout_reads_logged), "requests (beside the devices' own count)"),
        _row("broker CPU: canary / promote", f"{r.cpu_canary:.3f} / {r.cpu_promote:.3f}", "CPU s/s"),
    ]


def _simulator_rows(m: Measured) -> list[Row]:
    stats, phases = m.stats, m.phases
    registry_errors = Counter[str]()
    for s in stats:
        registry_errors.update(s.registry.errors)
    return [
        _row("registry errors (the devices' failed attempts, the whole run)", sum(registry_errors.values()),
             ", ".join(f"{k} {v}" for k, v in registry_errors.most_common(3))),
        _row("simulator memory per device: steady / peak (RSS only, worst process)",
             f"{max((s.per_device_bytes for s in stats), default=0)} / {_peak_per_device(stats)}", "bytes"),
        _row("devices' own state per device (outbox + model store on tmpfs: their flash; not in the goal)",
             max((s.per_device_state_bytes for s in stats), default=0), "bytes"),
        _row("simulator RSS now / peak (all processes)",
             f"{sum(s.rss_bytes for s in stats)} / {sum(s.peak_rss_bytes for s in stats)}", "bytes"),
        _row("simulator loop lag p99 / max: " + " | ".join(p.name for p in phases), " | ".join(
            f"{p.lag.p99_s:.2f} / {p.lag.max_s:.2f}" if p.lag else "n/a" for p in phases), "s" + _reach(phases)),
        _row("machine CPU: " + " | ".join(p.name for p in phases), " | ".join(f"{p.machine_cpu:.2f}" for p in phases),
             f"CPU s/s (of {os.cpu_count()} cores)"),
        _row("simulator: failed tasks / refused publishes / queued now",
             f"{sum(s.failed for s in stats)} / {sum(s.link.refused for s in stats)} / "
             f"{sum(s.link.queued for s in stats)}"),
        _row("simulator links: connect failures / sessions lost (cuts too)",
             f"{sum(s.link.connect_failures for s in stats)} / {sum(s.link.losses for s in stats)}"),
    ]


def _peak_per_device(stats: list[sim_stats.SimStats]) -> int:
    """The peak (VmHWM, which trimming does not lower) per device, the worst process."""
    return max((s.per_device_peak_bytes for s in stats), default=0)


def _goals(plan: Plan, m: Measured) -> list[Goal]:
    n, t, r = plan.devices, m.telemetry, m.rollout
    target = n * plan.records_per_s
    goal = n * GOAL_RECORDS_PER_S  # the 5,000 for 1,000 devices
    return [
        Goal(f"{n} devices connected", m.connected.online, n, "devices"),
        Goal("100 % ACTIVE serving v2 after promote (latest and retained; rolled back: inf)", r.all_active_s(n), 60,
             "s", "max"),
        Goal("canary devices active, p99 (never ACTIVE: inf)", percentile(r.canary_active_all_s(), 99), 10, "s",
             "max"),
        Goal("canary size exact (5 % of the devices, rounded up)", len(r.canary) if len(r.canary) ==
             membership.canary_size(CANARY_PERCENT / 100, n) else -1, membership.canary_size(CANARY_PERCENT / 100, n),
             "devices"),
        Goal(f"records/s offered by the devices (99 % of {plan.records_per_s:g}/s x {n})", t.offered_per_s,
             RATE_SHARE * target, "records/s"),
        Goal(f"records/s stored into S3 in the window, flush to flush, 2 replicas ({GOAL_RECORDS_PER_S:g}/s x {n})",
             t.flushed_per_s, goal, "records/s"),
        Goal("replicas that stored records in the window", sum(v > 0 for k, v in t.by_replica.items() if k), 2,
             "replicas"),
        Goal("end-to-end lag p99 (links up)", t.lag_p99_s, 5, "s", "max"),
        Goal("audit: missing + held + lost + duplicates (+ devices absent)", m.audit.findings, 0, "records", "max"),
        Goal("memory per simulated device (peak RSS only, worst process; tmpfs state shown beside)",
             _peak_per_device(m.stats) / MB, 1, "MB", "max"),
    ]
