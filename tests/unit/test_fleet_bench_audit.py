"""The fleet bench's accounting of each device's records against its outbox (pure logic: the audit's
results and the outbox's state as values)."""

from __future__ import annotations

from edgefleet.audit import DeviceAudit, EpochAudit
from edgefleet.bench.fleet import _account, peak_overlap
from edgefleet.bench.fleet_outboxes import OutboxState

EPOCH = "00000001"


def _stored(highest: int, missing: list[tuple[int, int]] | None = None) -> DeviceAudit:
    epoch = EpochAudit(EPOCH, received=highest, highest_seq=highest, missing=missing or [])
    return DeviceAudit("d", epochs={EPOCH: epoch}, received=highest, highest_seq=highest, missing=epoch.missing)


def test_a_last_batch_never_stored_and_gone_from_the_outbox_is_unexplained() -> None:
    # 1..10 stored; 11..15 made (next_seq 16) and neither stored nor held: the audit alone cannot see them.
    assert _account(_stored(10), OutboxState(EPOCH, frozenset(), 16)) == (5, 0)


def test_numbers_still_in_the_outbox_count_as_held_not_as_missing() -> None:
    assert _account(_stored(10, [(4, 5)]), OutboxState(EPOCH, frozenset({4, 5, 11, 12}), 13)) == (0, 4)


def test_a_device_with_nothing_stored_accounts_for_everything_it_made() -> None:
    assert _account(None, OutboxState(EPOCH, frozenset({3}), 4)) == (2, 1)


def test_held_numbers_of_another_epoch_do_not_explain_a_gap() -> None:
    assert _account(_stored(10, [(4, 5)]), OutboxState("00000002", frozenset({4, 5}), 6)) == (2 + 3, 2)


def test_peak_overlap_counts_downloads_open_at_once() -> None:
    starts = {"a": 0.0, "b": 1.0, "c": 2.0, "d": 5.0}
    ends = {"a": 3.0, "b": 2.0, "c": 4.0}  # d never verified: stays open
    assert peak_overlap(starts, ends) == 2
