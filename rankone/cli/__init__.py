"""The `rankone` command line: a thin layer over the library.

`app.py` holds the typer app and `main`; `stages.py` the pipeline stages (flags derived from
their options); `tools.py` predict, inspect, finetune and demo; `render.py` what they print.
"""

from rankone.cli import stages, tools  # noqa: F401  (each registers its commands on the app)
from rankone.cli.app import app, main

__all__ = ["app", "main"]
