"""shared.atomic.write_atomic on real files: a file written with a narrow mode (a secret: 0o600) is
never more open than asked, neither the staging file while it is written nor the file in place, whatever
the umask; and a leftover staging file (or a symlink planted in its place) is never written through."""

from __future__ import annotations

import os
import stat

import pytest

from shared import atomic
from shared.manifest import ARTIFACT_FILE_MODE


@pytest.fixture
def open_umask():
    """The most permissive umask: any mode the files get is the one write_atomic gave them."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def staging_modes(monkeypatch):
    """The staging file's mode at each step of the write: right after it is created (before a byte is
    written) and when it is flushed to disk (every byte written), read from the real file."""
    seen: list[tuple[str, int]] = []
    real_open, real_fsync = os.open, os.fsync

    def observed_open(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if str(path).endswith(atomic.TMP):
            seen.append(("created", stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    def observed_fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen.append(("written", stat.S_IMODE(os.fstat(fd).st_mode)))
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "open", observed_open)
    monkeypatch.setattr(atomic.os, "fsync", observed_fsync)
    return seen


def test_a_secret_is_never_more_open_than_asked_on_the_way_or_in_place(tmp_path, open_umask, staging_modes):
    secret = tmp_path / "operator.env"
    atomic.write_atomic(secret, b"export EDGEFLEET_S3_SECRET_ACCESS_KEY=s3cr3t\n", mode=0o600)
    assert staging_modes == [("created", 0o600), ("written", 0o600)]
    assert _mode(secret) == 0o600 and secret.read_bytes().endswith(b"s3cr3t\n")
    assert not secret.with_name(secret.name + atomic.TMP).exists()


def test_a_replaced_secret_keeps_the_narrow_mode_and_a_wider_umask_cannot_open_it(tmp_path, staging_modes):
    secret = tmp_path / "operator.env"
    secret.write_bytes(b"old")
    secret.chmod(0o644)  # an older, world-readable copy
    previous = os.umask(0o022)
    try:
        atomic.write_atomic(secret, b"new", mode=0o600)
    finally:
        os.umask(previous)
    assert all(mode == 0o600 for _, mode in staging_modes) and len(staging_modes) == 2
    assert (_mode(secret), secret.read_bytes()) == (0o600, b"new")


def test_the_default_is_readable_by_all_whatever_the_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        atomic.write_atomic(tmp_path / "manifest.json", b"{}")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "manifest.json") == ARTIFACT_FILE_MODE


def test_a_leftover_or_planted_staging_file_is_replaced_never_written_through(tmp_path, open_umask, staging_modes):
    secret = tmp_path / "operator.env"
    elsewhere = tmp_path / "readable-by-all"
    elsewhere.write_bytes(b"untouched")
    elsewhere.chmod(0o666)
    staging = secret.with_name(secret.name + atomic.TMP)
    staging.symlink_to(elsewhere)  # where a crash's leftover (or someone else) left a link to an open file
    atomic.write_atomic(secret, b"secret", mode=0o600)
    assert elsewhere.read_bytes() == b"untouched" and _mode(elsewhere) == 0o666
    assert (_mode(secret), secret.read_bytes(), secret.is_symlink()) == (0o600, b"secret", False)
    assert staging_modes == [("created", 0o600), ("written", 0o600)]
