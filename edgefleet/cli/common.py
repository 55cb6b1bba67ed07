"""What every command group shares: the --config and --json options, loading typed settings, and the
one way a command reports a failure (`edgefleet <command>: <why>` on standard error, then its exit
status), so no command writes that tail itself."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from shared.config import CommonSettings, ConfigError, load

S = TypeVar("S", bound=CommonSettings)

# Every bench writes its table and goals as JSON here (edgefleet/bench/report.py).
BenchJson = Annotated[Path | None, typer.Option("--json", help="Write the results here.")]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="A TOML file of config keys; the environment wins over it.")
]


def fail(where: str, problem: object, code: int = 1) -> typer.Exit:
    """Prints `edgefleet <where>: <problem>` to standard error.

    Args:
        where: the command's words after `edgefleet` (e.g. "model build"); "" for a failure of no one
            command (a bad config).
        problem: what went wrong, worded for a person (an exception prints its message).
        code: the exit status: 1 a refusal or failure, 2 bad input (as click's usage errors).

    Returns:
        The typer.Exit for the caller to raise.
    """
    typer.echo(f"edgefleet {where}: {problem}" if where else f"edgefleet: {problem}", err=True)
    return typer.Exit(code)


@contextmanager
def reported(where: str, *errors: type[Exception], code: int = 1) -> Iterator[None]:
    """Turns the listed errors raised inside the block into `fail(where, error, code)`; anything else
    (a bug) surfaces with its traceback.

    Raises:
        typer.Exit: with code, after the message, for an error of the listed classes.
    """
    try:
        yield
    except errors as exc:
        raise fail(where, exc, code) from None


def load_settings(cls: type[S], config: Path | None, **overrides: object) -> S:
    """The command's typed settings: environment over the TOML file over defaults, then the flags that
    were given (None: not given).

    Raises:
        typer.Exit: 2, after a message naming the bad key (ConfigError).
    """
    try:
        return load(cls, config, **{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        raise fail("", exc, code=2) from None


def check_environment(*classes: type[CommonSettings], **overrides: object) -> None:
    """Loads each settings class the command's children will load, so a bad EDGEFLEET_* value fails
    before anything starts, naming its key.

    Raises:
        typer.Exit: 2, after a message naming the bad key (ConfigError).
    """
    for cls in classes:
        load_settings(cls, None, **overrides)


def comma_list(text: str | None) -> list[str]:
    """The items of a comma-separated flag, stripped, empty ones dropped."""
    return [item.strip() for item in text.split(",") if item.strip()] if text else []
