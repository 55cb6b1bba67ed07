"""`edgefleet bench fleet`: a thousand simulated devices against the cloud side on this machine, in one run.

The rig (edgefleet/bench/fleet_rig.py): the TLS fleet broker as shipped (cloud.conf, cloud.acl), moto,
two cloud_ingest replicas, P `edgefleet simulate run` processes sharing the devices; the observers
(edgefleet/bench/fleet_watch.py): the console's view of the broker, CPU meters, the telemetry read back
from S3. The phases, in order:

1. connect: every device online (its retained sync status), the broker's CPU while they connect.
2. telemetry: every device appends records at --records-per-s from its start for the telemetry window;
   10 % of the devices lose their link for --cut-for-s inside it. Measured from what S3 holds: records/s
   stored in the window, end-to-end lag (a record's own time to its flush's stored_at), S3 objects per
   minute, ingest CPU per record. Telemetry goes on through the rollout (a fleet rolls out while it
   reports); the audit comes last.
3. rollout: v2 of a small signed ONNX model through `edgefleet rollout start --canary 5` (paced by
   --max-concurrent-downloads), every canary device's verdict, then `edgefleet rollout promote`, until
   every device is active: canary p50/p99, time to 50/99/100 % active after the promote, registry
   requests and bytes, the broker's CPU.

The per-device costs in the JSON (connections, broker messages/s, broker CPU, ingest CPU per record, S3
objects per minute and PUTs/s, registry requests and bytes per rollout) are what docs/scale.md sizes 10k
and 100k devices from. Beside them, the load generator's own health: the simulators' peak memory per
device (the goal), their devices' state on tmpfs (the devices' flash, not in the goal), their loop lag
per phase, failed tasks, refused publishes and registry errors. Under the goals, notes say when a figure
cannot be taken at face value: a simulator loop that lagged (its timings then measure the load
generator too), or a canary the operator's CLI planned on fewer devices than were online.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console

from edgefleet import fleet_rollout
from edgefleet.audit import audit
from edgefleet.bench.fleet_rig import BUCKET, CONSOLE, OPERATOR, FleetRig, SimOptions, SimProcess, device_ids
from edgefleet.bench.fleet_watch import (
    MACHINE,
    CpuMeter,
    FleetWatch,
    LagFigures,
    LagSampler,
    StoredTelemetry,
    best_rate,
    held_in_outbox,
    index_count,
    log_size,
    percentile,
    read_records,
    read_stored,
    requests_logged,
    wait_for,
)
from edgefleet.bench.report import Goal, emit, summary_line
from edgefleet.progress import QUIET, Reporter
from edgefleet.simulate import stats as sim_stats
from edgefleet.simulate.fleet import cut_devices
from shared.schemas import RolloutPhase, SyncState

CANARY_PERCENT = 5.0
CUT_SHARE = 0.10
MB = 1_000_000
LAGGED_S = 1.0  # a simulator loop p99 above this in a phase: its timings measure the load generator too
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

    @property
    def cut_at_s(self) -> float:
        """When the cut starts, after every device of a process connected (the simulator's --cut-at-s):
        a quarter into what the window leaves around it, so the window holds the catch-up too."""
        return self.settle_s + max(0.0, self.telemetry_s - self.cut_for_s) / 4


def plan_for(quick: bool, devices: int | None, processes: int | None, telemetry_s: float | None,
             cut_for_s: float | None, records_per_s: float, model_bytes: int, max_concurrent: int) -> Plan:
    """The run's plan: the issue's sizes, or --quick's small ones, with what the caller overrides."""
    devices = devices or (50 if quick else 1000)
    return Plan(
        devices=devices, processes=processes or (1 if devices <= 200 else max(2, devices // 500)),
        telemetry_s=telemetry_s or (20.0 if quick else 120.0), cut_for_s=cut_for_s or (8.0 if quick else 60.0),
        records_per_s=records_per_s, model_bytes=model_bytes, max_concurrent=max_concurrent,
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


def queued(processes: list[SimProcess]) -> int | None:
    """Records still in the devices' outboxes, over every simulator; None until each has written stats."""
    stats = sim_totals(processes)
    return sum(s.telemetry.queued for s in stats) if len(stats) == len(processes) else None


# -- phases (the 50-device test runs the same ones) ------------------------------------------------------


@dataclass
class RolloutResult:
    rollout_id: str
    plan_line: str
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
    retained_active: int = 0  # devices whose retained sync state, read afresh afterwards, is ACTIVE on it
    cpu_canary: float = 0.0  # broker CPU seconds per second
    cpu_promote: float = 0.0
    cpu_machine: float = float("nan")  # the whole machine's CPU seconds per second, start to the last ACTIVE
    span: tuple[float, float] = (0.0, 0.0)  # wall clock: the start command to the last ACTIVE (or the timeout)
    registry_requests: int = 0
    registry_bytes: int = 0


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
        What happened, with times from the reports' own clocks (this machine's).
    """
    processes = processes if processes is not None else rig.simulators
    began = time.time()
    before = _registry(processes)
    mark0 = meter.mark() if meter else None
    rollout_id, stderr = rig.start_rollout(version, CANARY_PERCENT, max_concurrent)
    wait_for(lambda: watch.rollout(rollout_id) is not None, 30)
    started = watch.rollout(rollout_id)
    if started is None:
        raise RuntimeError(f"rollout {rollout_id} was published but never reached the watcher")
    canary = list(started.target.canary_devices)
    issued = started.issued_at
    wait_for(lambda: set(canary) <= watch.verdicts(rollout_id).keys(), timeout_s)
    active = watch.first_at(rollout_id, SyncState.ACTIVE)
    verdicts = watch.verdicts(rollout_id)
    states_before = watch.latest_states(rollout_id)
    mark1 = meter.mark() if meter else None
    rig.promote(max_concurrent)
    wait_for(lambda: (r := watch.rollout(rollout_id)) is not None and r.phase is RolloutPhase.PROMOTED, 30)
    promoted = watch.rollout(rollout_id)
    promoted_at = promoted.issued_at if promoted is not None else time.time()
    complete = wait_for(lambda: set(devices) <= watch.first_at(rollout_id, SyncState.ACTIVE).keys(), timeout_s)
    mark2 = meter.mark() if meter else None
    ended = time.time()
    # A late reader, as `edgefleet rollout status` reads the fleet: the retained states alone (its 2 s
    # also let every simulator write its stats once more, so the registry counts hold the last downloads).
    retained = fleet_rollout.states(rig.client_settings(OPERATOR), wait_s=2)
    after = _registry(processes)
    final = watch.first_at(rollout_id, SyncState.ACTIVE)
    line = next((x for x in stderr.splitlines() if x.startswith("canary")), stderr.strip())
    result = RolloutResult(
        rollout_id=rollout_id, plan_line=line, known=_known_of(line), canary=canary,
        canary_active_s={d: active[d] - issued for d in canary if d in active},
        canary_verdict_s={d: verdicts[d][0] - issued for d in canary if d in verdicts},
        canary_passed=sum(verdicts[d][1] for d in canary if d in verdicts),
        active_after_promote_s={d: max(0.0, final[d] - promoted_at) for d in devices if d in final},
        states_before_promote=states_before, promoted_at=promoted_at, complete=complete,
        retained_active=sum(r.rollout_id == rollout_id and r.state is SyncState.ACTIVE for r in retained.values()),
        final_states=dict(Counter(s.value for s in watch.latest_states(rollout_id).values())),
        failed_verdicts=watch.failed_verdicts(rollout_id),
        registry_requests=sum(after[0].values()) - sum(before[0].values()), registry_bytes=after[1] - before[1],
        span=(began, ended))
    if meter and mark0 and mark1 and mark2:
        result.cpu_canary = meter.per_s(mark0, mark1, "broker")
        result.cpu_promote = meter.per_s(mark1, mark2, "broker")
        result.cpu_machine = meter.per_s(mark0, mark2, MACHINE)
    return result


def _known_of(line: str) -> int:
    """'canary: 3 of 49 devices (...)' -> 49 (0 where the line says no count)."""
    words = line.split()
    try:
        return int(words[words.index("of") + 1])
    except (ValueError, IndexError):
        return 0


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
    missing: int  # unexplained: neither in S3, nor declared lost, nor still in the device's outbox
    held: int  # not yet sent when the device stopped: still in its outbox (nothing lost)
    lost: int  # acknowledged by the store and not in it
    duplicates: int
    declared_lost: int
    copies: int
    queued_at_stop: int | None
    worst: list[str] = field(default_factory=list)  # the first devices with a finding, for the table

    @property
    def clean(self) -> bool:
        return self.missing == 0 and self.lost == 0 and self.duplicates == 0 and self.devices == self.expected

    @property
    def findings(self) -> int:
        return self.missing + self.lost + self.duplicates + (self.expected - self.devices)


def stop_and_audit(rig: FleetRig, processes: list[SimProcess], settle_s: float = 30.0) -> AuditResult:
    """Stops the simulators (SIGTERM: each closes its devices), waits until the replicas have written what
    they took (the bucket's index count steady for 3 s, at most `settle_s`), then audits the bucket. A
    number that is neither in S3 nor declared lost is explained only by the device's outbox still holding
    it (in the outbox's current epoch): what the device never managed to send, not something lost."""
    rig.stop_simulators(processes)
    queued_at_stop = queued(processes)
    client = rig.s3()
    counts = [index_count(client, BUCKET)]
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and (len(counts) < 4 or len(set(counts[-4:])) > 1):
        time.sleep(1.0)
        counts.append(index_count(client, BUCKET))
    found = audit(client, BUCKET)
    stored = read_stored(client, BUCKET)
    outboxes = {d: held_in_outbox(p.outbox(d)) for p in processes for d in p.devices}
    missing = held = 0
    worst: list[str] = []
    for device, result in found.items():
        epoch, seqs = outboxes.get(device) or ("", set())
        unexplained = 0
        for name, numbers in result.epochs.items():
            for first, last in numbers.missing:
                in_outbox = len(seqs & set(range(first, last + 1))) if name == epoch else 0
                held += in_outbox
                unexplained += last - first + 1 - in_outbox
        missing += unexplained
        if (unexplained or result.lost_count or result.duplicates) and len(worst) < 5:
            worst.append(device)
    expected = [d for p in processes for d in p.devices]
    for device in expected:
        if device not in found and (never_stored := outboxes.get(device)) is not None:
            held += len(never_stored[1])
    return AuditResult(
        devices=sum(d in found for d in expected), expected=len(expected),
        received=sum(d.received for d in found.values()), missing=missing, held=held,
        lost=sum(d.lost_count for d in found.values()), duplicates=sum(d.duplicates for d in found.values()),
        declared_lost=sum(sum(d.declared_lost.values()) for d in found.values()), copies=stored.copies,
        queued_at_stop=queued_at_stop, worst=worst)


@dataclass
class TelemetryResult:
    window: tuple[float, float]
    records: int  # stored in the window (by stored_at)
    records_per_s: float
    made_stored_per_s: float  # made in the window (by the record's own time) and in S3: end to end
    best_10s_per_s: float
    offered_per_s: float
    lag_p50_s: float  # devices whose link stayed up
    lag_p99_s: float
    lag_samples: int
    lag_cut_p99_s: float  # the cut devices' records (their backlog waited for the link)
    lag_cut_max_s: float
    objects_per_min: float
    ingest_cpu_s: float
    broker_cpu_per_s: float
    messages_per_s_per_device: float  # telemetry batches and their acknowledgements
    stored: StoredTelemetry
    statuses_per_s_per_device: float = float("nan")  # device statuses (every service) the console received
    reports_per_s_per_device: float = float("nan")  # sync-state reports the console received
    s3_requests: dict[str, int] = field(default_factory=dict)  # the S3 server's logged requests in the window
    cores: dict[str, float] = field(default_factory=dict)  # CPU seconds per second in the window, by group


def measure_telemetry(rig: FleetRig, window: tuple[float, float], cpu: tuple[float, float],
                      counts: tuple[int, int], devices: int, cut: set[str]) -> TelemetryResult:
    """What S3 holds of the window (wall clock) and what it cost.

    Args:
        rig: the fleet.
        window: its start and end (wall clock).
        cpu: the replicas' CPU seconds and the broker's CPU seconds per second over the window.
        counts: the batches the devices sent in the window, and the records they appended in it.
        devices: how many devices.
        cut: the devices whose link was cut: their lag is reported apart (records made while the link
            was down wait for it by design).
    """
    client = rig.s3()
    stored = read_stored(client, BUCKET)
    start, end = window
    span = end - start
    records = stored.records_between(start, end)
    # Records made in the window, wherever they were stored: its objects and the minute after (a cut
    # device's backlog lands after the window). Each lag is a record's own time to its object's stored_at.
    made = [r for r in read_records(client, BUCKET, stored, start, end + 60) if start <= r.at < end]
    lags = [r.stored_at - r.at for r in made if r.device not in cut]
    cut_lags = [r.stored_at - r.at for r in made if r.device in cut]
    batches, appended = counts
    return TelemetryResult(
        window=window, records=records, records_per_s=records / span, made_stored_per_s=len(made) / span,
        best_10s_per_s=best_rate(stored, start, end), offered_per_s=appended / span,
        lag_p50_s=percentile(lags, 50), lag_p99_s=percentile(lags, 99), lag_samples=len(made),
        lag_cut_p99_s=percentile(cut_lags, 99), lag_cut_max_s=max(cut_lags, default=float("nan")),
        objects_per_min=stored.objects_between(start, end) / span * 60, ingest_cpu_s=cpu[0],
        broker_cpu_per_s=cpu[1],
        # A batch in, its acknowledgement out (both QoS 1: each also a PUBACK the broker handles).
        messages_per_s_per_device=2 * batches / span / max(devices, 1), stored=stored)


# -- the bench --------------------------------------------------------------------------------------------


def run(quick: bool, json_out: Path | None, plan: Plan, *, progress: Reporter = QUIET) -> int:
    """The whole run: rig, connect, telemetry with the cut, rollout, audit; the table and goals."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-fleet-") as tmp:
        rig = FleetRig(Path(tmp), plan.devices, model_bytes=plan.model_bytes)
        watch: FleetWatch | None = None
        try:
            with progress.task(f"rig: broker, S3, 2 replicas, {plan.devices} certificates, the model"):
                rig.start()
                watch = FleetWatch(rig.client_settings(CONSOLE)).start()
            meter = CpuMeter({"broker": [rig.broker_process()], "ingest": rig.ingest_processes(),
                              "s3": [rig.store_process()]})
            return _phases(quick, json_out, plan, rig, watch, meter, progress)
        finally:
            if watch is not None:
                watch.close()
            rig.close()


@dataclass(frozen=True)
class Phase:
    """One phase of the run, for the simulators' loop lag: its span (wall clock), the machine's CPU
    seconds per second in it, and the simulators' lag figures over it (None: no stats in it)."""

    name: str
    span: tuple[float, float]
    machine_cpu: float
    lag: LagFigures | None


def _phases(quick: bool, json_out: Path | None, plan: Plan, rig: FleetRig, watch: FleetWatch, meter: CpuMeter,
            progress: Reporter) -> int:
    devices = device_ids(rig.prefix, 0, plan.devices)
    options = SimOptions(records_per_s=plan.records_per_s, cut_share=CUT_SHARE, cut_at_s=plan.cut_at_s,
                         cut_for_s=plan.cut_for_s, connect_spread_s=2.0 if quick else 5.0)
    idle = meter.mark()
    time.sleep(2)
    idle_end = meter.mark()
    moto_log = rig.store.workdir / "moto.log"
    with progress.task(f"connect: {plan.devices} devices in {plan.processes} simulator processes"):
        sims = rig.start_simulators(0, plan.devices, plan.processes, options)
        sampler = LagSampler(lambda: sim_totals(sims)).start()
        try:
            meter.groups["simulators"] = [psutil.Process(s.child.proc.pid) for s in sims]
            t0 = min(s.started_at for s in sims)
            wait_for(lambda: watch.online() >= plan.devices, plan.connect_timeout_s, 0.5)
            wait_for(lambda: _all_connected_at(sims) is not None, 10, 0.5)
            all_at = _all_connected_at(sims) or time.time()
            connected = watch.online()
            mark_connected = meter.mark()
            connected_wall = time.time()
        except BaseException:
            sampler.close()
            raise
    try:
        window = (all_at + plan.settle_s, all_at + plan.settle_s + plan.telemetry_s)
        with progress.task(f"telemetry: {plan.telemetry_s:g} s, {CUT_SHARE:.0%} of the links cut for "
                           f"{plan.cut_for_s:g} s"):
            time.sleep(max(0.0, window[0] - time.time()))
            w0, counts0, heard0, log0 = meter.mark(), _counts(sims), watch.message_counts(), log_size(moto_log)
            time.sleep(max(0.0, window[1] - time.time()))
            w1, counts1, heard1, log1 = meter.mark(), _counts(sims), watch.message_counts(), log_size(moto_log)
        with progress.task(f"rollout: {CANARY_PERCENT:g} % canary, then promote, to {plan.devices} devices"):
            rolled = run_rollout(rig, watch, devices, version=2, max_concurrent=plan.max_concurrent,
                                 timeout_s=plan.rollout_timeout_s, meter=meter)
        stats = sim_totals(sims)
        phases = [Phase("connect", (t0, connected_wall), CpuMeter.per_s(idle_end, mark_connected, MACHINE),
                        sampler.over(t0, connected_wall)),
                  Phase("telemetry", window, CpuMeter.per_s(w0, w1, MACHINE), sampler.over(*window)),
                  Phase("rollout", rolled.span, rolled.cpu_machine, sampler.over(*rolled.span))]
    finally:
        sampler.close()
    with progress.task("stop the devices, then audit the bucket"):
        checked = stop_and_audit(rig, sims)
        cut = {d for p in sims for d in cut_devices(p.devices, CUT_SHARE)}
        telemetry = measure_telemetry(rig, window, (CpuMeter.used(w0, w1, "ingest"), CpuMeter.per_s(w0, w1, "broker")),
                                      (counts1[0] - counts0[0], counts1[1] - counts0[1]), plan.devices, cut)
        telemetry.cores = {name: CpuMeter.per_s(w0, w1, name) for name in (*meter.groups, MACHINE)}
        span = window[1] - window[0]
        telemetry.statuses_per_s_per_device = (heard1[0] - heard0[0]) / span / plan.devices
        telemetry.reports_per_s_per_device = (heard1[1] - heard0[1]) / span / plan.devices
        telemetry.s3_requests = dict(requests_logged(moto_log, log0, log1))
    broker_cpu = (CpuMeter.per_s(idle, idle_end, "broker"), CpuMeter.per_s(idle_end, mark_connected, "broker"))
    rows, goals = _report(plan, connected, all_at - t0, telemetry, checked, rolled, stats, broker_cpu, phases)
    notes = _notes(plan, rolled, phases)
    # The notes go under the goals, before the closing line: emit's own summary is held back for them.
    emit("fleet", quick, rows, goals, json_out)
    for note in notes:
        Console().print(note, style="bold red", soft_wrap=True, highlight=False, markup=False)
    if json_out is not None:
        document = json.loads(json_out.read_text())
        json_out.write_text(json.dumps({**document, "notes": notes}, indent=1))
    progress.summary(summary_line("fleet", quick, goals, json_out))
    return 0


def _notes(plan: Plan, r: RolloutResult, phases: list[Phase]) -> list[str]:
    """What a reader must know before trusting the figures: a simulator that lagged, a canary planned on
    fewer devices than were online."""
    notes = []
    cores = os.cpu_count() or 1
    for phase in phases:
        if phase.lag is not None and phase.lag.p99_s > LAGGED_S:
            busy = phase.machine_cpu >= SATURATED * cores
            notes.append(
                f"{phase.name}: the simulator lagged (loop p99 {phase.lag.p99_s:.1f} s, max {phase.lag.max_s:.1f} s): "
                f"lag and timing figures measure the load generator too; this machine's CPU was "
                f"{'saturated' if busy else 'not saturated'} (machine CPU {phase.machine_cpu:.2f} of {cores} cores)")
    if r.known < plan.devices:  # 0: its plan line gave no count
        notes.append(f"the operator's CLI counted {r.known} of {plan.devices} devices online (a fresh online sync "
                     f"status), so the canary was planned on {r.known}: the others' statuses were stale or missing "
                     f"when it read them ({r.plan_line.split(' (', 1)[0]})")
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


def _counts(sims: list[SimProcess]) -> tuple[int, int]:
    """Batches sent (resends too) and records appended so far, over every simulator."""
    stats = sim_totals(sims)
    return (sum(s.telemetry.sent_batches + s.telemetry.resent_batches for s in stats),
            sum(s.telemetry.appended for s in stats))


def _report(plan: Plan, connected: int, connected_s: float, t: TelemetryResult, a: AuditResult, r: RolloutResult,
            stats: list[sim_stats.SimStats], broker_idle_connect: tuple[float, float], phases: list[Phase],
            ) -> tuple[list[dict[str, object]], list[Goal]]:
    n = plan.devices
    span = t.window[1] - t.window[0]
    # The goal's memory is the peak (VmHWM, which trimming does not lower) per device, the worst process.
    per_device_bytes = max((s.per_device_bytes for s in stats), default=0)
    per_device_peak = max((s.per_device_peak_bytes for s in stats), default=0)
    per_device_state = max((s.per_device_state_bytes for s in stats), default=0)
    registry_errors = Counter[str]()
    for s in stats:
        registry_errors.update(s.registry.errors)
    puts = t.s3_requests.get("PUT", 0)
    telemetry_msgs = t.messages_per_s_per_device
    all_msgs = telemetry_msgs + t.statuses_per_s_per_device + t.reports_per_s_per_device
    canary_active = list(r.canary_active_s.values())
    after = sorted(r.active_after_promote_s.values())

    def reached(share: float) -> float:
        need = math.ceil(share * n)
        return after[need - 1] if len(after) >= need else float("nan")

    rows: list[dict[str, object]] = [
        {"measure": "devices connected (online sync status)", "value": connected, "unit": f"of {n}"},
        {"measure": "time until all connected", "value": round(connected_s, 1), "unit": "s"},
        {"measure": "simulator processes", "value": plan.processes, "unit": ""},
        {"measure": "broker CPU idle / while connecting", "value": f"{broker_idle_connect[0]:.3f} / "
                    f"{broker_idle_connect[1]:.3f}", "unit": "CPU s/s"},
        {"measure": f"telemetry window ({plan.records_per_s:g} records/s per device)",
         "value": round(t.window[1] - t.window[0], 1), "unit": "s"},
        {"measure": "records appended by the devices (offered)", "value": round(t.offered_per_s),
         "unit": "records/s"},
        {"measure": "records made in the window, in S3 (end to end)", "value": round(t.made_stored_per_s),
         "unit": "records/s"},
        {"measure": "records into S3 (stored in the window)", "value": round(t.records_per_s), "unit": "records/s"},
        {"measure": "records into S3, busiest 10 s", "value": round(t.best_10s_per_s), "unit": "records/s"},
        {"measure": "end-to-end lag p50 / p99, links up (record's time -> stored)",
         "value": f"{t.lag_p50_s:.2f} / {t.lag_p99_s:.2f}", "unit": f"s (of {t.lag_samples} records)"},
        {"measure": f"end-to-end lag p99 / max, the {CUT_SHARE:.0%} cut devices",
         "value": f"{t.lag_cut_p99_s:.2f} / {t.lag_cut_max_s:.2f}", "unit": "s"},
        {"measure": "S3 objects per minute (written by the replicas, from the indexes)",
         "value": round(t.objects_per_min), "unit": "objects/min"},
        {"measure": "S3 PUTs/s (the S3 server's log: every PUT, refused too)",
         "value": round(puts / span, 1) if t.s3_requests else "not logged",
         "unit": f"PUT/s ({sum(t.s3_requests.values())} requests in the window)"},
        {"measure": "ingest CPU per record (2 replicas)",
         "value": round(t.ingest_cpu_s / max(t.records, 1) * 1e6, 1), "unit": "µs"},
        {"measure": "broker CPU during telemetry", "value": round(t.broker_cpu_per_s, 3), "unit": "CPU s/s"},
        {"measure": "CPU in the telemetry window: " + " / ".join(t.cores), "value": " / ".join(
            f"{v:.2f}" for v in t.cores.values()), "unit": f"CPU s/s (of {os.cpu_count()} cores)"},
        {"measure": "broker CPU per device during telemetry", "value": round(t.broker_cpu_per_s / n * 1e6, 1),
         "unit": "µs/s"},
        {"measure": "broker messages/s per device: telemetry batches + acks", "value": round(telemetry_msgs, 3),
         "unit": "msg/s"},
        {"measure": "broker messages/s per device: statuses (3 services; received by the console)",
         "value": round(t.statuses_per_s_per_device, 3), "unit": "msg/s"},
        {"measure": "broker messages/s per device: sync-state reports (received by the console)",
         "value": round(t.reports_per_s_per_device, 3), "unit": "msg/s"},
        {"measure": "broker messages/s per device, in all (each QoS 1 also a PUBACK)", "value": round(all_msgs, 3),
         "unit": "msg/s"},
        {"measure": "audit: records in S3", "value": a.received, "unit": "records"},
        {"measure": "audit: devices in S3", "value": a.devices, "unit": f"of {a.expected}"},
        {"measure": "audit: missing / lost / duplicates", "value": f"{a.missing} / {a.lost} / {a.duplicates}",
         "unit": "records"},
        {"measure": "audit: copies of resent batches (harmless) / declared lost", "value":
         f"{a.copies} / {a.declared_lost}", "unit": ""},
        {"measure": "still in the outboxes at the stop (not lost)", "value": a.held, "unit": "records"},
        {"measure": "devices the operator's CLI counted online (the canary's base)", "value": r.known,
         "unit": f"of {n}" + ("  LOWER: stale or missing statuses" if r.known < n else "")},
        {"measure": "rollout canary plan", "value": r.plan_line.split(" (", 1)[0], "unit": ""},
        {"measure": "canary: first ACTIVE p50 / p99", "value": f"{percentile(canary_active, 50):.2f} / "
                    f"{percentile(canary_active, 99):.2f}", "unit": "s from start"},
        {"measure": "canary: verdict p50 / p99 (passed)", "value":
         f"{percentile(r.canary_verdict_s.values(), 50):.2f} / {percentile(r.canary_verdict_s.values(), 99):.2f} "
         f"({r.canary_passed} of {len(r.canary)})", "unit": "s from start"},
        {"measure": "time to 50 % / 99 % / 100 % of devices ACTIVE after the promote", "value":
         f"{reached(0.5):.1f} / {reached(0.99):.1f} / {reached(1.0):.1f}", "unit": "s"},
        {"measure": "latest states on the rollout", "value": ", ".join(f"{k} {v}" for k, v in
                                                                   sorted(r.final_states.items())), "unit": ""},
        {"measure": "canary verdicts not passed (every device judges its switch)", "value": len(r.failed_verdicts),
         "unit": _reasons(r.failed_verdicts)},
        {"measure": "retained sync states read afterwards: ACTIVE on the rollout", "value": r.retained_active,
         "unit": f"of {n}"},
        {"measure": "registry requests / bytes (the rollout)", "value": f"{r.registry_requests} / {r.registry_bytes}",
         "unit": ""},
        {"measure": "registry requests / bytes per device", "value":
         f"{r.registry_requests / n:.2f} / {round(r.registry_bytes / n)}", "unit": "requests / bytes"},
        {"measure": "registry errors (the devices' failed attempts, the whole run)", "value":
         sum(registry_errors.values()), "unit": ", ".join(f"{k} {v}" for k, v in registry_errors.most_common(3))},
        {"measure": "broker CPU: canary / promote", "value": f"{r.cpu_canary:.3f} / {r.cpu_promote:.3f}",
         "unit": "CPU s/s"},
        {"measure": "simulator memory per device: steady / peak (RSS, worst process)",
         "value": f"{per_device_bytes} / {per_device_peak}", "unit": "bytes"},
        {"measure": "devices' own state per device (outbox + model store on tmpfs: their flash; not in the goal)",
         "value": per_device_state, "unit": "bytes"},
        {"measure": "simulator RSS now / peak (all processes)", "value":
         f"{sum(s.rss_bytes for s in stats)} / {sum(s.peak_rss_bytes for s in stats)}", "unit": "bytes"},
        {"measure": "simulator loop lag p99 / max: " + " | ".join(p.name for p in phases), "value": " | ".join(
            f"{p.lag.p99_s:.2f} / {p.lag.max_s:.2f}" if p.lag else "n/a" for p in phases),
         "unit": "s" + _reach(phases)},
        {"measure": "machine CPU: " + " | ".join(p.name for p in phases),
         "value": " | ".join(f"{p.machine_cpu:.2f}" for p in phases), "unit": f"CPU s/s (of {os.cpu_count()} cores)"},
        {"measure": "simulator: failed tasks / refused publishes / queued now", "value":
         f"{sum(s.failed for s in stats)} / {sum(s.link.refused for s in stats)} / {sum(s.link.queued for s in stats)}",
         "unit": ""},
        {"measure": "simulator links: connect failures / sessions lost (cuts too)", "value":
         f"{sum(s.link.connect_failures for s in stats)} / {sum(s.link.losses for s in stats)}", "unit": ""},
    ]
    goals = [
        Goal(f"{n} devices connected", connected, n, "devices"),
        Goal("100 % active after promote (first ACTIVE report)", reached(1.0), 60, "s", "max"),
        Goal("canary devices active, p99", percentile(canary_active, 99), 10, "s", "max"),
        Goal(f"records/s into S3 end to end, 2 replicas ({plan.records_per_s:g}/s x {n})", round(t.made_stored_per_s),
             n * plan.records_per_s, "records/s"),  # the 5,000 for 1,000 devices at 5/s
        Goal("end-to-end lag p99 (links up)", t.lag_p99_s, 5, "s", "max"),
        Goal("audit: missing + lost + duplicates (+ devices absent)", a.findings, 0, "records", "max"),
        Goal("memory per simulated device (peak RSS, worst process)", per_device_peak / MB, 1, "MB", "max"),
    ]
    return rows, goals
