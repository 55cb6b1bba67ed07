"""The device's model store with a cascade: installed whole in one rename, verified whole, and quarantined
whole when one of its members is damaged. Real files, the real model (its members are re-saves of it)."""

from __future__ import annotations

import shutil

import pytest

from edgefleet.models.cascade import assemble
from edgefleet.models.install import resave
from services.sync.store import ModelStore, StagedMember
from shared.cascade import CASCADE_FILE, STAGE_FOLDERS, read_spec, verify_folder
from shared.manifest import MANIFEST_FILE, MODEL_FILE, ModelError, ModelManifest
from shared.registry import SIGNATURE_OBJECT

CASCADE = "efficientnet-lite0-cascade"



@pytest.fixture
def cascade_dir(tmp_path, model_dir):
    """A cascade of a re-save of the real model (stage 1) and the model itself (stage 2)."""
    small = tmp_path / "small"
    resave(model_dir, small, "stage 1", name="efficientnet-lite0-small")
    assemble(small, model_dir, tmp_path / "cascade", name=CASCADE, version=1, metric="margin", threshold=0.3)
    return tmp_path / "cascade"


def _staged(store: ModelStore, source, name: str, version: int, sha256: str, file: str):
    """A copy of a verified file in the store's staging folder, as sync's download leaves it."""
    part = store.part_file(name, version, sha256)
    shutil.copyfile(source / file, part)
    return part


def _install(store: ModelStore, cascade_dir, stage2_file=None):
    """Installs the cascade as sync does: its document and each member from a staging file, with the
    manifests as fetched (signatures are sync's check, not the store's: any bytes do here)."""
    manifest = ModelManifest.model_validate_json((cascade_dir / MANIFEST_FILE).read_bytes())
    part = _staged(store, cascade_dir, manifest.name, manifest.version, manifest.sha256, CASCADE_FILE)
    members = []
    for pin in read_spec(cascade_dir / CASCADE_FILE).stages:
        source = cascade_dir / pin.folder
        member_part = _staged(store, source, pin.name, pin.version, pin.sha256, MODEL_FILE)
        if pin.folder == "stage2" and stage2_file is not None:
            shutil.copyfile(stage2_file, member_part)
        members.append(StagedMember(pin.folder, member_part, (source / MANIFEST_FILE).read_bytes(), b"{}"))
    return store.install(part, (cascade_dir / MANIFEST_FILE).read_bytes(), b"{}", manifest, members), manifest


def test_a_cascade_is_installed_whole_in_one_folder_and_verified_whole(store, cascade_dir):
    folder, manifest = _install(store, cascade_dir)
    assert folder == store.root / "versions" / CASCADE / "1"
    assert sorted(p.name for p in folder.iterdir()) == sorted([CASCADE_FILE, MANIFEST_FILE, SIGNATURE_OBJECT,
                                                               *STAGE_FOLDERS])
    for stage in STAGE_FOLDERS:
        assert sorted(p.name for p in (folder / stage).iterdir()) == [MANIFEST_FILE, SIGNATURE_OBJECT, MODEL_FILE]
    assert verify_folder(folder).sha256 == manifest.sha256
    # Every download was moved in, none left behind, and no half-assembled folder beside the version.
    assert not list((store.root / "staging").iterdir())
    assert [p.name for p in folder.parent.iterdir()] == ["1"]
    store.activate(folder)
    assert store.current() == (folder, manifest)


def test_a_cascade_whose_member_does_not_verify_is_not_installed_at_all(store, cascade_dir, model_dir):
    # Stage 2's staging file holds other bytes than its manifest says: the assembled folder does not
    # verify, so nothing of it reaches versions/, not even a half-assembled .tmp folder.
    other = cascade_dir.parent / "other"
    resave(model_dir, other, "another build")
    with pytest.raises(ModelError, match="stage2"):
        _install(store, cascade_dir, stage2_file=other / MODEL_FILE)
    assert not (store.root / "versions" / CASCADE).exists() or not any((store.root / "versions" / CASCADE).iterdir())
    assert store.current()[0].name == "fallback"


def test_repair_quarantines_a_cascade_whose_member_was_damaged_and_serves_the_last_good(store, cascade_dir):
    folder, _ = _install(store, cascade_dir)
    store.activate(folder)
    # A crash while a later cascade was being assembled leaves its .tmp folder: repair removes it.
    half = folder.with_name("2.tmp")
    shutil.copytree(folder, half)
    (folder / "stage1" / MODEL_FILE).write_bytes(b"\0" * 100)  # a bad flash block in one member
    notes = store.repair()
    assert any("half-written" in n for n in notes) and not half.exists()
    assert any(f"quarantined versions/{CASCADE}/1" in n and "stage1" in n for n in notes), notes
    assert any("the active model was unusable" in n for n in notes)
    assert store.current()[0].name == "fallback" and not folder.exists()
    # Quarantined as one unit: the cascade's folder with both members, kept for a post-mortem.
    (quarantined,) = (store.root / "quarantine").iterdir()
    assert {p.name for p in quarantined.iterdir()} >= {CASCADE_FILE, *STAGE_FOLDERS}
    assert store.last_good().name == "fallback"
