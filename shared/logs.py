"""Structured logs: one JSON object per line (or plain text for people), with the service and device."""

from __future__ import annotations

import json
import logging
import sys
import time

_context: dict[str, str] = {}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_context,
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()} {fields}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(service: str, device: str, level: str = "INFO", fmt: str = "json") -> None:
    """Sends every log record to stderr, one line each, tagged with the service and the device.

    :param str level: the root logger's level name ("DEBUG", "INFO", ...).
    :param str fmt: "json" (one object per line, for collectors) or anything else for plain text.
    :raises ValueError: for an unknown level name.
    """
    _context.update(service=service, device=device)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def fields(**values: object) -> dict[str, dict[str, object]]:
    """`log.info("...", extra=fields(frame_id=...))`: values that land as their own keys in the JSON."""
    return {"fields": values}
