"""The console's error base, beneath shared.errors.EdgefleetError."""

from __future__ import annotations

from shared.errors import EdgefleetError


class ConsoleError(EdgefleetError):
    """Base of the console's deliberate errors: its message is meant for a person."""


class PageMissing(ConsoleError):
    """A file of the page (services/console/page/) is not installed: the package was built without its data."""
