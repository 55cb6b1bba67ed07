"""The plugins built from this repository's sources by scripts/plugins.sh: the examples in plugins/
and the hostile test plugins in tests/plugins/, each a wasm32-wasi module and its spec (the manifest
fields an author chooses: name, description, limits, grants, config), ready to publish or load."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from edgefleet.errors import ToolError
from edgefleet.plugin_spec import load_spec
from shared.manifest import MANIFEST_FILE
from shared.plugin import (
    ABI_VERSION,
    PLUGIN_FILE,
    ActivePlugin,
    ActivePlugins,
    PluginManifest,
    read_active,
    write_active,
)
from shared.registry import manifest_bytes

BUILD_DIR = Path("var/plugin-builds")
BUILD_SCRIPT = "scripts/plugins.sh"


class PluginBuildMissing(ToolError, FileNotFoundError):
    """A plugin that has not been built here (or not under that name)."""


@dataclass(frozen=True)
class BuiltPlugin:
    wasm: Path  # <name>.wasm: the module
    spec: Path  # <name>.json: its spec, a copy of the one beside its source


def built(name: str, build_dir: Path = BUILD_DIR) -> BuiltPlugin:
    """A built plugin's module and spec.

    :param name: the plugin's name, as its spec says (e.g. "night-alert", "hostile-loop").
    :param build_dir: where scripts/plugins.sh put it.
    :returns: the two files' paths, both existing.
    :raises PluginBuildMissing: either file is missing (the message says to run scripts/plugins.sh
        and lists what is built).
    """
    plugin = BuiltPlugin(wasm=build_dir / f"{name}.wasm", spec=build_dir / f"{name}.json")
    if not (plugin.wasm.is_file() and plugin.spec.is_file()):
        have = ", ".join(names(build_dir)) or "none"
        raise PluginBuildMissing(f"plugin {name!r} is not built in {build_dir} (built: {have}); "
                                 f"run {BUILD_SCRIPT}")
    return plugin


def names(build_dir: Path = BUILD_DIR) -> list[str]:
    """The names of the plugins built in `build_dir` (module and spec both there), sorted; [] when none."""
    if not build_dir.is_dir():
        return []
    return sorted(p.stem for p in build_dir.glob("*.wasm") if p.with_suffix(".json").is_file())


def module_and_manifest(name: str, *, version: int = 1, config: dict[str, str] | None = None,
                        build_dir: Path = BUILD_DIR) -> tuple[bytes, PluginManifest]:
    """A built plugin's module and the manifest publishing would give it (unsigned), for local use: benches,
    tests, a device's store filled by hand.

    :param config: entries that replace the spec's config entries of the same name.
    :raises PluginBuildMissing: not built; PluginRefused: its spec is invalid.
    """
    plugin = built(name, build_dir)
    spec = load_spec(plugin.spec)
    wasm = plugin.wasm.read_bytes()
    manifest = PluginManifest(name=spec.name, version=version, sha256=hashlib.sha256(wasm).hexdigest(),
                              size_bytes=len(wasm), abi=ABI_VERSION, description=spec.description,
                              limits=spec.limits, grants=spec.grants, config={**spec.config, **(config or {})},
                              recipe={"source": plugin.spec.name}, created_at=time.time())
    return wasm, manifest


def install(store: Path, name: str, *, version: int = 1, config: dict[str, str] | None = None,
            build_dir: Path = BUILD_DIR) -> ActivePlugin:
    """Installs a built plugin into a plugin store by hand and appends it to the store's active set, as sync
    would after a rollout (without the registry and its signature: for benches, tests and trying a plugin).

    :returns: the active set's new entry.
    """
    wasm, manifest = module_and_manifest(name, version=version, config=config, build_dir=build_dir)
    folder = Path(manifest.name) / f"{manifest.version}-{manifest.sha256[:16]}"
    (store / folder).mkdir(parents=True, exist_ok=True)
    (store / folder / PLUGIN_FILE).write_bytes(wasm)
    (store / folder / MANIFEST_FILE).write_bytes(manifest_bytes(manifest))
    entry = ActivePlugin(name=manifest.name, version=manifest.version, sha256=manifest.sha256, folder=str(folder))
    active = read_active(store)
    others = [p for p in active.plugins if p.name != manifest.name]
    write_active(store, ActivePlugins(plugins=[*others, entry]))
    return entry
