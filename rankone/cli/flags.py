"""CLI flags derived from options dataclasses: a typer command per stage, no flag written by hand.

`stage_command` builds a function whose signature typer reads: one keyword parameter per
declared option (its flag, help text, metavar and default come from the declaration),
plus `-w/--workspace` and `--device`. Options of the methods a stage can take are merged
by name: `--lambda` is one flag for every static merge, and its help says which methods use
it and with what default. The values reach `pipeline.stage_options`, which checks them
exactly as it checks a YAML file's.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING
from typing import Annotated, Any, Optional

import typer

from rankone import methods
from rankone.cli.app import DEFAULT_WORKSPACE, DeviceOption, WorkspaceOption, command
from rankone.options import Options, OptionInfo, OptionValue, base_type
from rankone.pipeline import Stage

KEYWORD = inspect.Parameter.KEYWORD_ONLY


def _cli_type(info: OptionInfo, optional: bool) -> Any:
    """The type typer parses the flag as; our own checks (ranges, choices, `off`) run afterwards."""
    base, _ = base_type(info.type)
    if typing.get_origin(base) in (list, dict) or (isinstance(base, type) and issubclass(base, OptionValue)):
        return Optional[list[str]]
    if info.declared.parse is not None:
        base = str
    return Optional[base] if optional else base


def _shown(value: Any, info: OptionInfo | None = None) -> str:
    if info is not None and info.declared.shown_default is not None:
        return info.declared.shown_default
    return f"{value:g}" if isinstance(value, float) else str(value)


def merged_options(classes: list[type[Options]], owners: dict[type[Options], list[str]]) -> list[tuple[OptionInfo, str]]:
    """Options of several classes merged by field name, each with a help text that says who uses it and its default."""
    merged: dict[str, list[tuple[OptionInfo, list[str]]]] = {}
    for options_class in classes:
        for info in options_class.options():
            merged.setdefault(info.name, []).append((info, owners[options_class]))
    everyone = sorted({name for names in owners.values() for name in names})
    found = []
    for entries in merged.values():
        first = entries[0][0]
        users = sorted({name for _, names in entries for name in names})
        defaults = {_shown(info.default, info) for info, _ in entries if info.default is not MISSING}
        if len(defaults) == 1:
            default_text = f"default {defaults.pop()}"
        else:
            default_text = "default " + "; ".join(f"{', '.join(names)}: {_shown(info.default, info)}" for info, names in entries)
        who = "" if users == everyone else f"{', '.join(users)} only; "
        found.append((first, f"{first.declared.help} ({who}{default_text})"))
    return found


def _parameter(info: OptionInfo, help_text: str, default: Any) -> inspect.Parameter:
    if isinstance(default, (dict, list)) and not default:
        default = None  # not given: the options' own empty default applies
    optional = default is None
    annotation = _cli_type(info, optional)
    metavar = info.declared.metavar or getattr(base_type(info.type)[0], "metavar", None)
    option = typer.Option(info.flag, help=help_text, metavar=metavar, show_default=not optional)
    return inspect.Parameter(info.name, KEYWORD, default=... if default is MISSING else default,
                             annotation=Annotated[annotation, option])


def options_command(
    name: str,
    details: str,
    option_classes: list[type[Options]],
    body: Callable[[dict[str, Any]], None],
    *,
    merged: list[tuple[OptionInfo, str]] = (),
    extra: list[inspect.Parameter] = (),
    context_settings: dict | None = None,
) -> None:
    """Register `rankone NAME`: a flag per declared option of `option_classes` (then `merged`, `extra`,
    `-w` and `--device`); `body(values)` gets every parameter by name. Its help is the catalog's
    summary, then `details`."""
    parameters: list[inspect.Parameter] = []
    if context_settings and context_settings.get("allow_extra_args"):
        parameters.append(inspect.Parameter("ctx", KEYWORD, annotation=typer.Context))
    parameters += [parameter for parameter in extra if parameter.default is inspect.Parameter.empty]
    for options_class in option_classes:
        for info in options_class.options():
            parameters.append(_parameter(info, info.declared.help, info.default))
    parameters += [_parameter(info, text, None) for info, text in merged]
    parameters += [parameter for parameter in extra if parameter.default is not inspect.Parameter.empty]
    parameters += [
        inspect.Parameter("workspace", KEYWORD, default=DEFAULT_WORKSPACE, annotation=WorkspaceOption),
        inspect.Parameter("device", KEYWORD, default="auto", annotation=DeviceOption),
    ]

    def function(**values: Any) -> None:
        body(values)

    function.__signature__ = inspect.Signature(parameters)
    function.__name__ = name.replace("-", "_") + "_command"
    function.__doc__ = details
    function.__annotations__ = {}
    command(name, context_settings=context_settings)(function)


def stage_command(
    stage: Stage,
    details: str,
    body: Callable[[dict[str, Any]], None],
    *,
    extra: list[inspect.Parameter] = (),
    context_settings: dict | None = None,
) -> None:
    """Register `rankone STAGE`: flags from the stage's options, then its methods' options merged by name.

    The help text is the stage's summary (from the catalog), the methods it takes (from the registry) and `details`.
    """
    owners: dict[type[Options], list[str]] = {}
    lines = []
    for method in methods.registered():
        if stage.takes(method):
            owners.setdefault(method.options, []).append(method.name)
            lines.append(f"{method.name}: {method.summary}.")
    merged = merged_options(stage.method_option_classes(), owners) if stage.method_kind not in (None, "any") else []
    # Blank lines keep typer's rich help from joining the method lines into one paragraph.
    help_text = "".join(line + "\n\n" for line in lines) + inspect.cleandoc(details)
    options_command(stage.name, help_text, [stage.options], body, merged=merged, extra=extra, context_settings=context_settings)


__all__ = ["merged_options", "options_command", "stage_command"]
