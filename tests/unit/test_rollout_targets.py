"""The canary the operator's CLI names (edgefleet.fleet_rollout.plan_canary) and what a device makes of
it (services.sync.membership.is_member): pure logic, tested as such (tests/test_rollout_targets.py runs
the command against real brokers and a real registry)."""

from __future__ import annotations

import pytest

from edgefleet.fleet_rollout import CanaryRefused, plan_canary
from services.sync.membership import canary_size, is_member, position, ranked
from shared.schemas import Rollout, RolloutPhase, RolloutTarget

PAIR = ["device-1", "device-2"]


def _members(target: RolloutTarget, fleet: list[str], phase=RolloutPhase.CANARY, rollout_id="r-1") -> list[str]:
    rollout = Rollout(rollout_id=rollout_id, model="m", version=2, phase=phase, target=target, issued_at=0)
    return [d for d in fleet if is_member(rollout, d, [])]


@pytest.mark.parametrize("rollout_id", [f"r-{i}" for i in range(20)])
def test_a_half_share_of_two_devices_names_exactly_one_whatever_the_draw(rollout_id):
    plan = plan_canary(rollout_id, RolloutTarget(share=0.5), PAIR)
    assert len(plan.target.canary_devices) == 1
    assert _members(plan.target, PAIR, rollout_id=rollout_id) == plan.target.canary_devices
    assert plan.line == f"canary: 1 of 2 devices ({plan.target.canary_devices[0]})"


def test_any_share_above_zero_names_at_least_one_device_and_rounds_up():
    assert [canary_size(share, 2) for share in (0.0001, 0.1, 0.5, 0.51, 1.0)] == [1, 1, 1, 2, 2]
    assert [canary_size(share, 100) for share in (0.07, 0.1, 0.255)] == [7, 10, 26]
    assert canary_size(0.5, 0) == 0


def test_a_share_names_the_devices_the_hash_ranks_first_so_they_match_what_devices_would_draw():
    fleet = [f"dev-{i}" for i in range(200)]
    plan = plan_canary("r-1", RolloutTarget(share=0.1), fleet)
    drawn = {d for d in fleet if position("r-1", d) < 0.1}
    assert len(plan.target.canary_devices) == 20
    # The devices below the share in the hash are all named; the rest are the next ones up.
    assert drawn <= set(plan.target.canary_devices) or set(plan.target.canary_devices) <= drawn
    assert plan.target.canary_devices == ranked("r-1", fleet)[:20]


def test_an_exact_count_names_that_many_and_promote_takes_the_whole_target():
    plan = plan_canary("r-1", RolloutTarget(), PAIR, count=1)
    assert len(plan.target.canary_devices) == 1 and plan.target.share == 0.5
    assert len(_members(plan.target, PAIR)) == 1
    assert _members(plan.target, PAIR, RolloutPhase.PROMOTED) == PAIR
    listed = plan_canary("r-1", RolloutTarget(devices=["a", "b", "c"]), PAIR, count=2)
    assert set(listed.target.canary_devices) <= {"a", "b", "c"} and len(listed.target.canary_devices) == 2


def test_impossible_counts_are_refused_naming_why():
    with pytest.raises(CanaryRefused, match="holds only 2 devices"):
        plan_canary("r-1", RolloutTarget(), PAIR, count=3)
    with pytest.raises(CanaryRefused, match="no device has a fresh online status"):
        plan_canary("r-1", RolloutTarget(), [], count=1)
    with pytest.raises(CanaryRefused, match="--group"):
        plan_canary("r-1", RolloutTarget(groups=["lobby"]), PAIR, count=1)


def test_groups_and_an_unknown_fleet_let_through_explicitly_keep_the_share_each_device_decides_on():
    grouped = plan_canary("r-1", RolloutTarget(groups=["lobby"], share=0.25), PAIR)
    assert grouped.target.canary_devices == [] and "25% of group lobby, each device deciding" in grouped.line
    unknown = plan_canary("r-1", RolloutTarget(share=0.5), [], let_devices_draw=True)
    assert unknown.target == RolloutTarget(share=0.5) and "each device deciding by itself" in unknown.line
    everyone = plan_canary("r-1", RolloutTarget(), PAIR)
    assert everyone.target == RolloutTarget() and everyone.line == "no canary: all of 2 devices"


def test_a_share_of_a_fleet_with_no_device_known_is_refused_saying_why_and_what_to_do():
    """Each device's own draw can make a canary of none (or all) of a small fleet: never silently."""
    with pytest.raises(CanaryRefused) as refused:
        plan_canary("r-1", RolloutTarget(share=0.5), [])
    why = str(refused.value)
    assert "no device has a fresh online status" in why and "none or all of a small fleet" in why
    assert "start the devices" in why and "--devices a,b" in why and "--let-devices-draw" in why
    # Named devices, or the whole fleet at once, need no count.
    assert plan_canary("r-1", RolloutTarget(devices=["a", "b"], share=0.5), []).target.canary_devices in (["a"], ["b"])
    assert plan_canary("r-1", RolloutTarget(), []).line == "no canary: all of the devices"


def test_a_rollout_without_named_devices_still_decides_by_share():
    """Rollouts retained before canary_devices existed keep their meaning."""
    old = Rollout.model_validate_json('{"rollout_id": "r-1", "model": "m", "version": 2, "phase": "canary", '
                                      '"target": {"share": 0.5}, "issued_at": 0}')
    fleet = [f"dev-{i}" for i in range(50)]
    assert [d for d in fleet if is_member(old, d, [])] == [d for d in fleet if position("r-1", d) < 0.5]
