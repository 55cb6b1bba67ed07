"""How the inference service plans its model runs for the cores it may use (session.plan_workers), and
that a service pinned to one core of several opens a session that adds no second ONNX Runtime thread
to spin against the first on that core (ONNX Runtime's own default counts the machine's cores)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from services.inference.session import ModelSession, plan_workers
from shared.manifest import load_verified

needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a machine with two cores")


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@needs_two_cores
def test_pinned_to_one_core_one_worker_with_one_thread_unless_told():
    with one_core():
        assert plan_workers(["cpu"], 0, 0) == (1, 1)
        assert plan_workers(["cpu"], 0, 3) == (1, 3)  # an explicit thread count is kept
        assert plan_workers(["cuda"], 0, 0) == (1, 1)


@needs_two_cores
def test_on_every_core_one_single_threaded_worker_per_core():
    if len(os.sched_getaffinity(0)) != os.cpu_count():
        pytest.skip("this process may not use every core of the machine")
    assert plan_workers(["cpu"], 0, 0) == (os.cpu_count(), 1)
    assert plan_workers(["cuda"], 0, 0) == (1, 0)  # ONNX Runtime's default where it can use every core


@needs_two_cores
def test_a_session_opened_on_one_core_adds_no_thread_to_it(model_dir):
    manifest, path = load_verified(model_dir)
    with one_core():
        before = set(os.listdir("/proc/self/task"))
        _, threads = plan_workers(["cpu"], 0, 0)
        session = ModelSession.open(manifest, path, ["cpu"], strict=False, intra_op_threads=threads)
        added = set(os.listdir("/proc/self/task")) - before
    assert session.provider.active == "CPUExecutionProvider"
    assert not added, f"ONNX Runtime started {len(added)} more threads on the one core"
