"""The one error base of the edgefleet code: every error `shared`, a service or the operators' tools
raise on purpose derives from EdgefleetError, so a start-up path or a CLI command names one class
where it means "ours, already worded for a person" and lets anything else (a bug) surface as a
traceback. Each package keeps its own base beneath it (as Roboflow's camera/exceptions.py keeps
StreamError), and an error that is also a ValueError or an OSError says so, for callers that
already catch those."""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base of every deliberate error in edgefleet: its message is meant for a person."""
