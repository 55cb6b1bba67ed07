"""A plugin: an operator's rule as a WebAssembly module (wasm32-wasi) that the inference service runs
on each prediction, shipped like a model (signed manifest in the registry, rollouts, atomic store).

The ABI (exports, imports, the documents that cross linear memory) is docs/plugins.md; this module
holds what both sides of the wire share: the manifest, the result document, the active set that sync
writes and inference reads, the caps, and the check that keeps a plugin's messages under its topic.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.atomic import write_atomic
from shared.errors import EdgefleetError
from shared.manifest import MANIFEST_FILE, ModelName, ModelVersion, make_dirs, sha256_of
from shared.schemas import MAX_STR, MAX_TOP, ClassScore, ModelRef

# The ABI this release speaks (docs/plugins.md). A module's `edgefleet_abi_version` export must return it.
ABI_VERSION = 1
PLUGIN_FILE = "plugin.wasm"
# Written by sync (atomically) in the plugin store's root; read by inference at start.
ACTIVE_FILE = "active.json"
WASM_PAGE = 64 << 10

# Ceilings no manifest can raise: a device setting may lower them (PluginSettings).
MAX_PLUGIN_BYTES = 16 << 20
MAX_MEMORY_PAGES = 4096  # 256 MiB
MAX_FUEL = 1_000_000_000
MAX_DEADLINE_MS = 1000
MAX_RESULT_BYTES = 1 << 20
MAX_EMITS = 64
MAX_EMIT_BYTES = 256 << 10
MAX_INFER_CALLS = 8
MAX_CONFIG_ENTRIES = 256

# An emitted message's topic suffix: 1-8 levels of path-safe names, no wildcards, no '..'.
_LEVEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class PluginError(EdgefleetError, RuntimeError):
    """A plugin that must not run: missing, unreadable, not what its manifest says, or not our ABI."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, str_max_length=MAX_STR)


class PluginLimits(_Strict):
    """What one call may spend. The device clamps each to its own ceiling (PluginSettings)."""

    memory_pages: int = Field(256, ge=1, le=MAX_MEMORY_PAGES, description="Linear memory, in 64 KiB pages.")
    fuel: int = Field(10_000_000, ge=1000, le=MAX_FUEL, description="Wasm instructions (roughly) per call.")
    deadline_ms: int = Field(50, ge=1, le=MAX_DEADLINE_MS, description="Wall time per call, host calls included.")
    result_bytes: int = Field(64 << 10, ge=16, le=MAX_RESULT_BYTES, description="Largest result document.")
    emits: int = Field(4, ge=0, le=MAX_EMITS, description="Messages per call.")
    emit_bytes: int = Field(16 << 10, ge=1, le=MAX_EMIT_BYTES, description="Largest message payload.")
    infer_calls: int = Field(0, ge=0, le=MAX_INFER_CALLS, description="`infer` imports per call (0: none).")


class DirGrant(_Strict):
    """A host folder the plugin may read (never write), seen at `guest` inside the sandbox."""

    guest: str = Field(pattern=r"^/[A-Za-z0-9_./-]{0,255}$")
    host: str = Field(pattern=r"^/[^\x00]{0,1023}$")


class PluginGrants(_Strict):
    """What the sandbox lets the plugin reach; nothing is granted by default (no files, no environment,
    no frame, no model). WASI preview 1 has no way to open a socket, so no network can be granted."""

    dirs: Annotated[list[DirGrant], Field(max_length=16)] = Field(default_factory=list)
    env: Annotated[dict[str, str], Field(max_length=64)] = Field(default_factory=dict)
    frame: bool = False  # the `frame` import: the encoded frame of the prediction
    infer: bool = False  # the `infer` and `infer_tensor` imports: the served model

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"environment variable name {name!r} is not a plain identifier")
        return value


