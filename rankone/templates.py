"""The built-in caption templates of zero-shot heads (`templates.json`) and the task names they are keyed by.

Kept apart from `rankone.heads` (which needs torch) so what only names templates, such as
the example zoo's cache key that `rankone demo --zoo-path` computes, starts fast.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

GENERIC = "generic"
# Bumped when what a head file holds changes (2: rows carry the logit scale), so older cached heads are rebuilt.
HEAD_FORMAT = 2
# Short names users type for tasks whose canonical (FusionBench) names are long.
ALIASES = {
    "cars": "stanford-cars",
    "flowers": "oxford_flowers102",
    "flowers102": "oxford_flowers102",
    "pets": "oxford-iiit-pet",
    "oxford-pets": "oxford-iiit-pet",
    "sst2": "rendered-sst2",
    "emnist": "emnist_letters",
}


def _normalized(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


@lru_cache(maxsize=1)
def template_table() -> dict[str, list[str]]:
    """The built-in template sets, keyed by FusionBench task name (plus `generic`)."""
    text = resources.files("rankone").joinpath("templates.json").read_text(encoding="utf-8")
    return {name: list(templates) for name, templates in json.loads(text).items() if not name.startswith("_")}


def canonical_task(task: str) -> str | None:
    """The built-in table's name for `task` (`_`/`-`/case-insensitive, short aliases), or None."""
    wanted = _normalized(ALIASES.get(_normalized(task), task))
    for name in template_table():
        if name != GENERIC and _normalized(name) == wanted:
            return name
    return None


def templates_for(task: str) -> list[str]:
    """The built-in templates for `task`; the `generic` set for a task the table lacks."""
    table = template_table()
    return list(table[canonical_task(task) or GENERIC])

