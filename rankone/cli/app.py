"""The typer apps, the options every command shares, and `main` (one line and exit code 2 for a user error).

`app` is what runs: its commands are listed from `catalog.COMMANDS` and a command's module is
imported only when that command is used, so `rankone --help` and `--version` start without
torch. The modules register their commands on `commands`, with `command` (or
`flags.options_command`), which puts the catalog's summary first in each `--help`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
import typer.main
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rankone import __version__
from rankone.cli.catalog import COMMANDS
from rankone.errors import RankoneError, RankoneNote
from rankone.options import DEFAULT_WORKSPACE
from rankone.progress import shown

SETTINGS: dict[str, Any] = {"add_completion": False, "pretty_exceptions_enable": False, "rich_markup_mode": "rich"}

# Where each command module registers its commands; `app` takes them from here on first use.
commands = typer.Typer(**SETTINGS)


def load_command(name: str) -> typer.core.TyperCommand:
    """The real command `name`, its module imported now."""
    importlib.import_module(COMMANDS[name].module)
    return typer.main.get_group(commands).commands[name]


class LazyCommands(typer.core.TyperGroup):
    """A group whose commands are listed from the catalog (stubs carrying the summary) and loaded when resolved."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        for name, entry in COMMANDS.items():
            self.commands.setdefault(name, typer.core.TyperCommand(name, help=entry.summary))

    def resolve_command(self, ctx, args):
        name, stub, rest = super().resolve_command(ctx, args)
        return name, (load_command(name) if name is not None else stub), rest


def command(name: str, **settings: Any) -> Callable:
    """Register `rankone NAME` on `commands`: its help is the catalog's summary, then the function's docstring."""
    def register(function: Callable) -> Callable:
        help_text = COMMANDS[name].summary + "\n\n" + inspect.cleandoc(function.__doc__ or "")
        commands.command(name, help=help_text, **settings)(function)
        return function
    return register


app = typer.Typer(
    name="rankone",
    help="Merge fine-tuned CLIP image towers with RankOne-MoE, stage by stage in a workspace.",
    no_args_is_help=True,
    cls=LazyCommands,
    **SETTINGS,
)
console = Console()
error_console = Console(stderr=True)

WorkspaceOption = Annotated[
    Path, typer.Option("-w", "--workspace", help="Workspace directory every stage reads and writes.")
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]


@contextlib.contextmanager
def step_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; yields a callback advancing it by one."""
    progress = Progress(TextColumn(f"[bold]{escape(description)}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=error_console)
    task = progress.add_task(description, total=total)
    with shown(progress):
        yield lambda *_: progress.advance(task)


def say(line: str) -> None:
    """A plain line on stdout: paths and numbers, never rich markup (a file may be called `shot[1].png`)."""
    console.print(line, soft_wrap=True, highlight=False, markup=False)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"rankone {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Merge fine-tuned CLIP image towers with RankOne-MoE, stage by stage in a workspace.

    Typical run: fetch → task-vectors → build-pool → adapt → eval → export → predict, or
    all of it from one file: rankone run PIPELINE.yaml.
    """


def _show_warning(message, category, filename, lineno, file=None, line=None, default=warnings.showwarning) -> None:
    """rankone's notes as one plain line on stderr; other libraries' warnings as Python shows them."""
    if issubclass(category, RankoneNote):
        error_console.print(f"note: {message}", highlight=False, markup=False, soft_wrap=True)
    else:
        default(message, category, filename, lineno, file, line)


def main() -> None:
    warnings.showwarning = _show_warning
    try:
        app(standalone_mode=False)
    except RankoneError as error:
        error_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        error_console.print("aborted")
        sys.exit(130)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except Exception as error:
        # Usage errors come from the click that typer bundles; recognised by shape, not import.
        if callable(getattr(error, "show", None)) and isinstance(getattr(error, "exit_code", None), int):
            error.show()
            sys.exit(error.exit_code)
        raise


__all__ = ["DEFAULT_WORKSPACE", "DeviceOption", "WorkspaceOption", "app", "command", "commands", "console", "error_console", "load_command",
           "main", "say", "step_bar"]
