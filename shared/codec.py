"""The wire codec: JSON for what third-party clients read, msgpack where configured and for frames."""

from __future__ import annotations

import json
import zlib
from enum import StrEnum
from typing import TypeVar

import msgpack
from pydantic import BaseModel

from shared.errors import EdgefleetError

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


class DecodeError(EdgefleetError, ValueError):
    """A payload that is not a valid message of the expected type; the text says why. A ValueError too,
    for callers that catch pydantic's validation errors and this alike."""


def encode(message: BaseModel, fmt: WireFormat = WireFormat.JSON) -> bytes:
    """Encode a message for the wire.

    :param BaseModel message: any schema of shared.schemas (or another pydantic model).
    :param WireFormat fmt: JSON (what third-party clients read), msgpack, or zlib-compressed msgpack;
        publish it with `fmt.content_type` so decode() needs no guess.

    Returns the payload bytes. It does not validate again: a model built in code with model_copy() is
    encoded as it is (decode() is where a payload is checked).

    :raises pydantic_core.PydanticSerializationError: for a value the format cannot carry (JSON).
    :raises TypeError: for a value msgpack cannot carry.
    """
    if fmt is WireFormat.JSON:
        return message.model_dump_json().encode()
    packed = msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)
    return zlib.compress(packed, 6) if fmt is WireFormat.MSGPACK_ZLIB else packed


# What a compressed payload may inflate to when the caller names no cap. A telemetry batch is at most
# batch_max_bytes (256 KiB by default) before compression; 16 MiB leaves room for any configured batch
# and still keeps a zlib bomb (1000:1 is easy) from costing a process more than that.
DEFAULT_MAX_INFLATED_BYTES = 16 * 1024 * 1024


def decode(cls: type[M], payload: bytes | bytearray, content_type: str | None = None, *,
           max_inflated_bytes: int | None = None, sniff_compressed: bool = False) -> M:
    """Decode one message of type `cls` from JSON, msgpack or zlib-compressed msgpack.

    :param cls: the schema the payload must validate against.
    :param payload: the bytes as they came off the wire (paho's MQTTMessage.payload); their length is
        the caller's to bound (the brokers' message_size_limit bounds it for everything that crossed one).
    :param str content_type: the MQTT v5 content type, if the sender set one (mqtt.content_type_of).
        Without it JSON is recognised by its leading '{', anything else is read as msgpack.
    :param int max_inflated_bytes: a compressed payload is inflated at most to this many bytes, and
        refused past it before the rest is inflated (default DEFAULT_MAX_INFLATED_BYTES).
    :param bool sniff_compressed: also treat a payload with no content type whose first byte is 0x78
        as compressed. Only for channels that carry compressed messages (telemetry batches, which an
        MQTT 3.1.1 hop may strip of their content type); never for frames.

    Returns the validated message, an instance of `cls`.

    :raises DecodeError: (a ValueError) if the payload is not a valid `cls`, inflates past the cap, or
        nests too deep; its text says why, fit for an error report.
    """
    compressed = content_type == WireFormat.MSGPACK_ZLIB.content_type or (
        sniff_compressed and content_type is None and payload[:1] == b"\x78"
    )
    if compressed:
        payload = inflate(payload, max_inflated_bytes or DEFAULT_MAX_INFLATED_BYTES, cls.__name__)
        content_type = WireFormat.MSGPACK.content_type
    try:
        if content_type == WireFormat.JSON.content_type or (
            content_type is None and payload[:1] == b"{"
        ):
            obj = json.loads(payload)
        else:
            obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    # RecursionError: JSON nested thousands deep; msgpack's own limit raises StackError.
    except (ValueError, RecursionError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"not valid {cls.__name__} data: {str(exc)[:200]}") from exc
    if not isinstance(obj, dict):
        raise DecodeError(f"{cls.__name__} must be a map, got {type(obj).__name__}")
    try:
        return cls.model_validate(obj)
    except RecursionError as exc:
        raise DecodeError(f"{cls.__name__} nests too deep") from exc
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise DecodeError(_summarise(cls, exc)) from exc


def inflate(payload: bytes | bytearray, limit: int, what: str = "payload", *, gzip: bool = False) -> bytes:
    """Inflate a zlib stream, refusing it as soon as the output passes `limit` bytes: the cap is
    applied while inflating (zlib's max_length), so a bomb costs at most `limit` bytes of memory.

    :param payload: the compressed bytes.
    :param int limit: the most bytes the output may have.
    :param str what: what the payload is, for the error's text.
    :param bool gzip: a gzip member (header and trailer) rather than a bare zlib stream.

    Returns the inflated bytes.

    :raises DecodeError: if it is not zlib data, is truncated, or is larger than `limit` once inflated.
    """
    inflater = zlib.decompressobj(wbits=31 if gzip else zlib.MAX_WBITS)  # 31: gzip's header and trailer
    try:
        out = inflater.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise DecodeError(f"not valid compressed {what} data: {exc}") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise DecodeError(f"compressed {what} inflates past the cap of {limit} bytes")
    if not inflater.eof:
        raise DecodeError(f"compressed {what} data is truncated")
    return out


def _summarise(cls: type[BaseModel], exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in errors()]
    return f"invalid {cls.__name__}: " + "; ".join(parts)
