"""The `rankone` command line: a thin layer over the library.

`app.py` holds the typer app and `main`; `catalog.py` every command's summary and module,
which is all `rankone --help` reads; `stages.py` the pipeline stages (flags derived from
their options); `tools.py` predict, push, inspect and finetune; `demo.py` the built-in
example; `render.py` what they print. A command's module is imported when it runs.
"""

from rankone.cli.app import app, main

__all__ = ["app", "main"]
