from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import pytest

from edgefleet.broker import Broker
from edgefleet.models.build import build
from shared.config import DEFAULT_MODEL_DIR, InferenceSettings, load
from tests import s3pool
from tests.support import Device, ServiceProcess, Services, wait_until

REPO = Path(__file__).resolve().parent.parent
_device_ids = itertools.count(1)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The real EfficientNet-Lite0, built once at set-up (cached; built here if missing)."""
    path = REPO / DEFAULT_MODEL_DIR
    build(path)
    return path


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """A small evaluation (24) and calibration (16) set of real-photo crops, made once."""
    from edgefleet.models import dataset

    out = tmp_path_factory.mktemp("data")
    dataset.make(out, eval_count=24, calibration_count=16)
    return out


@pytest.fixture(scope="session")
def int8_dir(model_dir, data, tmp_path_factory) -> Path:
    """A static INT8 of the real model (every layer quantized, 8 calibration frames, no gate), made once
    for the tests that only read one (a cascade's stage 1, a parent pruning refuses); tests of quantizing
    itself make their own."""
    from edgefleet.models.quantize import Mode, quantize

    out = tmp_path_factory.mktemp("int8") / "int8"
    quantize(model_dir, out, Mode.STATIC, data / "eval", data / "calibration", calibration_limit=8, eval_limit=4,
             gate=0.0)
    return out


@pytest.fixture
def broker():
    """A real Mosquitto on its own port with its own config, killed at the end of the test."""
    with Broker() as b:
        yield b


@pytest.fixture
def s3_server():
    """A real S3-compatible server (moto in server mode) in its own process, for this test alone."""
    with contextlib.closing(s3pool.take()) as server:
        yield server


@pytest.fixture
def fleet(tmp_path, request):
    """A broker, an S3 registry and an operator key; devices of real processes on demand."""
    from tests.delivery import Fleet

    f = Fleet(tmp_path, request)
    yield f
    f.close()


@pytest.fixture
def uplink(tmp_path, request):
    """A device broker, a cloud broker and an S3 store; telemetry and cloud_ingest started on demand."""
    from tests.uplink import Uplink

    u = Uplink(tmp_path, request)
    yield u
    u.close()


@pytest.fixture
def start_inference(model_dir, tmp_path, request):
    """Starts `edgefleet inference` against a broker and waits for its retained online status."""
    services = Services(tmp_path, request)

    def start(broker: Broker, wait_online: bool = True, **settings: object) -> tuple[ServiceProcess, Device]:
        device_id = settings.pop("device_id", f"dev-{next(_device_ids)}")
        inference = load(InferenceSettings, None, **{
            "mqtt_url": broker.url, "device_id": device_id, "model_dir": model_dir, "status_interval_s": 0.5,
            "mqtt_reconnect_max_s": 1, **settings,
        })
        service = services.start(inference, f"inference-{len(services.started)}")
        device = Device(broker.url, device_id)
        request.addfinalizer(device.close)
        if wait_online:
            wait_until(
                lambda: (s := device.latest_status()) is not None and s.state == "online" or not service.alive(),
                60, "the inference service's online status",
            )
            assert service.alive(), f"inference exited:\n{service.log()}"
        return service, device

    yield start
    services.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def pytest_configure(config):
    config.addinivalue_line("markers", "images: needs the shipped images (tests/image_build.py builds them once)")


def _needs_images(item) -> bool:
    return item.get_closest_marker("images") is not None


def _first_process(config) -> bool:
    """This process runs the suite alone, or is xdist's first worker."""
    return getattr(config, "workerinput", {}).get("workerid", "gw0") == "gw0"


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(session, config, items):
    """In one process, the tests that need the images last, so the build they wait for overlaps
    everything before them.

    Under pytest-xdist (scripts/test.sh runs two workers) they are one group, run in this order by one
    worker: the compose stack's fixed ports and the one Docker engine allow a single stack at a time.
    xdist hands the largest group out first, so that worker starts with them and waits for the build
    while the other worker's tests go on."""
    items.sort(key=_needs_images)
    for item in items:
        if _needs_images(item):
            item.add_marker(pytest.mark.xdist_group("images"))


@pytest.hookimpl(optionalhook=True)  # xdist's hook: absent with -p no:xdist
def pytest_xdist_node_collection_finished(node, ids):
    """Ends the run before any test where --dist loadgroup did not group the tests that need the images:
    with pytest 9.2 it silently does nothing (pytest-dev/pytest-xdist#1386), and two compose stacks would
    fight over the same ports. (In xdist's controller, which sees node ids, not marks: the two files all
    of whose tests need them.)"""
    whole_files = ("tests/test_containers.py::", "tests/test_resources.py::")
    if node.config.getvalue("dist") == "loadgroup" and any(
            i.startswith(whole_files) and not i.endswith("@images") for i in ids):
        pytest.exit("pytest-xdist did not group the tests that need the images (pytest-xdist#1386: pytest 9.2 or "
                    "later?): install the pytest that pyproject.toml names, or run with -n 0", returncode=4)


def pytest_collection_finish(session):
    from tests.image_build import engine_available, start_build

    # Every xdist worker collects every test: the first starts the build now, so that it overlaps the
    # tests; whichever runs the group waits for it (tests/image_build.py).
    if _first_process(session.config) and any(map(_needs_images, session.items)) and engine_available():
        start_build()


def pytest_sessionfinish(session):
    from tests.image_build import stop_build

    stop_build()
    s3pool.close()
