"""The device's model store on disk, and the only code that changes it.

    <store>/versions/<name>/<version>/   model.onnx, manifest.json, manifest.sig: installed, verified
                                         (a cascade: cascade.json, manifest.json, manifest.sig and
                                         stage1/, stage2/ each with its own three: one version, one folder)
    <store>/fallback/                    the seed model: never removed, the last resort
    <store>/staging/                     downloads in progress (<name>-<version>-<sha>.part), resumable
    <store>/current -> versions/...      the model inference serves (a symlink, swapped atomically)
    <store>/state.json                   the previous model, models a canary rejected, a canary pending

Every change is write-to-temporary, fsync, rename, fsync the folder: a power cut leaves either the old
state or the new one, never a half-written model where inference could load it. Files are 0644 and
folders 0755 before they are renamed into place (shared.manifest.ARTIFACT_FILE_MODE), whatever the
umask: inference may run as another user than sync. repair() runs at
start and mends what a crash left. A rejected model (by SHA-256) is never chosen again: not as the
previous model, not as the last good one, not by repair. A model folder is verified whole
(shared.cascade.verify_folder): a cascade with one damaged member is a damaged version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.sync import retention
from shared.atomic import TMP, fsync_dir, fsync_file, make_dir, put_in_place, write_atomic
from shared.cascade import STAGE_FOLDERS, is_cascade, verify_folder
from shared.logs import fields
from shared.manifest import MANIFEST_FILE, MODEL_FILE, ModelError, ModelManifest, make_dirs
from shared.registry import SIGNATURE_OBJECT, check_name, check_version

log = logging.getLogger(__name__)

CURRENT, FALLBACK, VERSIONS, STAGING = "current", "fallback", "versions", "staging"
QUARANTINE, STATE = "quarantine", "state.json"


@dataclass
class StoreState:
    previous: str | None = None  # relative path of the model served before the current one
    rejected: list[str] = field(default_factory=list)  # SHA-256 of models a canary rolled back
    # A canary under way (PendingCanary's fields), written before the switch and cleared by its verdict:
    # found at start, it means sync died inside the canary (rollout.py decides what that means).
    pending: dict[str, Any] | None = None  # as json.loads gave it: PendingCanary(**pending) checks it


@dataclass(frozen=True)
class PendingCanary:
    """What a restart needs to undo a canary it did not see end."""

    rollout_id: str
    model: str
    version: int
    sha256: str  # the model on trial
    folder: str  # its folder, relative to the store
    previous: str  # the folder to go back to, relative to the store


@dataclass(frozen=True)
class StagedMember:
    """A cascade's member ready to install: its verified download and its signed manifest, as fetched."""

    folder: str  # the cascade's stage folder: stage1 or stage2
    part: Path  # the model file, its size and SHA-256 already checked against manifest_bytes
    manifest_bytes: bytes
    signature: bytes


