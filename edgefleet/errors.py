"""The base of every error the operators' tools (the `edgefleet` package) raise on purpose, beneath
shared.errors.EdgefleetError: a command catches EdgefleetError and prints the message, a start-up path
names one class, and anything else (a bug) surfaces with its traceback. Each error keeps the built-in
base its callers already catch (RuntimeError, ConnectionError)."""

from __future__ import annotations

from shared.errors import EdgefleetError


class ToolError(EdgefleetError):
    """A deliberate failure of an operator's or developer's tool: its message is meant for a person."""
