"""The device's model store on a real file system: atomic installs, repair after a crash, fallback."""

from __future__ import annotations

import os
import stat

import pytest

from edgefleet.models.install import resave
from services.sync.store import ModelStore
from shared.manifest import MANIFEST_FILE, MODEL_FILE, load_verified
from shared.registry import SIGNATURE_OBJECT


def _install(store, model_dir, tmp_path, version):
    source = tmp_path / f"src-{version}"
    manifest = resave(model_dir, source, f"build {version}", version=version)
    part = store.part_file(manifest.name, version, manifest.sha256)
    part.write_bytes((source / MODEL_FILE).read_bytes())
    return store.install(part, (source / MANIFEST_FILE).read_bytes(), b"{}", manifest)


def test_a_new_store_serves_its_fallback(store):
    folder, manifest = store.current()
    assert folder.name == "fallback" and manifest.version == 1


def test_install_and_activate_remember_the_previous_model(store, model_dir, tmp_path):
    folder = _install(store, model_dir, tmp_path, 2)
    store.activate(folder)
    assert store.current()[1].version == 2 and store.previous().name == "fallback"


def test_repair_removes_half_written_files_and_replaces_a_corrupt_active_model(store, model_dir, tmp_path):
    good = _install(store, model_dir, tmp_path, 2)
    bad = _install(store, model_dir, tmp_path, 3)
    os.utime(good, (1, 1))  # v3 is the newest, v2 the last good one after v3 is damaged
    store.activate(bad)
    (bad / MODEL_FILE).write_bytes(b"\0" * 100)  # a power cut mid-write, or a bad flash block
    half = store.root / "versions" / "efficientnet-lite0" / "4.tmp"
    half.mkdir()
    (half / MODEL_FILE).write_bytes(b"partial")
    notes = store.repair()
    assert any("half-written" in n for n in notes) and any("quarantined" in n for n in notes)
    assert any("the active model was unusable" in n for n in notes)
    assert store.current()[0] == good and not half.exists()
    assert list((store.root / "quarantine").iterdir())  # kept for a post-mortem, not deleted


def test_the_fallback_is_the_last_resort_and_is_never_pruned(store, model_dir, tmp_path):
    for version in (2, 3, 4, 5):
        store.activate(_install(store, model_dir, tmp_path, version))
    removed = store.prune()
    assert sorted(p.name for p in removed) == ["2", "3"]
    assert load_verified(store.root / "fallback")[0].version == 1
    assert store.current()[1].version == 5 and store.previous().name == "4"
    for folder in (store.root / "versions" / "efficientnet-lite0").iterdir():
        (folder / MODEL_FILE).write_bytes(b"x")
    store.repair()
    assert store.current()[0].name == "fallback"


def _sha(folder):
    return load_verified(folder)[0].sha256


def test_a_rejected_model_is_never_previous_last_good_or_repaired_to(store, model_dir, tmp_path):
    v2 = _install(store, model_dir, tmp_path, 2)
    v3 = _install(store, model_dir, tmp_path, 3)
    os.utime(v2, (1, 1))  # v3 is the newest installed version
    store.activate(v3)
    store.activate(v2)  # previous: v3
    store.reject(_sha(v3))
    assert store.previous() == v2  # the last good one, not the recorded (rejected) v3
    assert store.last_good() == v2
    store.reject(_sha(v2))
    assert store.last_good().name == "fallback" and store.previous().name == "fallback"
    notes = store.repair()  # the active v2 is rejected: repair moves off it, and not to v3
    assert store.current()[0].name == "fallback" and any("rejected" in n for n in notes)


def test_names_and_versions_are_checked_before_they_become_paths(store):
    for name, version in (("../../etc", 1), ("a/b", 1), ("", 1), ("m", 0), ("m", -1)):
        with pytest.raises(ValueError):
            store.version_dir(name, version)
        with pytest.raises(ValueError):
            store.part_file(name, version, "ab" * 32)
    with pytest.raises(ValueError):
        store.part_file("m", 1, "../x")
    assert store.version_dir("efficientnet-lite0", 2) == store.root / "versions" / "efficientnet-lite0" / "2"


def test_a_pending_canary_is_persisted_and_cleared(store):
    from services.sync.store import PendingCanary

    pending = PendingCanary(rollout_id="r", model="m", version=2, sha256="ab" * 32, folder="versions/m/2",
                            previous="fallback")
    store.begin_canary(pending)
    reopened = ModelStore(store.root, keep_versions=2)  # what a restarted sync reads
    assert reopened.pending_canary() == pending
    reopened.end_canary()
    assert store.pending_canary() is None and not list(store.root.glob("*.tmp"))


def test_the_store_writes_models_every_user_can_read_whatever_the_umask(tmp_path, model_dir):
    """Inference may run as another user than sync: each file the store installs is 0644 and each folder
    0755 before it is renamed into place, even under umask 077 (and a download's .part written 0600)."""
    old = os.umask(0o077)
    try:
        store = ModelStore(tmp_path / "store", keep_versions=2)
        store.seed(model_dir)
        store.repair()
        installed = _install(store, model_dir, tmp_path, 2)
        store.activate(installed)
    finally:
        os.umask(old)
    root = tmp_path / "store"
    folders = [root, root / "fallback", root / "versions", root / "staging", installed.parent, installed]
    files = [*(installed / n for n in (MODEL_FILE, MANIFEST_FILE, SIGNATURE_OBJECT)),
             root / "fallback" / MODEL_FILE, root / "fallback" / MANIFEST_FILE, root / "state.json"]
    assert {str(p.relative_to(root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders + files} == {
        **{str(p.relative_to(root)): "0o755" for p in folders}, **{str(p.relative_to(root)): "0o644" for p in files}}
    assert load_verified(store.current()[0])[0].version == 2
