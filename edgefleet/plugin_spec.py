"""What a plugin's author hands in before it is published: the spec (plugin.json: the PluginManifest
fields an author chooses) and the module, checked by the device's own loader (services.inference.wasm,
docs/plugins.md): valid wasm32, the ABI's exports and imports, `edgefleet_abi_version()` this release's,
`_initialize` and `edgefleet_init` (with the spec's config) run in the device's sandbox and limits.
One check, the device's, so a module that publishes is a module a device loads.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.errors import ToolError
from services.inference.wasm import WasmHost
from shared.config import PluginSettings
from shared.manifest import ModelName
from shared.plugin import (
    ABI_VERSION,
    MAX_CONFIG_ENTRIES,
    MAX_PLUGIN_BYTES,
    PluginError,
    PluginGrants,
    PluginLimits,
    PluginManifest,
)

# A spec is a few hundred bytes; the cap only bounds what a wrong path (a video, /dev/zero) costs.
MAX_SPEC_BYTES = 1 << 20


class PluginRefused(ToolError, ValueError):
    """A spec or module that must not be published: unreadable, invalid, or not this release's ABI."""


class PluginSpec(BaseModel):
    """plugin.json: exactly the PluginManifest fields an author chooses; publishing adds the rest
    (version, sha256, size_bytes, abi, recipe, created_at)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ModelName
    description: str = Field("", max_length=4096)
    limits: PluginLimits = Field(default_factory=PluginLimits)
    grants: PluginGrants = Field(default_factory=PluginGrants)
    config: Annotated[dict[str, str], Field(max_length=MAX_CONFIG_ENTRIES)] = Field(default_factory=dict)


@dataclass(frozen=True)
class CheckedModule:
    """A module that passed every check: its bytes and the ABI version it answered."""

    data: bytes
    abi: int


def load_spec(path: Path) -> PluginSpec:
    """A plugin's spec from its JSON file.

    :param Path path: plugin.json.
    :returns: the validated spec.
    :raises PluginRefused: the file is missing, over MAX_SPEC_BYTES, not JSON, has a key other than
        name/description/limits/grants/config (named), or a value out of range (named).
    """
    data = _read_bounded(path, MAX_SPEC_BYTES, "plugin spec")
    try:
        return PluginSpec.model_validate_json(data)
    except ValidationError as exc:
        raise PluginRefused(f"{path} is not a valid plugin spec: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(level) for level in error["loc"])
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key {where!r} ({_allowed(error['loc'][:-1])})")
        else:
            problems.append(f"{where or 'the document'}: {error['msg']}")
    return "; ".join(problems)


def _allowed(section: tuple[int | str, ...]) -> str:
    """What keys the section of the spec that held an unknown key has."""
    sections: dict[tuple[int | str, ...], type[BaseModel]] = {
        (): PluginSpec, ("limits",): PluginLimits, ("grants",): PluginGrants}
    model = sections.get(section)
    if model is None:
        return f"{'.'.join(map(str, section))} has no such key"
    return f"{'.'.join(map(str, section)) or 'a spec'} has exactly {', '.join(model.model_fields)}"


def check_module(path: Path, spec: PluginSpec) -> CheckedModule:
    """A module a device will load with this spec, checked by the device's loader (WasmHost.compile):
    valid WebAssembly, the ABI's exports with their types and only the imports the host provides, a
    start memory within the spec's `limits.memory_pages`, and a first instance that runs `_initialize`,
    answers ABI_VERSION from `edgefleet_abi_version()` and accepts the spec's config in `edgefleet_init`,
    within the spec's fuel and memory (a device with the default ceilings, PluginSettings.max_*).

    :param Path path: the .wasm file.
    :param spec: the plugin's spec (its limits, grants and config are the ones the device will use).
    :returns: its bytes and ABI version.
    :raises PluginRefused: unreadable, empty, over MAX_PLUGIN_BYTES, or refused by the device's loader
        (its reason, e.g. a missing or mistyped export, an unknown import, too much memory, another ABI
        version, a trap or an exhausted budget while starting, an init that refuses the config).
    """
    data = _read_bounded(path, MAX_PLUGIN_BYTES, "plugin module")
    # The folder grants are left out of the check: they name the device's folders, which this machine
    # (the operator's) need not have, and each device checks them against its own allowed_dirs at load.
    manifest = PluginManifest(
        name=spec.name, version=1, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
        abi=ABI_VERSION, description=spec.description, limits=spec.limits,
        grants=spec.grants.model_copy(update={"dirs": []}), config=spec.config, created_at=time.time())
    with tempfile.TemporaryDirectory(prefix="edgefleet-plugin-check-") as scratch:
        settings = PluginSettings(dir=Path(scratch) / "plugins", cache_dir=Path(scratch) / "cache")
        try:
            WasmHost(settings).compile(data, manifest, cached=False)
        except PluginError as exc:
            # One line: wasmtime's reasons span several ("Caused by: ...").
            raise PluginRefused(f"{path} would be refused by a device: {' '.join(str(exc).split())}") from None
    return CheckedModule(data, ABI_VERSION)


def _read_bounded(path: Path, cap: int, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(cap + 1)
    except OSError as exc:
        raise PluginRefused(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if len(data) > cap:
        raise PluginRefused(f"the {what} {path} is over {cap} bytes")
    if not data:
        raise PluginRefused(f"the {what} {path} is empty")
    return data
