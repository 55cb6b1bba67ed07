"""The two queues of a frame's way (pure logic: no broker needed)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from services.inference.batcher import BatchQueue, Closed


@dataclass
class Item:
    n: int
    received: float = field(default_factory=time.monotonic)


def test_drop_oldest_keeps_the_newest_and_returns_what_it_dropped():
    queue: BatchQueue[Item] = BatchQueue(3, drop_oldest=True)
    dropped = [queue.put(Item(n)) for n in range(5)]
    assert [d.n if d else None for d in dropped] == [None, None, None, 0, 1]
    assert [i.n for i in queue.take(10)] == [2, 3, 4]


def test_a_batch_is_what_is_queued_up_to_max_batch():
    queue: BatchQueue[Item] = BatchQueue(10, drop_oldest=True)
    for n in range(5):
        queue.put(Item(n))
    assert [i.n for i in queue.take(2)] == [0, 1]
    assert [i.n for i in queue.take(8)] == [2, 3, 4]
    assert queue.take(8, idle_timeout_s=0.01) == []


def test_max_wait_collects_frames_that_arrive_after_the_first():
    queue: BatchQueue[Item] = BatchQueue(10, drop_oldest=True)
    queue.put(Item(0))
    feeder = threading.Timer(0.05, lambda: [queue.put(Item(n)) for n in (1, 2, 3)])
    feeder.start()
    batch = queue.take(4, max_wait_s=5.0)
    assert [i.n for i in batch] == [0, 1, 2, 3]  # returned as soon as the batch was full


def test_blocking_put_waits_for_room():
    queue: BatchQueue[Item] = BatchQueue(1, drop_oldest=False)
    queue.put(Item(0))
    done = threading.Event()
    threading.Thread(target=lambda: (queue.put(Item(1)), done.set())).start()
    assert not done.wait(0.1)
    assert [i.n for i in queue.take(1)] == [0]
    assert done.wait(5)


def test_close_hands_out_the_rest_then_none_and_refuses_puts():
    queue: BatchQueue[Item] = BatchQueue(4, drop_oldest=True)
    queue.put(Item(0))
    queue.put(Item(1))
    queue.close()
    with pytest.raises(Closed):
        queue.put(Item(2))
    assert [i.n for i in queue.take(1)] == [0]
    assert [i.n for i in queue.take(1)] == [1]
    assert queue.take(1) is None


def test_close_wakes_a_blocked_put():
    queue: BatchQueue[Item] = BatchQueue(1, drop_oldest=False)
    queue.put(Item(0))
    raised = threading.Event()

    def put():
        try:
            queue.put(Item(1))
        except Closed:
            raised.set()

    threading.Thread(target=put).start()
    time.sleep(0.05)
    queue.close()
    assert raised.wait(5)
