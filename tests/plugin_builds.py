"""The plugins scripts/plugins.sh builds from this repository's sources (var/plugin-builds), for the tests
that load them. One rule for all of them: a missing build skips the test with the reason and the script
to run; under CI=true it fails the test instead, since CI builds them (scripts/setup.sh calls
scripts/plugins.sh) and a plugin test that did not run must not pass there."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

from edgefleet import plugin_builds
from edgefleet.plugin_builds import BUILD_DIR, BuiltPlugin, PluginBuildMissing

ROOT = Path(__file__).resolve().parent.parent
BUILDS = ROOT / BUILD_DIR
# The specs beside the sources scripts/plugins.sh compiles: the examples, and the hostile test plugins.
SPECS = ("plugins/*/plugin.json", "tests/plugins/*.json")

Test = TypeVar("Test", bound=Callable[..., Any])


def missing(reason: str) -> NoReturn:
    """Skips the running test with `reason`; under CI=true fails it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}: the plugin tests must run here", pytrace=False)
    pytest.skip(reason)


def built(name: str) -> BuiltPlugin:
    """A built plugin's module and spec (absolute paths), or the test skipped (failed under CI=true)."""
    try:
        return plugin_builds.built(name, BUILDS)
    except PluginBuildMissing as exc:
        missing(str(exc))


def source_names() -> list[str]:
    """The name of every plugin the repository's sources define (its spec's `name`), sorted."""
    return sorted(json.loads(spec.read_text())["name"] for pattern in SPECS for spec in ROOT.glob(pattern))


def needs(*names: str) -> Callable[[Test], Test]:
    """A test decorator: the test runs only when the plugins named (default: every one the sources define)
    are built; otherwise it is skipped, or failed under CI=true, before it starts."""

    def decorate(test: Test) -> Test:
        @functools.wraps(test)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            for name in names or source_names():
                built(name)
            return test(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate
