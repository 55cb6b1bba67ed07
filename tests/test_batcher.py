"""The frame backlog between the network thread and the workers (pure logic: no broker needed)."""

from __future__ import annotations

import threading

import pytest

from services.inference.batcher import Closed, FrameBacklog
from services.inference.intake import Frame


def frame(n: int) -> Frame:
    return Frame(camera="cam", frame_id=str(n), data=b"", captured_at=None)


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
