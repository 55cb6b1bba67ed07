"""Resumable downloads, the part that needs no S3 server: a ranged answer is checked against the range
asked for before a byte reaches the .part file (the downloads themselves, against a real S3-compatible
server and killed mid-way, are in tests/test_sync.py)."""

from __future__ import annotations

import io

import pytest
from botocore.response import StreamingBody

from services.sync.download import DownloadFailed, read_range


def test_a_ranged_answer_that_is_not_exactly_the_range_asked_is_refused():
    """Pure logic on crafted get_object answers: what reaches the .part is exactly the range asked for."""

    def answer(data: bytes, content_range: str | None) -> dict:
        response = {"Body": StreamingBody(io.BytesIO(data), len(data))}
        if content_range is not None:
            response["ContentRange"] = content_range
        return response

    assert read_range(answer(b"abcd", "bytes 4-7/10"), 4, 7, 10) == b"abcd"
    assert read_range(answer(b"ab", "bytes 4-7/10"), 4, 7, 10) == b"ab"  # broke off: the caller resumes
    refused = {
        "more bytes than asked": answer(b"abcdef", "bytes 4-7/10"),
        "the range ignored (200, whole object)": answer(b"0123456789", None),
        "another range": answer(b"abcd", "bytes 0-3/10"),
        "another object size": answer(b"abcd", "bytes 4-7/12"),
    }
    for what, response in refused.items():
        with pytest.raises(DownloadFailed):
            read_range(response, 4, 7, 10)
            pytest.fail(what)
