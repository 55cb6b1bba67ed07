"""What `edgefleet plugin publish` checks before it writes anything (edgefleet.plugin_spec): the spec has
exactly the author's keys, and the module is valid WebAssembly with the ABI's exports, answering this
release's ABI version in a sandbox that bounds it. Real modules compiled by wasmtime from WAT."""

from __future__ import annotations

import json

import pytest

from edgefleet.plugin_spec import MAX_SPEC_BYTES, PluginRefused, check_module, load_spec
from shared.plugin import ABI_VERSION, PluginLimits
from tests import wat_plugins as wat


def test_a_spec_with_exactly_the_authors_keys_loads(tmp_path):
    _, spec_path = wat.write(tmp_path)
    spec = load_spec(spec_path)
    assert (spec.name, spec.limits.memory_pages, spec.grants.env, spec.config["from_hour"]) == (
        "door-rule", 32, {"SITE": "dock-4"}, "22")


@pytest.mark.parametrize(("extra", "named"), [
    ({"version": 3}, "'version'"),
    ({"sha256": "0" * 64}, "'sha256'"),
    ({"limits": {**wat.SPEC["limits"], "memory": 9}}, "'limits.memory'"),
    ({"grants": {"network": True}}, "'grants.network'"),
], ids=["version", "sha256", "limits.memory", "grants.network"])
def test_a_spec_with_an_unknown_key_is_refused_naming_it(tmp_path, extra, named):
    _, spec_path = wat.write(tmp_path, **extra)
    with pytest.raises(PluginRefused, match=f"unknown key {named}"):
        load_spec(spec_path)


def test_a_spec_out_of_range_missing_or_not_json_is_refused_saying_what(tmp_path):
    _, spec_path = wat.write(tmp_path, limits={"memory_pages": 0})
    with pytest.raises(PluginRefused, match=r"limits\.memory_pages: Input should be greater than or equal to 1"):
        load_spec(spec_path)
    _, spec_path = wat.write(tmp_path, name="../etc")
    with pytest.raises(PluginRefused, match="name: .*model name"):
        load_spec(spec_path)
    spec_path.write_text("{not json")
    with pytest.raises(PluginRefused, match="not a valid plugin spec"):
        load_spec(spec_path)
    with pytest.raises(PluginRefused, match="cannot read the plugin spec"):
        load_spec(tmp_path / "missing.json")
    spec_path.write_text(json.dumps({**wat.SPEC, "description": "x" * MAX_SPEC_BYTES}))
    with pytest.raises(PluginRefused, match=f"over {MAX_SPEC_BYTES} bytes"):
        load_spec(spec_path)


def test_a_module_with_the_abis_exports_and_version_passes(tmp_path):
    path, _ = wat.write(tmp_path)
    checked = check_module(path, PluginLimits())
    assert (checked.abi, checked.data) == (ABI_VERSION, wat.GOOD)


@pytest.mark.parametrize(("wasm", "why"), [
    (wat.NOT_WASM, "is not a valid WebAssembly module"),
    (wat.WITHOUT_ON_PREDICTION, "lacks the export 'edgefleet_on_prediction'"),
    (wat.WITHOUT_MEMORY, "lacks the export 'memory'"),
    (wat.module(abi=""), "lacks the export 'edgefleet_abi_version'"),
    (wat.MISTYPED_ON_PREDICTION, r"'edgefleet_on_prediction' is a function \(i32, i32\) -> \(i32\); plugin ABI 1 "
                                 r"requires a function \(i32, i32\) -> \(i64\)"),
    (wat.WRONG_ABI, f"speaks plugin ABI 2; this release speaks {ABI_VERSION}"),
    (wat.LOOPING_ABI, "failed while answering its ABI version: .*fuel"),
    (wat.IMPORT_CALLING_ABI, "failed while answering its ABI version"),
    (wat.HUGE_MEMORY, r"memory starts at 300 pages, over its spec's limits.memory_pages \(32\)"),
], ids=["not-wasm", "no-on-prediction", "no-memory", "no-abi-version", "mistyped", "wrong-abi", "loop", "import",
        "memory"])
def test_a_module_the_device_would_refuse_is_refused_saying_why(tmp_path, wasm, why):
    path, _ = wat.write(tmp_path, wasm)
    with pytest.raises(PluginRefused, match=why):
        check_module(path, PluginLimits(memory_pages=32))


def test_an_empty_or_missing_module_is_refused(tmp_path):
    path, _ = wat.write(tmp_path, b"")
    with pytest.raises(PluginRefused, match="is empty"):
        check_module(path, PluginLimits())
    with pytest.raises(PluginRefused, match="cannot read the plugin module"):
        check_module(tmp_path / "missing.wasm", PluginLimits())
