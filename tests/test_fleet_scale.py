"""Fifty simulated devices on the fleet broker, through the fleet bench's own rig and phases
(edgefleet/bench/fleet_rig.py, fleet_watch.py, fleet_s3.py, fleet_outboxes.py, fleet.py): the TLS broker
as shipped, moto, two real cloud_ingest replicas, `edgefleet simulate run` processes, and the rollout
through `edgefleet rollout start|promote` as an operator runs it."""

from __future__ import annotations

import math
from pathlib import Path

from edgefleet.bench import fleet
from edgefleet.bench.fleet_rig import BUCKET, CONSOLE, FleetRig, SimOptions, SimProcess, device_ids
from edgefleet.bench.fleet_s3 import read_records, read_stored
from edgefleet.bench.fleet_watch import FleetWatch, wait_for
from edgefleet.simulate.cuts import cut_devices
from services.sync import membership
from shared import topics
from shared.schemas import SyncState

EARLY = 49  # devices there from the start; one more joins after the promote: 50 in all
CUT_SHARE = 0.1
CUT_AT_S, CUT_FOR_S = 1.0, 3.0  # after every early device connected


def _cut_and_back(processes: list[SimProcess], devices: int) -> bool:
    """Every cut link is back: the simulator cut some, and has reconnected each of them since."""
    stats = fleet.sim_totals(processes)
    return (len(stats) == len(processes) and all(s.link.cut > 0 for s in stats)
            and sum(s.link.connects for s in stats) >= devices + sum(s.link.cut for s in stats)
            and sum(s.connected for s in stats) == devices)


def _logs(rig: FleetRig) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(rig.logs.glob("*.log")))


def test_rollout_reaches_all_50_with_an_exact_canary_audit_clean_after_a_cut_and_a_late_device_acts_on_it(
        tmp_path: Path) -> None:
    with FleetRig(tmp_path, EARLY + 1, model_bytes=64 * 1024) as rig:
        watch = FleetWatch(rig.client_settings(CONSOLE))
        try:
            watch.start()
            early = rig.start_simulators(0, EARLY, 1, SimOptions(connect_spread_s=1, cut_share=CUT_SHARE,
                                                                 cut_at_s=CUT_AT_S, cut_for_s=CUT_FOR_S))
            assert wait_for(lambda: watch.online() >= EARLY, 90), f"{watch.online()} of {EARLY} online"
            assert wait_for(lambda: _cut_and_back(early, EARLY), 60), fleet.sim_totals(early)

            devices = device_ids(rig.prefix, 0, EARLY)
            rolled = fleet.run_rollout(rig, watch, devices, version=2, max_concurrent=None, timeout_s=90,
                                       processes=early)
            # The canary: 5 % of the 49 devices online, rounded up, the ones the membership hash ranks first.
            assert rolled.known == EARLY, rolled.plan_line
            assert len(rolled.canary) == membership.canary_size(0.05, EARLY) == 3, rolled.plan_line
            assert rolled.canary == membership.ranked(rolled.rollout_id, devices)[:3]
            assert rolled.canary_passed == len(rolled.canary), rolled.failed_verdicts
            active = {d for d, s in rolled.states_before_promote.items() if s is SyncState.ACTIVE}
            assert active == set(rolled.canary), rolled.states_before_promote
            # The promote: every device active on the new model.
            assert rolled.complete, sorted(set(devices) - rolled.active_after_promote_s.keys())
            assert rolled.retained_active == EARLY  # what `edgefleet rollout status` reads afterwards
            assert rolled.serving_active == EARLY and rolled.all_active_s(EARLY) < 90, rolled.final_states

            # A device that joins after the promote gets the retained rollout and installs it.
            late = rig.start_simulators(EARLY, 1, 1, SimOptions(connect_spread_s=0), tag="late")
            joiner = late[0].devices[0]
            assert wait_for(lambda: joiner in watch.first_at(rolled.rollout_id, SyncState.ACTIVE), 60)
            assert late[0].started_at > rolled.promoted_at  # only the retained rollout could have told it
            serving = watch.devices[joiner].latest
            assert serving is not None and serving.serving is not None and serving.serving.version == 2, serving

            # No device task or rollout worker died, no publish was refused; the console heard the statuses.
            stats = fleet.sim_totals(rig.simulators)
            assert sum(s.failed for s in stats) == 0 and sum(s.link.refused for s in stats) == 0, stats
            assert watch.online() == EARLY + 1  # every device's sync status says online
            # Each device's services' statuses, at least the online one of each, by the bench's count.
            assert watch.message_counts()[0] >= len(topics.DEVICE_SERVICES) * (EARLY + 1)

            # Drained, then audited: every record a device made (to its outbox's next sequence number, its
            # last batch's too) is in S3 once; nothing is left in an outbox.
            cut_start = fleet.sim_totals(early)[0].all_connected_at
            checked = fleet.stop_and_audit(rig, rig.simulators, drain_s=20)
            assert checked.drained, checked
            assert checked.devices == checked.expected == EARLY + 1, checked
            assert checked.received > 0
            assert (checked.missing, checked.held, checked.lost, checked.duplicates) == (0, 0, 0, 0), checked

            # The cut devices' records made while their link was down arrived after it came back.
            assert cut_start is not None
            cut_from, cut_to = cut_start + CUT_AT_S, cut_start + CUT_AT_S + CUT_FOR_S
            stored = read_stored(rig.s3(), BUCKET)
            made_in_cut = {r.device for r in read_records(rig.s3(), BUCKET, stored, 0, math.inf)
                           if cut_from + 0.5 <= r.at < cut_to - 0.5 and r.stored_at >= cut_to - 0.5}
            cut = set(cut_devices(devices, CUT_SHARE))
            assert len(cut) == 5 and cut <= made_in_cut, sorted(cut - made_in_cut)
        except BaseException:
            print(_logs(rig))
            raise
        finally:
            watch.close()
