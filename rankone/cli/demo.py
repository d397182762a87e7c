"""`rankone demo`: the built-in example end to end, or (`--zoo-path`) just the folder of its zoo.

Only what every path needs is imported at the top: a zoo built before is printed without
importing torch, so `ZOO=$(rankone demo --zoo-path)` costs a fraction of a second.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Optional

import typer

from rankone.cli.app import DEFAULT_WORKSPACE, DeviceOption, WorkspaceOption, command
from rankone.errors import RankoneError
from rankone.examples.recipes import cached_zoo, recipe


@command("demo")
def demo_command(
    quick: Annotated[bool, typer.Option("--quick", help="Toy sizes: the same stages in under 2 minutes.")] = False,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="RankOne-MoE adaptation seeds to average (default: the file's, 3; 1 with --quick).")] = None,
    zoo_path: Annotated[bool, typer.Option("--zoo-path", help="Only build (or reuse) the example zoo and print its folder, to run the stages by hand.")] = False,
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Builds (once, cached under $RANKONE_CACHE, default ~/.cache/rankone) six small tasks from
    scikit-learn digits, matplotlib's fonts and scikit-image's pictures, a tiny CLIP pretrained
    on them and one expert per task made with `rankone finetune`; then runs the example's
    pipeline file (rankone/examples/demo.yaml, or demo-quick.yaml) as `rankone run` does,
    printing each stage as the command that runs it. A toy illustration of the method, not a
    reproduction of the paper's numbers. The summary ends with the zoo's weights fingerprint:
    builds on other machines match the README's numbers when it matches the README's.

    Example: rankone demo --quick -w demo-work

    Example: ZOO=$(rankone demo --zoo-path)  # base/, experts/<task>/, data/{finetune,test,unlabeled}/
    """
    example = "quick" if quick else "full"
    if zoo_path:
        built = cached_zoo(recipe(quick=quick))
        if built is not None:
            print(built.root)
            return
    missing = [name for name in ("sklearn", "skimage", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise RankoneError(f"demo: the example suite needs {', '.join(missing)}; install them with pip install 'rankone[examples]'")
    if seeds is not None and seeds < 1:
        raise RankoneError(f"--seeds {seeds}: must be at least 1")
    # Imported here, not at the top: printing a cached zoo's folder must not wait for torch.
    from rankone.cli.stages import run_example

    run_example(example, seeds, workspace, device, zoo_path=zoo_path)
