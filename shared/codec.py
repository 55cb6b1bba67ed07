"""The wire codec: JSON for what third-party clients read, msgpack where configured and for frames."""

from __future__ import annotations

import json
import zlib
from enum import StrEnum
from typing import TypeVar

import msgpack
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


class WireFormat(StrEnum):
    JSON = "json"
    MSGPACK = "msgpack"
    # Telemetry batches to the cloud: msgpack, then zlib (metered links; repetitive records shrink 3-10x).
    MSGPACK_ZLIB = "msgpack+zlib"

    @property
    def content_type(self) -> str:
        return {"json": "application/json", "msgpack": "application/msgpack",
                "msgpack+zlib": "application/msgpack+zlib"}[self.value]


class DecodeError(ValueError):
    """A payload that is not a valid message of the expected type; the text says why."""


def encode(message: BaseModel, fmt: WireFormat = WireFormat.JSON) -> bytes:
    if fmt is WireFormat.JSON:
        return message.model_dump_json().encode()
    packed = msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)
    return zlib.compress(packed, 6) if fmt is WireFormat.MSGPACK_ZLIB else packed


def decode(cls: type[M], payload: bytes, content_type: str | None = None) -> M:
    """Decodes JSON or msgpack (by content type, else by sniffing: JSON objects start with '{')."""
    # A zlib stream starts with 0x78, which no JSON or msgpack message (a map) does: recognise it even
    # where a hop lost the content type (an MQTT 3.1.1 client or bridge carries no properties).
    if content_type == WireFormat.MSGPACK_ZLIB.content_type or (content_type is None and payload[:1] == b"\x78"):
        try:
            payload = zlib.decompress(payload)
        except zlib.error as exc:
            raise DecodeError(f"not valid compressed {cls.__name__} data: {exc}") from exc
        content_type = WireFormat.MSGPACK.content_type
    try:
        if content_type == WireFormat.JSON.content_type or (
            content_type is None and payload[:1] == b"{"
        ):
            obj = json.loads(payload)
        else:
            obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"not valid {cls.__name__} data: {exc}") from exc
    if not isinstance(obj, dict):
        raise DecodeError(f"{cls.__name__} must be a map, got {type(obj).__name__}")
    try:
        return cls.model_validate(obj)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise DecodeError(_summarise(cls, exc)) from exc


def _summarise(cls: type[BaseModel], exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in errors()]
    return f"invalid {cls.__name__}: " + "; ".join(parts)
