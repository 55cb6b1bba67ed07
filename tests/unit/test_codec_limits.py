"""The codec against hostile messages, for every message type that crosses a broker: compressed
bombs, deep nesting, NaN/inf numbers, oversized strings and lists are a DecodeError, never another
exception, and never cost more memory than the cap. Pure logic, property-based (the same hostile frames
sent to the real service are in tests/test_bad_input.py)."""

from __future__ import annotations

import json
import math
import tracemalloc
import zlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from shared.codec import DecodeError, WireFormat, decode, encode
from shared.schemas import (
    MAX_LIST,
    MAX_STR,
    ClassScore,
    ErrorReport,
    FrameEnvelope,
    Gap,
    InferenceStats,
    ModelRef,
    ModelSwitch,
    ModelSwitched,
    Prediction,
    ProviderReport,
    Rollout,
    RolloutTarget,
    ServiceStatus,
    SyncReport,
    TelemetryAck,
    TelemetryBatch,
    TelemetryRecord,
    Timings,
)
from tests.support import zlib_bomb

_REF = ModelRef(name="efficientnet-lite0", version=1, sha256="a" * 64)
_PREDICTION = Prediction(
    device="d", camera="c", frame_id="f", captured_at=1.0, top=[ClassScore(index=1, label="cat", score=0.5)],
    model=_REF, provider="CPUExecutionProvider", published_at=2.0, features=[0.1] * 7,
    timings=Timings(queued_ms=1.0, preprocess_ms=1.0, inference_ms=1.0, total_ms=3.0, batch_size=1),
)
# The outbox epoch, where this version of the schema has it.
_EPOCH = {"epoch": "0123abcd"} if "epoch" in TelemetryBatch.model_fields else {}
SAMPLES: list[BaseModel] = [
    FrameEnvelope(frame_id="f-1", encoding="jpeg", data=b"\xff\xd8\xff", captured_at=1.0),
    ModelSwitch(request_id="r", model_dir="/m", sha256="a" * 64, at=1.0),
    ModelSwitched(request_id="r", ok=True, serving=_REF, load_ms=5.0, at=1.0),
    Rollout(rollout_id="ro", model="m", version=2, phase="canary", target=RolloutTarget(devices=["d"], share=0.5),
            issued_at=1.0),
    TelemetryBatch(device="d", **_EPOCH, records=[TelemetryRecord(seq=1, body=Gap(
        device="d", first_seq=1, last_seq=1, count=1, reason="expired", at=1.0))], sent_at=1.0),
    TelemetryAck(device="d", batch_id="000000000001-000000000001", stored=1, at=1.0),
    SyncReport(device="d", rollout_id="ro", state="active", target=_REF, serving=_REF, reason="ok", at=1.0),
    ServiceStatus(device="d", service="inference", state="online", at=1.0, edgefleet_version="0", model=_REF,
                  provider=ProviderReport(requested=["CPUExecutionProvider"], available=["CPUExecutionProvider"],
                                          active="CPUExecutionProvider", fallback=False),
                  inference=InferenceStats(frames_received=3, dropped_by_camera={"c": 1})),
    ErrorReport(device="d", service="inference", reason="undecodable", detail="x", camera="c", at=1.0),
    _PREDICTION,
]
TYPES = [type(m) for m in SAMPLES]


def _formats(sample: BaseModel) -> list[WireFormat]:
    # Frames travel as msgpack only: JSON has no bytes.
    return [f for f in WireFormat if not (isinstance(sample, FrameEnvelope) and f is WireFormat.JSON)]

ZLIB = WireFormat.MSGPACK_ZLIB.content_type


def _paths(obj, path=()):
    """Every (path, leaf) in a model's plain-data form, lists and maps included."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*path, i))
    yield path, obj


def _replace(obj, path, value):
    if not path:
        return value
    copy = dict(obj) if isinstance(obj, dict) else list(obj)
    copy[path[0]] = _replace(obj[path[0]], path[1:], value)
    return copy


def _pack(obj, fmt: WireFormat) -> bytes:
    if fmt is WireFormat.JSON:
        return json.dumps(obj).encode()  # NaN and Infinity as JavaScript writes them
    packed = msgpack.packb(obj, use_bin_type=True)
    return zlib.compress(packed) if fmt is WireFormat.MSGPACK_ZLIB else packed


def _refused(cls, payload: bytes, content_type: str | None, **caps) -> None:
    with pytest.raises(DecodeError):
        decode(cls, payload, content_type, **caps)


def test_every_sample_is_valid_so_each_refusal_below_is_the_hostile_part():
    for sample in SAMPLES:
        for fmt in _formats(sample):
            assert decode(type(sample), encode(sample, fmt), fmt.content_type) == sample


@settings(max_examples=200, deadline=None)
@given(st.data(), st.sampled_from(SAMPLES))
def test_nan_inf_and_oversized_strings_and_lists_are_refused_in_every_message_type(data, sample):
    fmt = data.draw(st.sampled_from(_formats(sample)))
    plain = sample.model_dump(mode="python" if fmt is not WireFormat.JSON else "json")
    targets = [(p, v) for p, v in _paths(plain) if p and isinstance(v, float | str | list)]
    path, leaf = data.draw(st.sampled_from(targets))
    if isinstance(leaf, float):
        hostile = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif isinstance(leaf, str):
        hostile = "x" * data.draw(st.integers(MAX_STR + 1, 4 * MAX_STR))
    else:  # every list is bounded; a list one past MAX_LIST of the same items is over any bound
        hostile = ((leaf or ["x"]) * (MAX_LIST + 1))[: MAX_LIST + 1]
    _refused(type(sample), _pack(_replace(plain, path, hostile), fmt), fmt.content_type)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(TYPES), st.integers(1, 100_000), st.sampled_from(["top", "inside"]),
       st.sampled_from(list(WireFormat)))
def test_deep_nesting_is_refused_in_every_message_type(cls, depth, where, fmt):
    if fmt is WireFormat.JSON:
        nested = b"[" * depth + b"]" * depth
        payload = nested if where == "top" else b'{"device": ' + nested + b"}"
    else:
        nested = b"\x91" * depth + b"\xc0"  # a one-element array in a one-element array ... in null
        payload = nested if where == "top" else b"\x81\xa6device" + nested
        payload = zlib.compress(payload) if fmt is WireFormat.MSGPACK_ZLIB else payload
    _refused(cls, payload, fmt.content_type)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(TYPES), st.integers(2, 300), st.booleans())
def test_compressed_bombs_are_refused_within_their_cap_in_every_message_type(cls, mib, declared):
    """Declared msgpack+zlib, or sniffed where a channel asks for it: refused at the cap, and the
    memory it cost stays near the cap, not near what the bomb inflates to."""
    cap = 1024 * 1024
    bomb = zlib_bomb(mib)
    tracemalloc.start()
    try:
        if declared:
            _refused(cls, bomb, ZLIB, max_inflated_bytes=cap)
        else:
            _refused(cls, bomb, None, max_inflated_bytes=cap, sniff_compressed=True)
        _refused(cls, bomb, None)  # not declared, not sniffed: plain msgpack, and not a map
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * cap + 2 * len(bomb), peak


def test_a_real_message_compressed_past_the_cap_is_refused_and_at_the_cap_accepted():
    for sample in SAMPLES:
        packed = msgpack.packb(sample.model_dump(mode="python"), use_bin_type=True)
        _refused(type(sample), zlib.compress(packed), ZLIB, max_inflated_bytes=len(packed) - 1)
        assert decode(type(sample), zlib.compress(packed), ZLIB, max_inflated_bytes=len(packed)) == sample
