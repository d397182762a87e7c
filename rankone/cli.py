"""The `rankone` command line: a thin layer over the library's functions.

Every command takes `-w/--workspace` and `--device`; every user error is a
`RankoneError`, printed as one line with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from rankone.errors import RankoneError

app = typer.Typer(
    name="rankone",
    help="Merge fine-tuned CLIP image towers with RankOne-MoE, stage by stage in a workspace.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
error_console = Console(stderr=True)

WorkspaceOption = Annotated[
    Path, typer.Option("-w", "--workspace", help="Workspace directory every stage reads and writes.")
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
DEFAULT_WORKSPACE = Path("rankone-work")


def parse_pairs(values: list[str], option: str) -> dict[str, str]:
    """`TASK=VALUE` pairs from a repeated option, in the order given."""
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise RankoneError(f"{option} {value!r}: expected TASK=VALUE")
        if name in pairs:
            raise RankoneError(f"{option}: task {name!r} given twice")
        pairs[name] = rest
    return pairs


def _print_version(value: bool) -> None:
    if value:
        from rankone import __version__

        console.print(f"rankone {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Merge fine-tuned CLIP image towers with RankOne-MoE, stage by stage in a workspace.

    Typical run: fetch → task-vectors → build-pool → adapt → eval → export → predict.
    """


# ---- fetch ------------------------------------------------------------------------

# ---- task-vectors, merge, eval -----------------------------------------------------

# ---- build-pool, adapt, export, predict -------------------------------------------

# ---- compare, inspect --------------------------------------------------------------

# ---- finetune, demo ----------------------------------------------------------------


def main() -> None:
    try:
        app(standalone_mode=False)
    except RankoneError as error:
        error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
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


if __name__ == "__main__":
    main()
