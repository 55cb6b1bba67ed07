"""The operator's key pair made on first use: two starts at once (two test workers, two `edgefleet fleet`)
must end with one key pair, whole; a maker stopped between the two files must not leave devices trusting
no key or another key."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from shared import registry


def _raw(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _assert_whole(pair: registry.KeyPair, folder: Path) -> None:
    private = registry.load_private_key(pair.private)
    assert _raw(serialization.load_pem_public_key(pair.public.read_bytes())) == _raw(private.public_key())
    assert registry.load_public_keys(folder).keys() == {pair.key_id}
    assert sorted(p.name for p in folder.iterdir()) == ["operator.key", "operator.pub"]  # nothing pending left
    assert pair.private.stat().st_mode & 0o777 == 0o600


def test_a_maker_that_finishes_first_keeps_its_pair_and_the_later_one_is_refused(tmp_path: Path, monkeypatch):
    """The other maker runs to the end inside this one's first file write, after this one found no key:
    the window where a check-then-write let the later maker overwrite the first one's key, which the first
    had already returned (and perhaps signed with)."""
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
    _assert_whole(pair, tmp_path)


def test_ensure_makes_the_pair_once_and_then_returns_it_unchanged(tmp_path: Path):
    made = registry.ensure_key_pair(tmp_path)
    key = made.private.read_bytes()
    again = registry.ensure_key_pair(tmp_path)
    assert again == made and made.private.read_bytes() == key
    _assert_whole(again, tmp_path)


@pytest.mark.parametrize("public_half", ["missing", "another key's"])
def test_ensure_writes_the_public_half_again_from_the_private_key(tmp_path: Path, public_half: str):
    """A maker stopped between the private key and its public half, or a folder whose .pub is left from
    another key: devices would trust no key, or the wrong one."""
    keys = tmp_path / "keys"
    made = registry.new_key_pair(keys)
    if public_half == "missing":
        made.public.unlink()
    else:
        made.public.write_bytes(registry.new_key_pair(tmp_path / "other").public.read_bytes())
    assert registry.ensure_key_pair(keys) == made
    _assert_whole(made, keys)


def test_without_hard_links_the_key_is_created_exclusively(tmp_path: Path, monkeypatch):
    """vfat and some network mounts refuse os.link: the key is then created with O_EXCL, as whole and as
    private, and a maker that finds it made meanwhile is still refused."""
    def no_hard_links(source, target, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted", str(target))

    monkeypatch.setattr(os, "link", no_hard_links)
    pair = registry.new_key_pair(tmp_path)
    _assert_whole(pair, tmp_path)
    pending = tmp_path.parent / f"{tmp_path.name}-pending"
    pending.write_bytes(b"a later maker's key")
    with pytest.raises(FileExistsError, match="never overwritten"):
        registry._create_from(pending, pair.private)
    _assert_whole(pair, tmp_path)
