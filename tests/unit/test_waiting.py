"""The one wait loop of the launchers and the tests (edgefleet/waiting.py)."""

from __future__ import annotations

import pytest

from edgefleet.waiting import WaitTimeout, wait_until


def test_wait_until_returns_the_result_or_names_what_it_waited_for():
    answers = iter([None, 0, "found"])
    assert wait_until(lambda: next(answers), 5, "an answer", interval=0) == "found"
    with pytest.raises(WaitTimeout, match="timed out after 0.05s waiting for the impossible") as failed:
        wait_until(lambda: False, 0.05, "the impossible", interval=0.01)
    # A test that waits fails as a test; a caller that catches timeouts catches it too.
    assert isinstance(failed.value, AssertionError) and isinstance(failed.value, TimeoutError)
