"""Plugins in the signed registry on a real S3-compatible server (moto_server, its own process):
`publish_plugin` and `edgefleet plugin publish|list`. Modules are real wasm (tests/wat_plugins.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from edgefleet import cli
from edgefleet.plugin_spec import PluginRefused
from edgefleet.publish import (
    NotPublished,
    PublishRefused,
    list_plugins,
    plugin_versions,
    publish_plugin,
    signed_plugin,
    versions,
)
from shared import VERSION, registry, s3
from shared.plugin import ABI_VERSION, PluginGrants, PluginLimits
from tests import wat_plugins as wat

BUCKET = "edgefleet-models"
NAME = wat.SPEC["name"]


@pytest.fixture
def store(s3_server):
    return s3.client(s3_server.settings())


@pytest.fixture
def keys(tmp_path):
    return registry.new_key_pair(tmp_path / "keys")


def _get(store, version, obj, name=NAME):
    return store.get_object(Bucket=BUCKET, Key=registry.plugin_key(name, version, obj))["Body"].read()


def _objects(store, prefix="plugins/"):
    """Every object under prefix: key -> (ETag, bytes)."""
    listing = store.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: (o["ETag"], store.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()) for o in listing}


def test_a_published_plugin_is_its_module_manifest_and_a_signature_that_verifies(store, keys, tmp_path):
    module, spec = wat.write(tmp_path)
    done = publish_plugin(store, BUCKET, module, spec, keys.private)
    assert (done.name, done.version, done.key_id, done.prefix) == (NAME, 1, keys.key_id, f"plugins/{NAME}/1/")
    assert sorted(_objects(store)) == [f"plugins/{NAME}/1/{obj}" for obj in ("manifest.json", "manifest.sig",
                                                                             "plugin.wasm")]
    document, signature = _get(store, 1, registry.MANIFEST_OBJECT), _get(store, 1, registry.SIGNATURE_OBJECT)
    manifest = registry.verify_plugin(document, signature, registry.load_public_keys(keys.public.parent))
    stored = _get(store, 1, registry.PLUGIN_OBJECT)
    assert stored == wat.GOOD and manifest.sha256 == hashlib.sha256(stored).hexdigest() == done.sha256
    assert (manifest.name, manifest.version, manifest.size_bytes, manifest.abi) == (NAME, 1, len(stored), ABI_VERSION)
    assert manifest.limits == PluginLimits(**wat.SPEC["limits"])
    assert manifest.grants == PluginGrants(**wat.SPEC["grants"])
    assert (manifest.config, manifest.description) == (wat.SPEC["config"], wat.SPEC["description"])
    assert (manifest.recipe, manifest.min_edgefleet) == ({"source": spec.name}, VERSION)
    # Plugins and models are kept apart: no model of that name appeared.
    assert versions(store, BUCKET, NAME) == []


def test_versions_go_up_and_an_existing_version_is_refused_and_left_untouched(store, keys, tmp_path):
    module, spec = wat.write(tmp_path)
    assert publish_plugin(store, BUCKET, module, spec, keys.private).version == 1
    assert publish_plugin(store, BUCKET, module, spec, keys.private).version == 2
    before = _objects(store)
    other, _ = wat.write(tmp_path / "other", wat.GOOD_OTHER)
    for version in (2, 1):
        with pytest.raises(PublishRefused, match=f"{NAME} v{version} is already published"):
            publish_plugin(store, BUCKET, other, spec, keys.private, version=version)
    assert _objects(store) == before
    assert publish_plugin(store, BUCKET, other, spec, keys.private, version=5).version == 5
    assert plugin_versions(store, BUCKET, NAME) == [1, 2, 5]


def test_a_racing_publishers_module_is_never_overwritten_and_no_signature_follows(store, keys, tmp_path):
    s3.ensure_bucket(store, BUCKET)
    racer = registry.plugin_key(NAME, 1, registry.PLUGIN_OBJECT)
    store.put_object(Bucket=BUCKET, Key=racer, Body=b"the other publisher's module")
    module, spec = wat.write(tmp_path)
    with pytest.raises(PublishRefused, match=f"{racer} already exists"):
        publish_plugin(store, BUCKET, module, spec, keys.private, version=1)
    assert list(_objects(store)) == [racer] and _objects(store)[racer][1] == b"the other publisher's module"
    assert plugin_versions(store, BUCKET, NAME) == []
    assert publish_plugin(store, BUCKET, module, spec, keys.private).version == 2  # past the spent number



def test_a_plugin_version_whose_module_was_replaced_or_removed_cannot_be_rolled_out(store, keys, tmp_path):
    module, spec = wat.write(tmp_path)
    publish_plugin(store, BUCKET, module, spec, keys.private)
    trusted = registry.load_public_keys(keys.public.parent)
    assert signed_plugin(store, BUCKET, NAME, 1, trusted).sha256 == hashlib.sha256(wat.GOOD).hexdigest()
    key = registry.plugin_key(NAME, 1, registry.PLUGIN_OBJECT)
    # Another module of the same length (the store keeps each upload's SHA-256), then one of another length.
    store.put_object(Bucket=BUCKET, Key=key, Body=bytes(len(wat.GOOD)), ChecksumAlgorithm="SHA256")
    with pytest.raises(NotPublished, match=f"the plugin {NAME} v1's plugin.wasm in the registry has SHA-256"):
        signed_plugin(store, BUCKET, NAME, 1, trusted)
    store.put_object(Bucket=BUCKET, Key=key, Body=wat.GOOD + b"\0")
    with pytest.raises(NotPublished, match=f"is {len(wat.GOOD) + 1} bytes, its signed manifest says {len(wat.GOOD)}"):
        signed_plugin(store, BUCKET, NAME, 1, trusted)
    store.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(NotPublished, match=f"plugin.wasm is missing from the registry \\(s3://{BUCKET}/{key}\\)"):
        signed_plugin(store, BUCKET, NAME, 1, trusted)

@pytest.mark.parametrize(("wasm", "spec", "why"), [
    (wat.NOT_WASM, {}, "not a valid WebAssembly module"),
    (wat.WITHOUT_ON_PREDICTION, {}, "does not export the function edgefleet_on_prediction"),
    (wat.WRONG_ABI, {}, f"speaks plugin ABI 2; this host speaks ABI {ABI_VERSION}"),
    (wat.UNKNOWN_IMPORT, {}, "imports what this host does not provide: .*edgefleet.*foo"),
    (wat.GOOD, {"version": 7}, "unknown key 'version'"),
], ids=["invalid", "no-exports", "wrong-abi", "unknown-import", "unknown-key"])
def test_a_refused_plugin_writes_nothing(store, keys, tmp_path, wasm, spec, why):
    module, spec_path = wat.write(tmp_path, wasm, **spec)
    with pytest.raises(PluginRefused, match=why):
        publish_plugin(store, BUCKET, module, spec_path, keys.private)
    s3.ensure_bucket(store, BUCKET)
    assert _objects(store, "") == {}


def test_the_publish_and_list_commands(s3_server, store, keys, tmp_path):
    module, spec = wat.write(tmp_path)
    env = {**os.environ, **s3_server.env()}
    published = subprocess.run(
        [sys.executable, "-m", "edgefleet", "plugin", "publish", str(module), "--spec", str(spec),
         "--key", str(keys.private)], capture_output=True, text=True, timeout=120, env=env)
    assert published.returncode == 0, published.stderr
    assert published.stdout.strip() == "1"
    assert f"published the plugin {NAME} v1" in published.stderr and f"signed by key {keys.key_id}" in published.stderr

    runner = CliRunner()
    second, _ = wat.write(tmp_path / "second", wat.GOOD_OTHER)
    result = runner.invoke(cli.app, ["plugin", "publish", str(second), "--spec", str(spec), "--key", str(keys.private)],
                           env=s3_server.env())
    assert result.exit_code == 0 and result.stdout.strip() == "2", result.output
    _, other_spec = wat.write(tmp_path / "third", name="gate-labels")
    assert runner.invoke(cli.app, ["plugin", "publish", str(module), "--spec", str(other_spec), "--key",
                                   str(keys.private)], env=s3_server.env()).exit_code == 0

    listed = runner.invoke(cli.app, ["plugin", "list", NAME, "--json"], env=s3_server.env())
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["name"], r["version"], r["sha256"], r["size_bytes"], r["abi"], r["key_id"]) for r in rows] == [
        (NAME, 1, hashlib.sha256(wat.GOOD).hexdigest(), len(wat.GOOD), ABI_VERSION, keys.key_id),
        (NAME, 2, hashlib.sha256(wat.GOOD_OTHER).hexdigest(), len(wat.GOOD_OTHER), ABI_VERSION, keys.key_id),
    ]
    every = runner.invoke(cli.app, ["plugin", "list", "--json"], env=s3_server.env())
    assert [(r["name"], r["version"]) for r in map(json.loads, every.stdout.splitlines())] == [
        ("door-rule", 1), ("door-rule", 2), ("gate-labels", 1)]
    table = runner.invoke(cli.app, ["plugin", "list"], env={**s3_server.env(), "COLUMNS": "200"})
    assert table.exit_code == 0 and "gate-labels" in table.stdout and keys.key_id in table.stdout


def test_the_publish_command_refuses_a_bad_plugin_naming_what_is_wrong(s3_server, keys, tmp_path):
    module, spec = wat.write(tmp_path, wat.WRONG_ABI)
    result = CliRunner().invoke(cli.app, ["plugin", "publish", str(module), "--spec", str(spec), "--key",
                                          str(keys.private)], env=s3_server.env())
    assert result.exit_code == 1
    assert result.stderr.startswith("edgefleet plugin publish: refused: ") and "speaks plugin ABI 2" in result.stderr
    module, spec = wat.write(tmp_path, grants={"network": True})
    result = CliRunner().invoke(cli.app, ["plugin", "publish", str(module), "--spec", str(spec), "--key",
                                          str(keys.private)], env=s3_server.env())
    assert result.exit_code == 1 and "unknown key 'grants.network'" in result.stderr


def test_a_listing_shows_an_unreadable_version_rather_than_failing(store, keys, tmp_path):
    module, spec = wat.write(tmp_path)
    publish_plugin(store, BUCKET, module, spec, keys.private)
    # A version whose manifest is not a manifest (written around the publisher, as a broken tool might).
    for obj, body in ((registry.MANIFEST_OBJECT, b"{}"), (registry.SIGNATURE_OBJECT, b"{}")):
        store.put_object(Bucket=BUCKET, Key=registry.plugin_key(NAME, 2, obj), Body=body)
    first, broken = list_plugins(store, BUCKET, NAME)
    assert (first.version, first.problem, broken.version, broken.sha256) == (1, None, 2, None)
    assert broken.problem.startswith("unreadable")


def test_the_example_plugins_built_from_c_and_rust_publish_and_the_wrong_abi_one_is_refused(store, keys):
    from tests.plugin_builds import built  # skipped without the builds, failed under CI=true

    for name in ("night-alert", "site-labels", "crop-check"):
        plugin = built(name)
        done = publish_plugin(store, BUCKET, plugin.wasm, plugin.spec, keys.private)
        assert (done.name, done.version) == (name, 1)
        assert _get(store, 1, registry.PLUGIN_OBJECT, name) == plugin.wasm.read_bytes()
    hostile = built("hostile-abi")
    with pytest.raises(PluginRefused, match=f"speaks plugin ABI 2; this host speaks ABI {ABI_VERSION}"):
        publish_plugin(store, BUCKET, hostile.wasm, hostile.spec, keys.private)
    assert plugin_versions(store, BUCKET, "hostile-abi") == []
