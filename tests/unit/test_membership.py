"""Who is in a rollout: pure logic, so tested as such (the processes are tested in test_sync)."""

from __future__ import annotations

from services.sync.membership import is_member, position
from shared.schemas import Rollout, RolloutPhase, RolloutTarget

FLEET = [f"dev-{i}" for i in range(2000)]


def _rollout(phase=RolloutPhase.CANARY, **target) -> Rollout:
    return Rollout(rollout_id="r-1", model="m", version=2, phase=phase, target=RolloutTarget(**target), issued_at=0)


def test_a_canary_share_is_about_its_size_and_the_same_every_time():
    canary = _rollout(share=0.1)
    chosen = [d for d in FLEET if is_member(canary, d, [])]
    assert 160 <= len(chosen) <= 240
    assert chosen == [d for d in FLEET if is_member(canary, d, [])]
    other = Rollout(**{**canary.model_dump(), "rollout_id": "r-2"})
    assert set(chosen) != {d for d in FLEET if is_member(other, d, [])}, "another rollout draws another canary"


def test_promotion_takes_the_whole_target_and_a_wider_share_keeps_the_first_devices():
    assert all(is_member(_rollout(RolloutPhase.PROMOTED, share=0.1), d, []) for d in FLEET)
    narrow = {d for d in FLEET if is_member(_rollout(share=0.1), d, [])}
    wide = {d for d in FLEET if is_member(_rollout(share=0.5), d, [])}
    assert narrow <= wide


def test_listed_devices_and_groups_limit_the_target():
    listed = _rollout(RolloutPhase.PROMOTED, devices=["dev-1", "dev-7"])
    assert [d for d in FLEET if is_member(listed, d, [])] == ["dev-1", "dev-7"]
    grouped = _rollout(RolloutPhase.PROMOTED, groups=["lobby"])
    assert is_member(grouped, "dev-3", ["yard", "lobby"]) and not is_member(grouped, "dev-3", ["yard"])
    assert 0 <= position("r-1", "dev-1") < 1
