"""What `edgefleet plugin publish` checks before it writes anything (edgefleet.plugin_spec): the spec has
exactly the author's keys, and the module is what the device's own loader (services.inference.wasm)
accepts with that spec: the ABI's exports and imports, this release's ABI version, its constructors and
init with the spec's config, within the spec's limits. Real modules compiled by wasmtime from WAT."""

from __future__ import annotations

import json

import pytest

from edgefleet.plugin_spec import MAX_SPEC_BYTES, PluginRefused, check_module, load_spec
from shared.plugin import ABI_VERSION
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


@pytest.mark.parametrize("wasm", [wat.GOOD, wat.IMPORT_CALLING_ABI], ids=["plain", "logs-while-starting"])
def test_a_module_with_the_abis_exports_and_version_passes(tmp_path, wasm):
    path, spec = wat.write(tmp_path, wasm)
    checked = check_module(path, load_spec(spec))
    assert (checked.abi, checked.data) == (ABI_VERSION, wasm)


@pytest.mark.parametrize(("wasm", "why"), [
    (wat.NOT_WASM, "not a valid WebAssembly module"),
    (wat.WITHOUT_ON_PREDICTION, "does not export the function edgefleet_on_prediction"),
    (wat.WITHOUT_MEMORY, "exports no memory named 'memory'"),
    (wat.module(abi=""), "does not export the function edgefleet_abi_version"),
    (wat.MISTYPED_ON_PREDICTION, r"edgefleet_on_prediction has type \[i32, i32\] -> \[i32\], ABI 1 wants "
                                 r"\[i32, i32\] -> \[i64\]"),
    (wat.WRONG_ABI, f"speaks plugin ABI 2; this host speaks ABI {ABI_VERSION}"),
    (wat.LOOPING_ABI, r"failed while starting \(fuel\)"),
    (wat.HUGE_MEMORY, r"memory starts at 300 pages, over its limit of 32 pages"),
    (wat.UNKNOWN_IMPORT, "imports what this host does not provide: .*edgefleet.*foo"),
    (wat.INIT_REFUSING, "refused its config: edgefleet_init returned 7"),
    (wat.INITIALIZE_TRAPPING, r"failed while starting \(trap\)"),
], ids=["not-wasm", "no-on-prediction", "no-memory", "no-abi-version", "mistyped", "wrong-abi", "loop", "memory",
        "unknown-import", "init-refuses", "initialize-traps"])
def test_a_module_the_device_would_refuse_is_refused_saying_why(tmp_path, wasm, why):
    path, spec = wat.write(tmp_path, wasm)
    with pytest.raises(PluginRefused, match=f"would be refused by a device: .*{why}"):
        check_module(path, load_spec(spec))


def test_a_folder_grant_is_left_to_the_device_and_the_rest_of_the_spec_is_checked(tmp_path):
    """This machine need not have the device's folders; the grants it can check (env), it does."""
    path, spec = wat.write(tmp_path, grants={"dirs": [{"guest": "/site", "host": "/nowhere/on/this/machine"}],
                                             "env": {"SITE": "dock-4"}, "frame": False, "infer": False})
    assert check_module(path, load_spec(spec)).abi == ABI_VERSION
    # The spec's own limits bound the check: the device's loader refuses 300 pages at 32, accepts them at 300.
    path, spec = wat.write(tmp_path, wat.HUGE_MEMORY, limits={**wat.SPEC["limits"], "memory_pages": 300})
    assert check_module(path, load_spec(spec)).data == wat.HUGE_MEMORY


def test_an_empty_or_missing_module_is_refused(tmp_path):
    path, spec = wat.write(tmp_path, b"")
    with pytest.raises(PluginRefused, match="is empty"):
        check_module(path, load_spec(spec))
    with pytest.raises(PluginRefused, match="cannot read the plugin module"):
        check_module(tmp_path / "missing.wasm", load_spec(spec))
