"""The operator's key pair made on first use: two starts at once (two test workers, two `edgefleet fleet`)
must end with one key pair, whole, never one's private key beside the other's public half."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from shared import registry


def _raw(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_a_maker_that_finishes_first_keeps_its_pair_and_the_later_one_is_refused(tmp_path: Path, monkeypatch):
    """The other maker runs to the end inside this one's first file write, after this one found no key:
    the window where a check-then-write overwrote the first key (a file created between check and write
    is overwritten, and the halves come from two keys)."""
    touch = Path.touch
    theirs: list[registry.KeyPair] = []

    def the_other_maker_finishes_now(self: Path, *args, **kwargs) -> None:
        if not theirs:
            monkeypatch.setattr(Path, "touch", touch)
            theirs.append(registry.new_key_pair(tmp_path))
        touch(self, *args, **kwargs)

    monkeypatch.setattr(Path, "touch", the_other_maker_finishes_now)
    with pytest.raises(FileExistsError, match="never overwritten"):
        registry.new_key_pair(tmp_path)
    (pair,) = theirs
    private = registry.load_private_key(pair.private)
    assert _raw(serialization.load_pem_public_key(pair.public.read_bytes())) == _raw(private.public_key())
    assert registry.load_public_keys(tmp_path).keys() == {pair.key_id}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["operator.key", "operator.pub"]  # nothing pending left
    assert pair.private.stat().st_mode & 0o777 == 0o600
