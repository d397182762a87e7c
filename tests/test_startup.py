"""Start-up: `rankone --help`, `--version` and `demo --zoo-path` answer without importing torch.

What is checked is what makes them fast (no torch, no command module imported), in a fresh
process as a user runs them; the times themselves are in bench/startup.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rankone.cli.app import load_command
from rankone.cli.catalog import COMMANDS
from rankone.examples.recipes import REPORT_FILE, RECIPE_FILE, recipe, zoo_root

PROBE = """
import sys
from rankone.cli import main
sys.argv = ["rankone", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
heavy = sorted(name for name in sys.modules if name in ("torch", "open_clip", "numpy") or name.startswith("rankone.cli.stages"))
print("HEAVY", ",".join(heavy))
"""


def run_probe(*arguments: str, env: dict | None = None) -> tuple[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *arguments], capture_output=True, text=True, env=env, check=True)
    out, _, heavy = done.stdout.rpartition("HEAVY ")
    return out, [name for name in heavy.strip().split(",") if name]


def test_help_and_version_import_no_torch():
    out, heavy = run_probe("--help")
    assert heavy == []
    assert all(name in out for name in COMMANDS)
    out, heavy = run_probe("--version")
    assert heavy == [] and out.startswith("rankone ")


def test_zoo_path_of_a_cached_zoo_imports_no_torch(tmp_path, monkeypatch):
    # A zoo as a finished build leaves it: the recipe, then the report written last.
    chosen = recipe(quick=True)
    root = zoo_root(chosen, tmp_path)
    root.mkdir(parents=True)
    (root / RECIPE_FILE).write_text(json.dumps(chosen))
    (root / REPORT_FILE).write_text(json.dumps({"key": root.name}))
    env = {**__import__("os").environ, "RANKONE_CACHE": str(tmp_path)}
    out, heavy = run_probe("demo", "--quick", "--zoo-path", env=env)
    # numpy comes with the suite's task table (a tenth of a second); torch and the stage commands do not.
    assert out.strip() == str(root) and heavy == ["numpy"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_is_loaded_from_its_module_and_leads_with_the_catalog_summary(name):
    command = load_command(name)
    assert command.name == name and command.help.startswith(COMMANDS[name].summary)
