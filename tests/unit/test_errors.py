"""One error base per package: every error shared or a service raises on purpose is an EdgefleetError,
beneath its package's own base, and keeps the base its callers already catch (ValueError, RuntimeError).
Pure class checks and one real Outbox, no broker: fast."""

from __future__ import annotations

import pytest

from services.cloud_ingest.errors import IngestError
from services.sync.download import Cancelled, DownloadFailed, DownloadInterrupted
from services.sync.errors import SyncError
from services.sync.rollout import Rejected, StepFailed, Superseded
from services.sync.smoke import SmokeFailed
from services.telemetry.errors import TelemetryError
from services.telemetry.outbox import Outbox, OutboxError
from shared.codec import DecodeError
from shared.errors import EdgefleetError
from shared.manifest import ModelError
from shared.registry import ObjectTooLarge, SignatureError

# (error, its package's base, the base callers caught it by before there was one)
FAMILY = [
    (DecodeError, EdgefleetError, ValueError),
    (ObjectTooLarge, EdgefleetError, ValueError),
    (SignatureError, EdgefleetError, ValueError),
    (ModelError, EdgefleetError, RuntimeError),
    (StepFailed, SyncError, Exception),
    (Rejected, StepFailed, Exception),
    (Superseded, SyncError, Exception),
    (SmokeFailed, SyncError, RuntimeError),
    (DownloadFailed, SyncError, RuntimeError),
    (DownloadInterrupted, SyncError, RuntimeError),
    (Cancelled, SyncError, RuntimeError),
    (OutboxError, TelemetryError, ValueError),
]


@pytest.mark.parametrize(("error", "package_base", "old_base"), FAMILY, ids=[e[0].__name__ for e in FAMILY])
def test_each_deliberate_error_is_an_edgefleet_error_beneath_its_package_base(error, package_base, old_base):
    assert issubclass(error, package_base)
    assert issubclass(error, EdgefleetError)
    assert issubclass(error, old_base)


@pytest.mark.parametrize("base", [SyncError, TelemetryError, IngestError])
def test_each_service_has_its_own_base_beneath_edgefleet_error(base):
    assert base.__bases__ == (EdgefleetError,)


def test_services_bases_are_distinct_so_one_service_never_catches_anothers():
    assert not issubclass(SyncError, (TelemetryError, IngestError))
    assert not issubclass(TelemetryError, (SyncError, IngestError))


def test_an_unknown_drop_policy_is_an_outbox_error_a_start_up_tuple_of_edgefleet_error_catches(tmp_path):
    with pytest.raises(OutboxError, match="drop policy") as caught:
        Outbox(tmp_path / "outbox.db", "dev-1", 1 << 20, drop="middle")
    assert isinstance(caught.value, EdgefleetError)  # the class telemetry's main names among its start errors
    assert not (tmp_path / "outbox.db").exists()  # refused before anything is written