class PluginManifest(_Strict):
    """A plugin version: what `edgefleet plugin publish` signs and sync verifies before installing."""

    kind: Literal["plugin"] = "plugin"
    name: ModelName
    version: ModelVersion
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0, le=MAX_PLUGIN_BYTES)
    file: Literal["plugin.wasm"] = "plugin.wasm"
    abi: int = Field(ge=1)
    description: str = ""
    limits: PluginLimits = Field(default_factory=PluginLimits)
    grants: PluginGrants = Field(default_factory=PluginGrants)
    # Given to the optional `edgefleet_init` export as a JSON object: one module, configured per site.
    config: Annotated[dict[str, str], Field(max_length=MAX_CONFIG_ENTRIES)] = Field(default_factory=dict)
    # How it was built (compiler, source digest), so a result can be reproduced.
    recipe: dict[str, str] = Field(default_factory=dict)
    min_edgefleet: str | None = None
    created_at: float

    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version, sha256=self.sha256)


class PluginResult(_Strict):
    """What `edgefleet_on_prediction` returns (docs/plugins.md): keep the prediction, drop it, or
    replace its classes (names, scores, order); nothing else of a prediction can be changed."""

    action: Literal["keep", "drop", "replace"]
    top: Annotated[list[ClassScore], Field(max_length=MAX_TOP)] | None = None

    def model_post_init(self, _context: object) -> None:
        if (self.action == "replace") != (self.top is not None):
            raise ValueError("'top' comes with action 'replace', and only with it")


class ActivePlugin(_Strict):
    name: ModelName
    version: ModelVersion
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    folder: str  # relative to the plugin store's root

    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version, sha256=self.sha256)


class ActivePlugins(_Strict):
    """The plugins a device runs, in order: ACTIVE_FILE in the plugin store's root."""

    plugins: Annotated[list[ActivePlugin], Field(max_length=64)] = Field(default_factory=list)


def check_emit_suffix(suffix: str) -> str:
    """A plugin's message topic below edgefleet/<device>/plugins/<name>/: 1-8 path-safe levels.

    :raises ValueError: for anything else (wildcards, '..', empty levels, a leading '/'), which would
        let a plugin publish outside its own topic.
    """
    levels = suffix.split("/")
    if not 1 <= len(levels) <= 8 or any(not _LEVEL.fullmatch(level) or ".." in level for level in levels):
        raise ValueError(f"topic suffix {suffix[:80]!r} must be 1-8 levels of letters, digits, '_', '.', '-'")
    return suffix


def load_verified_plugin(folder: Path) -> tuple[PluginManifest, Path]:
    """A plugin folder's manifest, with its module's size and SHA-256 checked against it.

    :raises PluginError: the manifest is missing or invalid, or the module is not what it says.
    """
    try:
        manifest = PluginManifest.model_validate_json((folder / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        raise PluginError(f"no {MANIFEST_FILE} in {folder}") from None
    except (OSError, ValueError) as exc:
        raise PluginError(f"{folder / MANIFEST_FILE} is not a valid plugin manifest: {exc}") from exc
    module = folder / manifest.file
    try:
        size = module.stat().st_size
        if size != manifest.size_bytes:
            raise PluginError(f"{module} is {size} bytes, its manifest says {manifest.size_bytes}")
        if (actual := sha256_of(module)) != manifest.sha256:
            raise PluginError(f"{module} has SHA-256 {actual}, its manifest says {manifest.sha256}")
    except OSError as exc:
        raise PluginError(f"{module} cannot be read: {exc}") from exc
    if manifest.abi != ABI_VERSION:
        raise PluginError(f"{manifest.name} v{manifest.version} speaks plugin ABI {manifest.abi}; "
                          f"this device speaks {ABI_VERSION}")
    return manifest, module


def read_active(root: Path) -> ActivePlugins:
    """The active set in a plugin store (none when the file is missing).

    :raises PluginError: the file exists but is not a valid active set.
    """
    try:
        return ActivePlugins.model_validate_json((root / ACTIVE_FILE).read_bytes())
    except FileNotFoundError:
        return ActivePlugins()
    except (OSError, ValueError) as exc:
        raise PluginError(f"{root / ACTIVE_FILE} is not a valid active plugin set: {exc}") from exc


def write_active(root: Path, active: ActivePlugins) -> None:
    """Replaces the active set atomically (shared.atomic.write_atomic), readable by all (0644): inference
    may run as another user than the writer.

    :raises OSError: the disk (the old set is left as it was).
    """
    make_dirs(root)
    write_atomic(root / ACTIVE_FILE, json.dumps(active.model_dump(mode="json"), indent=1).encode())
