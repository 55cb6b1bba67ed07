"""The plugins scripts/plugins.sh builds from this repository's C and Rust sources are modules the host
can take: valid WebAssembly, the ABI's exports with its signatures, imports from the ABI's module and
WASI only, a start memory within the plugin's own page limit, and a spec that is a manifest's author
fields. Loads the built .wasm files from disk; runs none of them (the host's tests do)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import wasmtime

from edgefleet.plugin_builds import PluginBuildMissing, built, names
from shared.plugin import ABI_VERSION, PluginLimits, PluginManifest
from tests import plugin_builds as builds  # a missing build: skipped here, failed under CI=true

ROOT = Path(__file__).resolve().parents[2]
# Every plugin the repository's sources define, by name, and the spec beside its source.
SOURCES = {
    "night-alert": "plugins/night_alert/plugin.json",
    "site-labels": "plugins/site_labels/plugin.json",
    "crop-check": "plugins/crop_check/plugin.json",
    "hostile-loop": "tests/plugins/infinite_loop.json",
    "hostile-memory": "tests/plugins/memory_bomb.json",
    "hostile-file": "tests/plugins/file_escape.json",
    "hostile-huge-result": "tests/plugins/huge_result.json",
    "hostile-topic": "tests/plugins/topic_escape.json",
    "hostile-trap": "tests/plugins/trap.json",
    "hostile-abi": "tests/plugins/bad_abi.json",
    "hostile-malformed": "tests/plugins/malformed_result.json",
}
AUTHOR_KEYS = {"name", "description", "limits", "grants", "config"}

# docs/plugins.md, ABI 1: (params, results) of each export and of each import of module "edgefleet".
REQUIRED_EXPORTS = {
    "edgefleet_abi_version": ([], ["i32"]),
    "edgefleet_alloc": (["i32"], ["i32"]),
    "edgefleet_on_prediction": (["i32", "i32"], ["i64"]),
}
OPTIONAL_EXPORTS = {"edgefleet_init": (["i32", "i32"], ["i32"])}
HOST_IMPORTS = {
    "log": (["i32", "i32", "i32"], []),
    "now_ms": ([], ["i64"]),
    "emit": (["i32"] * 4, ["i32"]),
    "frame": (["i32"] * 2, ["i32"]),
    "infer": (["i32"] * 8, ["i32"]),
    "infer_tensor": (["i32"] * 4, ["i32"]),
}
IMPORT_MODULES = {"edgefleet", "wasi_snapshot_preview1"}


@pytest.fixture(scope="module")
def engine() -> wasmtime.Engine:
    return wasmtime.Engine()


def _module(engine: wasmtime.Engine, name: str) -> wasmtime.Module:
    return wasmtime.Module(engine, (ROOT / builds.built(name).wasm).read_bytes())


def _signature(func_type: wasmtime.FuncType) -> tuple[list[str], list[str]]:
    return [str(p) for p in func_type.params], [str(r) for r in func_type.results]


def test_every_plugin_in_the_sources_is_built():
    missing = set(SOURCES) - set(names(builds.BUILDS))
    if missing:
        builds.missing(f"not built: {sorted(missing)}; run scripts/plugins.sh")


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_the_built_spec_is_its_sources_and_a_manifests_author_fields(name):
    plugin = builds.built(name)
    spec = json.loads((ROOT / plugin.spec).read_text())
    assert spec == json.loads((ROOT / SOURCES[name]).read_text()), "stale build: run scripts/plugins.sh"
    assert set(spec) == AUTHOR_KEYS and spec["name"] == name
    wasm = (ROOT / plugin.wasm).read_bytes()
    manifest = PluginManifest(**spec, version=1, sha256=hashlib.sha256(wasm).hexdigest(), size_bytes=len(wasm),
                              abi=ABI_VERSION, created_at=1765000000.0)
    assert manifest.name == name


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_the_module_is_valid_and_exports_the_abi(engine, name):
    wasm = (ROOT / builds.built(name).wasm).read_bytes()
    wasmtime.Module.validate(engine, wasm)  # raises on an invalid module
    exports = {e.name: e.type for e in _module(engine, name).exports}
    assert isinstance(exports.get("memory"), wasmtime.MemoryType)
    for export, signature in (REQUIRED_EXPORTS | OPTIONAL_EXPORTS).items():
        if export in REQUIRED_EXPORTS or export in exports:
            assert isinstance(exports.get(export), wasmtime.FuncType), f"{name} does not export {export}"
            assert _signature(exports[export]) == signature, f"{name}'s {export} has the wrong signature"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_the_module_imports_only_the_host_and_wasi(engine, name):
    for imported in _module(engine, name).imports:
        assert imported.module in IMPORT_MODULES, f"{name} imports {imported.module}.{imported.name}"
        if imported.module == "edgefleet":
            assert isinstance(imported.type, wasmtime.FuncType)
            assert _signature(imported.type) == HOST_IMPORTS[imported.name], f"{name}'s {imported.name}"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_the_module_starts_within_its_memory_limit(engine, name):
    # The host refuses a module whose initial memory is over limits.memory_pages (docs/plugins.md).
    memory = next(e.type for e in _module(engine, name).exports if e.name == "memory")
    assert isinstance(memory, wasmtime.MemoryType)
    limits = PluginLimits(**json.loads((ROOT / SOURCES[name]).read_text())["limits"])
    assert memory.limits.min <= limits.memory_pages


def test_the_example_plugins_need_only_their_grants(engine):
    # A plugin whose spec grants no frame or model must not import them (it would only ever get -1).
    for name in ("night-alert", "site-labels", "crop-check"):
        grants = json.loads((ROOT / SOURCES[name]).read_text())["grants"]
        imported = {i.name for i in _module(engine, name).imports if i.module == "edgefleet"}
        assert ("frame" in imported) <= grants.get("frame", False), name
        assert bool(imported & {"infer", "infer_tensor"}) <= grants.get("infer", False), name
    assert {"frame", "infer"} <= {i.name for i in _module(engine, "crop-check").imports}


def test_a_missing_build_names_the_script(tmp_path):
    (tmp_path / "night-alert.wasm").write_bytes(b"\0asm")
    with pytest.raises(PluginBuildMissing, match=r"scripts/plugins\.sh"):
        built("night-alert", tmp_path)  # no spec beside it: not a build
    assert names(tmp_path) == [] and names(tmp_path / "absent") == []
    (tmp_path / "night-alert.json").write_text("{}")
    assert built("night-alert", tmp_path).wasm == tmp_path / "night-alert.wasm"
    assert names(tmp_path) == ["night-alert"]
