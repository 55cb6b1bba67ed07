"""What a plugin's author hands in before it is published: the spec (plugin.json: the PluginManifest
fields an author chooses) and the module, checked as the device will check them (docs/plugins.md):
a valid wasm32 module with the ABI's exports, whose `edgefleet_abi_version()` is this release's.

A module is run here only to ask its ABI version, in a sandbox as tight as the device's: WASI with
nothing behind it, every other import a trap, bounded fuel and memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import wasmtime
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.errors import ToolError
from shared.manifest import ModelName
from shared.plugin import ABI_VERSION, MAX_CONFIG_ENTRIES, MAX_PLUGIN_BYTES, PluginGrants, PluginLimits

# A spec is a few hundred bytes; the cap only bounds what a wrong path (a video, /dev/zero) costs.
MAX_SPEC_BYTES = 1 << 20
# Enough for any `return 1`, and for a start function or `_initialize` of a real plugin; a loop runs out.
ABI_CHECK_FUEL = 10_000_000

# The ABI's exports (docs/plugins.md): name -> (params, results); None: a memory. edgefleet_init is optional.
REQUIRED_EXPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]] | None] = {
    "memory": None,
    "edgefleet_abi_version": ((), ("i32",)),
    "edgefleet_alloc": (("i32",), ("i32",)),
    "edgefleet_on_prediction": (("i32", "i32"), ("i64",)),
}
OPTIONAL_EXPORTS = {"edgefleet_init": (("i32", "i32"), ("i32",))}


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


def check_module(path: Path, limits: PluginLimits) -> CheckedModule:
    """A module the device will accept: valid WebAssembly, the ABI's exports with their types, a start
    memory within `limits.memory_pages`, and `edgefleet_abi_version()` returning ABI_VERSION.

    :param Path path: the .wasm file.
    :param limits: the spec's limits (the memory it may declare at start).
    :returns: its bytes and ABI version.
    :raises PluginRefused: naming what is wrong (unreadable, over MAX_PLUGIN_BYTES, invalid, a missing or
        mistyped export, too much memory, a trap or an exhausted budget while answering its ABI version,
        or another ABI version).
    """
    data = _read_bounded(path, MAX_PLUGIN_BYTES, "plugin module")
    config = wasmtime.Config()
    config.consume_fuel = True
    engine = wasmtime.Engine(config)
    try:
        wasmtime.Module.validate(engine, data)
        module = wasmtime.Module(engine, data)
    except wasmtime.WasmtimeError as exc:
        raise PluginRefused(f"{path} is not a valid WebAssembly module: {_first_line(exc)}") from None
    _check_exports(path, module, limits)
    abi = _abi_version(path, engine, module, limits)
    if abi != ABI_VERSION:
        raise PluginRefused(f"{path} speaks plugin ABI {abi}; this release speaks {ABI_VERSION} (docs/plugins.md)")
    return CheckedModule(data, abi)


def _check_exports(path: Path, module: wasmtime.Module, limits: PluginLimits) -> None:
    exports = {export.name: export.type for export in module.exports}
    for name, signature in {**REQUIRED_EXPORTS, **OPTIONAL_EXPORTS}.items():
        found = exports.get(name)
        if found is None:
            if name in REQUIRED_EXPORTS:
                raise PluginRefused(f"{path} lacks the export {name!r} that plugin ABI {ABI_VERSION} requires "
                                    f"(docs/plugins.md: {', '.join(REQUIRED_EXPORTS)})")
            continue
        if signature is None:
            if not isinstance(found, wasmtime.MemoryType):
                raise PluginRefused(f"{path}'s export {name!r} is not a memory")
            if found.limits.min > limits.memory_pages:
                raise PluginRefused(f"{path}'s memory starts at {found.limits.min} pages, over its spec's "
                                    f"limits.memory_pages ({limits.memory_pages})")
            continue
        actual = _signature(found)
        if actual != signature:
            raise PluginRefused(f"{path}'s export {name!r} is {_render(actual)}; plugin ABI {ABI_VERSION} "
                                f"requires {_render(signature)}")


def _signature(export_type: object) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    if not isinstance(export_type, wasmtime.FuncType):
        return None
    return tuple(str(p) for p in export_type.params), tuple(str(r) for r in export_type.results)


def _render(signature: tuple[tuple[str, ...], tuple[str, ...]] | None) -> str:
    if signature is None:
        return "not a function"
    params, results = signature
    return f"a function ({', '.join(params)}) -> ({', '.join(results)})"


def _abi_version(path: Path, engine: wasmtime.Engine, module: wasmtime.Module, limits: PluginLimits) -> int:
    """Instantiates the module in a tight sandbox and calls edgefleet_abi_version()."""
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.define_unknown_imports_as_traps(module)
    store = wasmtime.Store(engine)
    store.set_wasi(wasmtime.WasiConfig())  # no arguments, environment, folders; stdio discarded
    store.set_fuel(ABI_CHECK_FUEL)
    store.set_limits(memory_size=limits.memory_pages * 64 * 1024)
    try:
        instance = linker.instantiate(store, module)
        answer = instance.exports(store)["edgefleet_abi_version"]
        abi = answer(store) if isinstance(answer, wasmtime.Func) else None
    except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
        raise PluginRefused(f"{path} failed while answering its ABI version: {_first_line(exc)}") from None
    if not isinstance(abi, int):
        raise PluginRefused(f"{path}'s edgefleet_abi_version returned {abi!r}, not an i32")
    return abi


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


def _first_line(exc: Exception) -> str:
    """wasmtime's message without its backtrace: the cause when it names one, else the first line."""
    text = str(exc).strip()
    _, caused, cause = text.partition("Caused by:")
    lines = [line.strip() for line in (cause if caused else text).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
