"""The fast part of the suite (`pytest tests/unit`, seconds): logic in this process, on real files and
the real model where it needs them, but no broker, no S3 server and no child process. Everything here
is marked `unit`, so `pytest -m "not unit"` runs the real-process part alone. Both rules are enforced:
a test here that asks for a process fixture is refused at collection, one that starts a child fails."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from services.sync.store import ModelStore
from shared.config import ENV_PREFIX

HERE = Path(__file__).resolve().parent
# tests/conftest.py's fixtures that start real processes (Mosquitto, moto, the services).
PROCESS_FIXTURES = {"broker", "s3_server", "fleet", "uplink", "start_inference"}


def _is_unit(item: pytest.Item) -> bool:
    return HERE in Path(item.path).resolve().parents


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in filter(_is_unit, items):
        item.add_marker(pytest.mark.unit)
        if wanted := PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(wanted)}: a real-process test belongs in tests/, "
                                    "not tests/unit")


@pytest.fixture(autouse=True)
def _no_settings_from_the_shell(monkeypatch):
    # Settings built here read the environment: a developer's EDGEFLEET_* must not change a verdict.
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _no_child_processes(monkeypatch):
    def refuse(args, *_, **__):
        raise AssertionError(f"a unit test starts no child process (here: {args!r}); move the test out of tests/unit")

    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.fixture
def store(tmp_path, model_dir):
    """A device's model store seeded with the real model, as sync prepares it at start."""
    s = ModelStore(tmp_path / "store", keep_versions=2)
    s.seed(model_dir)
    s.repair()
    return s
