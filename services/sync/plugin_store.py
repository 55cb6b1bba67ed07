"""The device's plugin store on disk (settings.plugins.dir), and the only code that changes it.

    <root>/<name>/<version>-<sha16>/   plugin.wasm, manifest.json, manifest.sig: installed, verified
    <root>/active.json                 the plugins inference runs, in order (shared.plugin.write_active)
    <root>/.staging/                   downloads in progress (<name>-<version>-<sha16>.part), resumable
    <root>/.sync-state.json            per plugin the version before the active one, plugins a canary
                                       rejected (by SHA-256), a canary pending

The dot-names cannot clash with a plugin's folder: a plugin name starts with a letter or a digit.
Every change is write-to-temporary, fsync, rename, fsync the folder (shared.atomic): a power cut
leaves the old state or the new one, never a half-written plugin where inference could load it; an
install is assembled in `<version>-<sha16>.tmp` and renamed whole. repair() runs at start and mends
what a crash left. A rejected plugin is never chosen again, not even as the version to go back to:
going back to nothing (the plugin removed) is the fail-closed answer.

`.sync-state.json` is the only record of the rejected plugins and of a canary under way: one that cannot
be read is never taken for an empty one (that would forget both) nor rewritten; every read of it raises
PluginStoreStateError until an operator repairs or removes the file, and sync refuses plugin rollouts.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Collection, Container
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.sync import retention
from services.sync.errors import SyncError
from shared.atomic import TMP, fsync_file, make_dir, put_in_place, write_atomic
from shared.logs import fields
from shared.manifest import MANIFEST_FILE, make_dirs
from shared.plugin import (
    ACTIVE_FILE,
    PLUGIN_FILE,
    ActivePlugin,
    ActivePlugins,
    PluginError,
    PluginManifest,
    load_verified_plugin,
    read_active,
    write_active,
)
from shared.registry import SIGNATURE_OBJECT, check_name, check_version

log = logging.getLogger(__name__)

STAGING, STATE = ".staging", ".sync-state.json"


class PluginStoreStateError(SyncError):
    """The plugin store's `.sync-state.json` exists but cannot be read or is not valid: the rejected
    plugins and a pending canary are unknown, so no plugin rollout may proceed until an operator repairs
    or removes the file (removing it forgets them: the operator's decision, never sync's)."""


class PendingPluginCanary(BaseModel):
    """What a restart needs to undo a plugin canary it did not see end."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rollout_id: str
    name: str
    version: int
    sha256: str  # the plugin on trial
    folder: str  # its folder, relative to the store
    previous: str | None  # the folder to go back to, relative to the store; None: the plugin was not running


class PluginStoreState(BaseModel):
    """`.sync-state.json`: what the plugin store remembers beside the active set (read by
    PluginStore.state(), written only by the store, atomically)."""

    model_config = ConfigDict(extra="forbid")

    # Per plugin, the folder of the version that ran before the active one; None: none ran.
    previous: dict[str, str | None] = Field(default_factory=dict)
    rejected: list[str] = Field(default_factory=list)  # SHA-256 of plugins a canary rolled back
    # Written before inference is told to switch and cleared by the verdict: found at start, it means
    # sync died inside the canary (plugins.py decides what that means).
    pending: PendingPluginCanary | None = None


def entry_of(manifest: PluginManifest, folder: str) -> ActivePlugin:
    """The active-set entry of an installed plugin (folder relative to the store)."""
    return ActivePlugin(name=manifest.name, version=manifest.version, sha256=manifest.sha256, folder=folder)


def with_plugin(active: ActivePlugins, name: str, entry: ActivePlugin | None) -> ActivePlugins:
    """`active` with plugin `name` replaced by `entry` (None: removed), every other plugin unchanged,
    in the store's one order (by name): the same set always reads the same."""
    others = [p for p in active.plugins if p.name != name]
    return ActivePlugins(plugins=sorted([*others, *([entry] if entry else [])], key=lambda p: p.name))


class PluginStore:
    """The plugin store under `root` (settings.plugins.dir); the plugin machine (plugins.py) is its one
    writer, through these methods. Folders in entries and records are relative to `root`.

    :param root: the store's folder (created, 0755, if missing).
    :param keep_versions: installed versions of each plugin kept by prune() (besides the active and the
        previous one).
    """

    def __init__(self, root: Path, keep_versions: int) -> None:
        self.root = root
        self.keep_versions = keep_versions
        make_dirs(root / STAGING)

    # -- reading -----------------------------------------------------------------------------------

    def active(self) -> ActivePlugins:
        """The active set; an unreadable one runs nothing (repair() rewrites it at start)."""
        try:
            return read_active(self.root)
        except PluginError as exc:
            log.warning("unreadable active plugin set: running none", extra=fields(error=str(exc)))
            return ActivePlugins()

    def running(self, name: str) -> ActivePlugin | None:
        """The version of plugin `name` in the active set, if any."""
        return next((p for p in self.active().plugins if p.name == name), None)

    def folder(self, entry: ActivePlugin) -> Path:
        """The absolute folder of an active-set entry."""
        return self.root / entry.folder

    def version_dir(self, name: str, version: int, sha256: str) -> Path:
        """<name>/<version>-<sha16>; raises ValueError for a name, version or digest that could escape the store."""
        if name == ACTIVE_FILE:
            raise ValueError(f"a plugin cannot be named {ACTIVE_FILE!r}: the store's active set has that name")
        return self.root / check_name(name) / f"{check_version(version)}-{_digest(sha256)[:16]}"

    def part_file(self, name: str, version: int, sha256: str) -> Path:
        """The staging file of a download; raises ValueError for an unsafe name, version or digest."""
        return self.root / STAGING / f"{check_name(name)}-{check_version(version)}-{_digest(sha256)[:16]}.part"

    def state(self) -> PluginStoreState:
        """The store's record; an empty one for a new store (no file).

        :raises PluginStoreStateError: the file exists but cannot be read or is not valid (fail closed:
            it is never taken for empty, and never overwritten).
        """
        path = self.root / STATE
        try:
            return PluginStoreState.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return PluginStoreState()
        except (OSError, ValidationError) as exc:
            raise PluginStoreStateError(
                f"the plugin store's state {path} is unreadable or invalid ({str(exc)[:300]}): the rejected "
                "plugins and a pending canary are unknown, so plugin rollouts are refused until an operator "
                "repairs or removes it") from None

    def is_rejected(self, sha256: str) -> bool:
        """Whether a canary on this device rejected the plugin. Raises PluginStoreStateError."""
        return sha256 in self.state().rejected

    def pending_canary(self) -> PendingPluginCanary | None:
        """The canary recorded as under way, if any. Raises PluginStoreStateError."""
        return self.state().pending

    def verified(self, folder: str | None) -> ActivePlugin | None:
        """The entry for an installed folder (relative), if it verifies whole and no canary rejected it.
        Raises PluginStoreStateError."""
        return self._verified(folder, self.state().rejected)

    def previous(self, name: str) -> ActivePlugin | None:
        """The version of `name` to go back to: the one that ran before, if it still verifies and was not
        rejected; otherwise none (the plugin is removed: nothing unknown is run in its place)."""
        return self.verified(self.state().previous.get(name))

    # -- changing ----------------------------------------------------------------------------------

    def install(self, part: Path, manifest_bytes: bytes, signature: bytes, manifest: PluginManifest) -> ActivePlugin:
        """Moves a verified download into <name>/<version>-<sha16>/ in one rename.

        The folder is assembled in <name>/<version>-<sha16>.tmp, every file fsynced, verified whole
        (shared.plugin.load_verified_plugin) and only then renamed into place.

        :param part: the verified module (its size and SHA-256 checked against the manifest); moved, not copied.
        :param manifest_bytes: manifest.json exactly as the registry holds it (what the signature covers).
        :param signature: manifest.sig as the registry holds it.
        :param manifest: the verified manifest those bytes hold.
        :returns: the installed plugin's active-set entry (not yet active).
        :raises PluginError: the assembled folder does not verify (it is removed; nothing is installed).
        :raises ValueError: a name or version that could escape the store.
        :raises OSError: the disk.
        """
        final = self.version_dir(manifest.name, manifest.version, manifest.sha256)
        staging = final.with_name(final.name + TMP)
        shutil.rmtree(staging, ignore_errors=True)
        make_dirs(final.parent)
        make_dir(staging)
        fsync_file(part)
        os.replace(part, staging / PLUGIN_FILE)
        write_atomic(staging / MANIFEST_FILE, manifest_bytes)
        write_atomic(staging / SIGNATURE_OBJECT, signature)
        put_in_place(staging, final, load_verified_plugin)
        return entry_of(manifest, str(final.relative_to(self.root)))

    def set_active(self, active: ActivePlugins, name: str, remember_previous: bool = True) -> None:
        """Writes the active set in which plugin `name` changed (atomically), remembering the version of
        `name` it replaces as the one to go back to (remember_previous), or forgetting it.

        :raises PluginStoreStateError: the record cannot be read (nothing is written).
        :raises OSError: the disk.
        """
        state = self.state()
        leaving = self.running(name)
        state.previous[name] = leaving.folder if remember_previous and leaving else None
        write_active(self.root, active)
        self._save(state)

    def begin_canary(self, pending: PendingPluginCanary) -> None:
        """Persists the pending canary (atomically, fsynced): called BEFORE inference is told to switch.

        :raises ValueError: another canary is pending: it must be resolved (rolled back) first, never
            overwritten, or a restart could not undo it.
        :raises PluginStoreStateError: the record cannot be read.
        """
        state = self.state()
        if state.pending is not None:
            raise ValueError(f"the canary of {state.pending.name} v{state.pending.version} (rollout "
                             f"{state.pending.rollout_id}) is still pending: resolve it first")
        state.pending = pending
        self._save(state)

    def end_canary(self) -> None:
        """Clears the pending canary (its verdict is in the store). Raises PluginStoreStateError."""
        state = self.state()
        if state.pending is not None:
            state.pending = None
            self._save(state)

    def reject(self, sha256: str) -> None:
        """Rejects a plugin on this device for good. Raises PluginStoreStateError."""
        state = self.state()
        if sha256 not in state.rejected:
            state.rejected.append(sha256)
            self._save(state)

    def prune(self, name: str) -> list[Path]:
        """Removes installed versions of `name` beyond the newest keep_versions, never the active or the
        previous one. Raises PluginStoreStateError."""
        keep = {self.root / p.folder for p in self.active().plugins if p.name == name}
        if previous := self.state().previous.get(name):
            keep.add(self.root / previous)
        return retention.prune(self._installed(name), self.keep_versions, keep)

    def discard_parts(self, keep: Collection[Path] = ()) -> None:
        """Deletes every download in staging but those in `keep`."""
        retention.discard_parts(self.root / STAGING, keep)

    # -- start-up ----------------------------------------------------------------------------------

    def repair(self) -> list[str]:
        """Mends what a crash left; returns what it did, in words (empty: nothing to mend).

        Half-written installs and temporaries are removed; an active plugin whose folder is gone, does
        not verify, or was rejected leaves the active set (fail closed: inference runs the others). An
        unreadable state file is left as it is and said so (the rejections cannot be checked; plugin
        rollouts are refused until it is repaired): sync still starts, models still roll out.
        """
        notes = []
        try:
            rejected: Container[str] = self.state().rejected
        except PluginStoreStateError as exc:
            rejected = ()
            notes.append(str(exc))
        for leftover in [*self.root.glob(f"*{TMP}"), *self.root.glob(f"*/*{TMP}")]:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
            notes.append(f"removed the half-written {leftover.relative_to(self.root)}")
        try:
            recorded = read_active(self.root)
        except PluginError as exc:
            recorded = ActivePlugins()
            notes.append(f"the active plugin set was unreadable ({exc}); running none")
            write_active(self.root, recorded)
        usable = [p for p in recorded.plugins if self._usable(p, rejected)]
        notes.extend(f"stopped {p.name} v{p.version}: its folder {p.folder} is unusable or rejected"
                     for p in recorded.plugins if p not in usable)
        if len(usable) != len(recorded.plugins):
            write_active(self.root, ActivePlugins(plugins=usable))
        for note in notes:
            log.warning("plugin store repaired", extra=fields(action=note))
        return notes

    # -- internals ---------------------------------------------------------------------------------

    def _usable(self, entry: ActivePlugin, rejected: Container[str]) -> bool:
        found = self._verified(entry.folder, rejected)
        return found is not None and found.sha256 == entry.sha256 and found.name == entry.name

    def _verified(self, folder: str | None, rejected: Container[str]) -> ActivePlugin | None:
        if folder is None:
            return None
        try:
            manifest, _ = load_verified_plugin(self.root / folder)
        except PluginError as exc:
            log.warning("plugin version unusable", extra=fields(folder=folder, error=str(exc)))
            return None
        return None if manifest.sha256 in rejected else entry_of(manifest, folder)

    def _installed(self, name: str) -> list[Path]:
        folder = self.root / check_name(name)
        return [p for p in folder.iterdir() if p.is_dir() and not p.name.endswith(TMP)] if folder.is_dir() else []

    def _save(self, state: PluginStoreState) -> None:
        write_atomic(self.root / STATE, state.model_dump_json(indent=1).encode())


def _digest(sha256: str) -> str:
    if not (len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
        raise ValueError(f"not a SHA-256 hex digest: {sha256[:80]!r}")
    return sha256
