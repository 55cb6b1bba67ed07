"""The `edgefleet` command by group, in process (typer's CliRunner): the main module only composes the
group modules, every failure goes through the one error helper, the tools' deliberate errors are
EdgefleetErrors, and the tables are built apart from the commands. No broker, no S3: fast."""

from __future__ import annotations

import json
import time

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from edgefleet import cli
from edgefleet import fleet_rollout as rollout
from edgefleet.audit import DeviceAudit, EpochAudit
from edgefleet.cli.common import comma_list, reported
from edgefleet.cli.rollout import status_table
from edgefleet.cli.telemetry import audit_table
from edgefleet.errors import ToolError
from edgefleet.fleet_rollout import BrokerUnreachable, NoRollout
from edgefleet.publish import PublishRefused
from edgefleet.s3access import DeviceKeyError
from shared.errors import EdgefleetError
from shared.schemas import ModelRef, SyncReport, SyncState

# The commands an operator's scripts call, by group: the split must keep every one.
COMMANDS = {
    (): ["inference", "sync", "cloud-ingest", "console", "health", "camera", "up", "fleet",
         "model", "broker", "certs", "rollout", "bench", "keys", "telemetry", "s3", "plugin", "simulate"],
    ("model",): ["build", "dataset", "quantize", "prune", "distill", "publish", "evaluate", "cascade"],
    ("broker",): ["passwords", "bridge"],
    ("certs",): ["ca", "issue", "revoke"],
    ("rollout",): ["start", "promote", "abort", "status"],
    ("bench",): ["pipeline", "compression", "swap", "overload", "telemetry", "images", "ep", "cascade", "wasm",
                 "fleet"],
    ("keys",): ["new"],
    ("telemetry",): ["audit"],
    ("s3",): ["device-key", "policy"],
    ("plugin",): ["publish", "list"],
    ("simulate",): ["run", "record"],
}


def _group(path: tuple[str, ...]):
    command = typer.main.get_command(cli.app)
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "edgefleet")
def test_every_command_of_every_group_is_there_in_its_order(path):
    assert list(_group(path).commands) == COMMANDS[path]


def test_the_main_module_defines_no_command_itself():
    def callbacks(command):
        if command.callback is not None:
            yield command.callback
        for sub in getattr(command, "commands", {}).values():
            yield from callbacks(sub)

    modules = {callback.__module__ for callback in callbacks(typer.main.get_command(cli.app))}
    assert modules == {f"edgefleet.cli.{group}" for group in ("services", "model", "pki", "rollout", "bench",
                                                               "telemetry", "s3", "plugin", "simulate")}


def test_reported_prints_where_and_why_then_exits_with_the_code(capsys):
    with pytest.raises(typer.Exit) as caught, reported("model build", EdgefleetError, code=3):
        raise PublishRefused("gate failed")
    assert caught.value.exit_code == 3
    assert capsys.readouterr().err == "edgefleet model build: gate failed\n"


def test_reported_lets_an_error_it_was_not_given_surface():
    with pytest.raises(KeyError), reported("model build", EdgefleetError):
        raise KeyError("a bug")


@pytest.mark.parametrize(("error", "old_base"), [
    (PublishRefused, RuntimeError), (NoRollout, RuntimeError), (DeviceKeyError, RuntimeError),
    (BrokerUnreachable, ConnectionError),
], ids=lambda e: getattr(e, "__name__", ""))
def test_the_tools_deliberate_errors_are_tool_errors_and_keep_their_old_base(error, old_base):
    assert issubclass(error, ToolError) and issubclass(error, EdgefleetError) and issubclass(error, old_base)
    assert ToolError.__bases__ == (EdgefleetError,)


def test_a_tool_error_exits_1_with_its_message_and_no_traceback():
    result = CliRunner().invoke(cli.app, ["s3", "device-key", "bad/id"])  # DeviceKeyError, before any request
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # not DeviceKeyError's traceback
    assert result.stderr.startswith("edgefleet s3 device-key: device id 'bad/id' must be")


def test_a_bad_config_exits_2_naming_the_key(tmp_path):
    result = CliRunner().invoke(cli.app, ["s3", "policy"], env={"EDGEFLEET_REGISTRY_BUCKET": "x"})
    assert result.exit_code == 2
    assert result.stderr.startswith("edgefleet: ") and "EDGEFLEET_REGISTRY_BUCKET" in result.stderr


def test_a_usage_error_of_a_model_command_exits_2():
    result = CliRunner().invoke(cli.app, ["model", "quantize", "--mode", "fastest"])
    assert result.exit_code == 2
    assert result.stderr == "edgefleet model quantize: 'fastest' is not a valid Mode\n"


def test_s3_policy_prints_the_policy_for_the_bucket_given():
    result = CliRunner().invoke(cli.app, ["s3", "policy", "--bucket", "fleet-models"])
    assert result.exit_code == 0
    assert "arn:aws:s3:::fleet-models/models/*" in json.dumps(json.loads(result.stdout))


def test_comma_list_strips_and_drops_empty_items():
    assert comma_list(" a, b,,c ,") == ["a", "b", "c"]
    assert comma_list("") == [] and comma_list(None) == []


def _text(table) -> str:
    console = Console(width=240, record=True)
    console.print(table)
    return console.export_text()


def test_the_rollout_status_table_shows_a_stale_device_and_its_model():
    now = time.time()
    report = SyncReport(device="dev-1", state=SyncState.ACTIVE, at=now - 600, rollout_id="r-1",
                        serving=ModelRef(name="lite0", version=2, sha256="a" * 64))
    text = _text(status_table([rollout.row("dev-1", report, None, now, status_interval_s=30)]))
    assert "dev-1" in text and "r-1" in text and "lite0 v2" in text and "STALE" in text and "600 s" in text


def test_the_audit_table_names_what_a_device_declared_lost_and_what_is_missing():
    epoch = EpochAudit(epoch="e1", received=7)
    device = DeviceAudit(device="dev-1", epochs={"e1": epoch}, received=7, highest_seq=10,
                         declared_lost={"overflow": 2}, missing=[(4, 4)])
    text = _text(audit_table({"dev-1": device}, "lake"))
    assert "s3://lake" in text and "overflow 2" in text and "e1 (7)" in text
    assert "dev-1" in text.splitlines()[-2]
