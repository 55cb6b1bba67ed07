"""Polling until something holds: the one wait loop of the launchers, the simulator and the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from edgefleet.errors import ToolError

T = TypeVar("T")


class WaitTimeout(ToolError, TimeoutError, AssertionError):
    """What was waited for did not come in time. Also an AssertionError, so a test that waits fails as
    a test (not as an error in its set-up), and a test that catches AssertionError to add context
    keeps working."""


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Calls `check` every `interval` seconds until it returns something truthy.

    Args:
        check: the condition; make it also return truthy when waiting is pointless (e.g. the child it
            waits on exited), then look at why after the wait.
        timeout: seconds before giving up.
        what: what is waited for, in words: the timeout's message names it.
        interval: seconds between calls.

    Returns:
        The first truthy result of `check` (a found message, a status...).

    Raises:
        WaitTimeout: `check` stayed falsy for `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(interval)
    raise WaitTimeout(f"timed out after {timeout}s waiting for {what}")
