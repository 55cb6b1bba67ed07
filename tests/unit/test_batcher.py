"""The frame backlog between the network thread and the workers (pure logic: no broker needed)."""

from __future__ import annotations

import threading

import pytest

from services.inference.batcher import CameraCounts, Closed, FrameBacklog
from services.inference.intake import Frame


def frame(n: int, camera: str = "cam") -> Frame:
    return Frame(camera=camera, frame_id=str(n), data=b"", captured_at=None)


def ids(frames) -> list[str]:
    return [f.frame_id for f in frames]


def test_drop_oldest_keeps_the_newest_and_returns_what_it_dropped():
    backlog = FrameBacklog(3)
    dropped = [backlog.put(frame(n)) for n in range(5)]
    assert [d.frame_id if d else None for d in dropped] == [None, None, None, "0", "1"]
    assert ids(backlog.take(10)) == ["2", "3", "4"]


def test_a_batch_is_what_is_queued_up_to_max_batch():
    backlog = FrameBacklog(10)
    for n in range(5):
        backlog.put(frame(n))
    assert ids(backlog.take(2)) == ["0", "1"]
    assert ids(backlog.take(8)) == ["2", "3", "4"]
    assert backlog.take(8, idle_timeout_s=0.01) == []


def test_max_wait_collects_frames_that_arrive_after_the_first():
    backlog = FrameBacklog(10)
    backlog.put(frame(0))
    threading.Timer(0.05, lambda: [backlog.put(frame(n)) for n in (1, 2, 3)]).start()
    assert ids(backlog.take(4, max_wait_s=5.0)) == ["0", "1", "2", "3"]  # back as soon as it was full


def test_workers_waiting_together_each_get_a_batch():
    backlog = FrameBacklog(10)
    got: list[list[str]] = []
    workers = [threading.Thread(target=lambda: got.append(ids(backlog.take(1, idle_timeout_s=5)))) for _ in range(2)]
    for w in workers:
        w.start()
    backlog.put(frame(0))
    backlog.put(frame(1))
    for w in workers:
        w.join(5)
    assert sorted(got) == [["0"], ["1"]]


def test_close_hands_out_the_rest_then_none_and_refuses_puts():
    backlog = FrameBacklog(4)
    backlog.put(frame(0))
    backlog.put(frame(1))
    backlog.close()
    with pytest.raises(Closed):
        backlog.put(frame(2))
    assert ids(backlog.take(1)) == ["0"]
    assert ids(backlog.take(1)) == ["1"]
    assert backlog.take(1) is None


def test_close_wakes_a_waiting_worker():
    backlog = FrameBacklog(4)
    result = []
    worker = threading.Thread(target=lambda: result.append(backlog.take(1, idle_timeout_s=30)))
    worker.start()
    backlog.close()
    worker.join(5)
    assert result == [None]


def test_a_flooding_camera_evicts_only_its_own_frames():
    backlog = FrameBacklog(6)
    backlog.put(frame("b0", "B"))
    backlog.put(frame("c0", "C"))
    dropped = [backlog.put(frame(f"a{n}", "A")) for n in range(20)]
    backlog.put(frame("b1", "B"))  # B is under its share (6 / 3 cameras): A pays again
    assert {d.camera for d in dropped if d} == {"A"}
    # Arrival order across cameras is kept; A's newest frames survive.
    assert ids(backlog.take(10)) == ["b0", "c0", "a17", "a18", "a19", "b1"]


def test_when_full_the_camera_holding_the_most_frames_pays():
    backlog = FrameBacklog(4)
    for f in (frame("a0", "A"), frame("a1", "A"), frame("b0", "B"), frame("b1", "B")):
        assert backlog.put(f) is None
    # B, at its share, sends one more: its own oldest goes, not A's.
    assert backlog.put(frame("b2", "B")).frame_id == "b0"
    # A single camera's backlog drops its oldest, as before.
    assert backlog.put(frame("a2", "A")).frame_id == "a0"
    assert ids(backlog.take(10)) == ["a1", "b1", "b2", "a2"]


def test_drops_by_camera_name_a_bounded_number_of_cameras():
    counts = CameraCounts(max_keys=2)
    for camera in ("A", "B", "C", "D", "A"):
        counts.add(camera)
    assert counts.snapshot() == {"A": 2, "B": 1, "_other": 2}