class ModelStore:
    def __init__(self, root: Path, keep_versions: int) -> None:
        self.root = root
        self.keep_versions = keep_versions
        for folder in (VERSIONS, STAGING):
            make_dirs(root / folder)

    # -- reading -----------------------------------------------------------------------------------

    @property
    def current_link(self) -> Path:
        return self.root / CURRENT

    def current(self) -> tuple[Path, ModelManifest]:
        """The folder inference serves and its manifest, the folder verified whole."""
        target = self.root / os.readlink(self.current_link)
        return target, verify_folder(target)

    def version_dir(self, name: str, version: int) -> Path:
        """versions/<name>/<version>; raises ValueError for a name or version that could escape the store."""
        return self.root / VERSIONS / check_name(name) / str(check_version(version))

    def part_file(self, name: str, version: int, sha256: str) -> Path:
        """The staging file of a download; raises ValueError for an unsafe name, version or digest."""
        if not sha256.isalnum():
            raise ValueError(f"not a SHA-256 hex digest: {sha256[:80]!r}")
        return self.root / STAGING / f"{check_name(name)}-{check_version(version)}-{sha256[:16]}.part"

    def state(self) -> StoreState:
        try:
            return StoreState(**json.loads((self.root / STATE).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return StoreState()

    def save_state(self, state: StoreState) -> None:
        write_atomic(self.root / STATE, json.dumps(state.__dict__).encode())

    def pending_canary(self) -> PendingCanary | None:
        """The canary recorded as under way, if any (a damaged record reads as none found)."""
        recorded = self.state().pending
        try:
            return PendingCanary(**recorded) if recorded else None
        except TypeError:
            log.warning("unreadable pending canary record ignored", extra=fields(record=str(recorded)[:200]))
            return None

    def begin_canary(self, pending: PendingCanary) -> None:
        """Persists the pending canary (atomically, fsynced): called BEFORE inference is told to switch."""
        state = self.state()
        state.pending = dict(pending.__dict__)
        self.save_state(state)

    def end_canary(self) -> None:
        state = self.state()
        if state.pending is not None:
            state.pending = None
            self.save_state(state)

    def is_rejected(self, folder: Path) -> bool:
        """Whether the model in folder was rejected by a canary (raises ModelError if it does not verify)."""
        return verify_folder(folder).sha256 in self.state().rejected

    # -- start-up ----------------------------------------------------------------------------------

    def seed(self, seed_dir: Path) -> None:
        """Copies the seed model (or cascade) in as the fallback, once."""
        fallback = self.root / FALLBACK
        try:
            verify_folder(fallback)
            return
        except ModelError:
            pass
        seed = verify_folder(seed_dir)  # refuse to seed from a broken model
        staging = self.root / (FALLBACK + TMP)
        shutil.rmtree(staging, ignore_errors=True)
        make_dir(staging)
        _copy_model(seed_dir, staging, seed.file)
        for stage in STAGE_FOLDERS if is_cascade(seed) else ():
            make_dir(staging / stage)
            _copy_model(seed_dir / stage, staging / stage, MODEL_FILE)
        verify_folder(staging)
        shutil.rmtree(fallback, ignore_errors=True)
        os.replace(staging, fallback)
        fsync_dir(self.root)
        log.info("fallback model seeded", extra=fields(source=str(seed_dir)))

    def repair(self) -> list[str]:
        """Mends what a crash left; returns what it did, in words (empty: nothing to mend)."""
        notes = []
        for leftover in [*self.root.glob(f"*{TMP}"), *(self.root / VERSIONS).glob(f"*/*{TMP}")]:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
            notes.append(f"removed the half-written {leftover.relative_to(self.root)}")
        for folder in self._installed():
            try:
                verify_folder(folder)
            except ModelError as exc:
                self.quarantine(folder)
                notes.append(f"quarantined {folder.relative_to(self.root)}: {exc}")
        if not self.current_link.is_symlink():  # a new store, not a damaged one
            self.activate(self.last_good(), remember_previous=False)
        try:
            folder, manifest = self.current()
            if manifest.sha256 in self.state().rejected and folder != self.root / FALLBACK:
                raise ModelError("a canary rejected it")
        except (OSError, ModelError) as exc:
            good = self.last_good()
            self.activate(good, remember_previous=False)
            notes.append(f"the active model was unusable ({exc}); now serving {good.relative_to(self.root)}")
        for note in notes:
            log.warning("store repaired", extra=fields(action=note))
        return notes

    def last_good(self) -> Path:
        """The newest installed version that verifies and was not rejected, else the fallback (the last
        resort, served even if rejected: a device serving nothing helps nobody)."""
        for folder in sorted(self._installed(), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                if not self.is_rejected(folder):
                    return folder
            except ModelError:
                continue
        verify_folder(self.root / FALLBACK)
        return self.root / FALLBACK

    # -- changing ----------------------------------------------------------------------------------

    def install(self, part: Path, manifest_bytes: bytes, signature: bytes, manifest: ModelManifest,
                members: Sequence[StagedMember] = ()) -> Path:
        """Moves a verified download into versions/<name>/<version>/ in one rename; a cascade with its members.

        The whole folder is assembled in versions/<name>/<version>.tmp, every file fsynced, verified whole
        (shared.cascade.verify_folder), and only then renamed into place: inference never sees a cascade
        with one member missing, and a crash leaves a .tmp that repair() removes.

        Args:
            part: the verified artifact (model.onnx, or a cascade's cascade.json), moved, not copied.
            manifest_bytes, signature: manifest.json and manifest.sig exactly as the registry holds them.
            manifest: the verified manifest those bytes hold.
            members: a cascade's members (none for one model); their parts are moved too.

        Returns:
            The installed folder.

        Raises:
            ModelError: the assembled folder does not verify (it is removed; nothing is installed).
            ValueError: a name or version that could escape the store.
            OSError: the disk.
        """
        final = self.version_dir(manifest.name, manifest.version)
        staging = final.with_name(final.name + TMP)
        shutil.rmtree(staging, ignore_errors=True)
        make_dirs(staging.parent)
        make_dir(staging)
        self._stage(part, staging, manifest.file, manifest_bytes, signature)
        placed: dict[Path, Path] = {}
        for member in members:
            make_dir(staging / member.folder)
            if member.part in placed:  # both stages pin the same model: one download, two copies
                shutil.copyfile(placed[member.part], member.part)
            placed[member.part] = staging / member.folder / MODEL_FILE
            self._stage(member.part, staging / member.folder, MODEL_FILE, member.manifest_bytes, member.signature)
        put_in_place(staging, final, verify_folder)
        return final

    def activate(self, folder: Path, remember_previous: bool = True) -> None:
        """Points `current` at folder in one atomic rename of a symlink."""
        state = self.state()
        if remember_previous:
            try:
                state.previous = str(self.current()[0].relative_to(self.root))
            except (OSError, ModelError):
                pass
        link = self.root / (CURRENT + TMP)
        link.unlink(missing_ok=True)
        link.symlink_to(folder.relative_to(self.root))
        os.replace(link, self.current_link)
        fsync_dir(self.root)
        self.save_state(state)

    def previous(self) -> Path:
        """The model to go back to: the one served before, if it still verifies and was not rejected,
        else the last good one."""
        recorded = self.state().previous
        if recorded:
            try:
                if not self.is_rejected(self.root / recorded):
                    return self.root / recorded
            except ModelError:
                pass
        return self.last_good()

    def reject(self, sha256: str) -> None:
        state = self.state()
        if sha256 not in state.rejected:
            state.rejected.append(sha256)
            self.save_state(state)

    def prune(self) -> list[Path]:
        """Removes installed versions beyond the newest keep_versions, never the current or previous one."""
        keep = set()
        try:
            keep.add(self.current()[0])
        except (OSError, ModelError):
            pass
        if previous := self.state().previous:
            keep.add(self.root / previous)
        return retention.prune(self._installed(), self.keep_versions, keep)

    def discard_parts(self, keep: Collection[Path] = ()) -> None:
        """Deletes every download in staging but those in `keep` (a cascade's document and members)."""
        retention.discard_parts(self.root / STAGING, keep)

    # -- internals ---------------------------------------------------------------------------------

    def _installed(self) -> list[Path]:
        return [p for p in (self.root / VERSIONS).glob("*/*") if p.is_dir() and not p.name.endswith(TMP)]

    def quarantine(self, folder: Path) -> None:
        target = self.root / QUARANTINE / f"{folder.parent.name}-{folder.name}-{int(time.time())}"
        make_dirs(target.parent)
        os.replace(folder, target)

    def _stage(self, part: Path, folder: Path, file: str, manifest_bytes: bytes, signature: bytes) -> None:
        """A verified download and its signed manifest into a staging folder, each fsynced."""
        fsync_file(part)
        os.replace(part, folder / file)
        write_atomic(folder / MANIFEST_FILE, manifest_bytes)
        write_atomic(folder / SIGNATURE_OBJECT, signature)

def _copy_model(source: Path, dest: Path, file: str) -> None:
    """A model folder's manifest, its file and its signature (where there is one) copied and fsynced."""
    for name in (file, MANIFEST_FILE, SIGNATURE_OBJECT):
        if name != SIGNATURE_OBJECT or (source / name).exists():
            shutil.copyfile(source / name, dest / name)
            fsync_file(dest / name)

