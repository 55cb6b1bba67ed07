"""The one rule for plugin tests whose build is missing (tests/plugin_builds.py): skipped here with the
reason, failed under CI=true, where a plugin test that did not run must not pass."""

from __future__ import annotations

import pytest

from tests import plugin_builds
from tests.plugin_builds import built, needs, source_names

ABSENT = "no-such-plugin"


def test_a_missing_build_skips_the_test_saying_how_to_build_it(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=rf"{ABSENT}.*scripts/plugins\.sh"):
        built(ABSENT)


def test_under_ci_a_missing_build_fails_the_test(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=rf"CI=true and plugin '{ABSENT}' is not built"):
        built(ABSENT)


def test_the_decorator_runs_the_test_only_with_its_builds(monkeypatch, tmp_path):
    ran = []

    @needs(ABSENT)
    def without(value):
        ran.append(value)

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        without(1)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        without(2)
    assert ran == []
    # With its build there, the test runs (a build is a module and its spec).
    monkeypatch.setattr(plugin_builds, "BUILDS", tmp_path)
    for suffix in (".wasm", ".json"):
        (tmp_path / f"{ABSENT}{suffix}").write_bytes(b"{}")
    without(3)
    assert ran == [3]


def test_by_default_the_decorator_needs_every_plugin_the_sources_define():
    names = source_names()
    assert {"night-alert", "site-labels", "crop-check", "hostile-loop", "hostile-abi"} <= set(names)
    assert len(names) == 11
