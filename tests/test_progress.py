"""Progress when stderr is a pipe or a file: plain lines at a steady interval, none left by a failed stage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from rankone.methods.rankone import PoolOptions, build_pool_stage
from rankone.task_vectors import compute_task_vectors

RANKONE = str(Path(sys.executable).parent / "rankone")
# Before its first step a task has no loss and no estimate yet: `loss nan`, `? left`.
LINE = re.compile(r"^adapt: (\d+)/40, loss (nan|\d+\.\d{4}), [\d.]+ img/s, \d+:\d\d:\d\d elapsed(, (\d+:\d\d:\d\d|\?) left)?$")


def test_adapt_prints_plain_progress_lines_into_a_pipe(tiny_workspace, unlabeled_data, labeled_data):
    compute_task_vectors(tiny_workspace)
    build_pool_stage(tiny_workspace, PoolOptions(k=2))
    env = {**os.environ, "RANKONE_PROGRESS_INTERVAL": "0.05"}
    result = subprocess.run([RANKONE, "adapt", "-w", str(tiny_workspace.root), "--data", str(unlabeled_data), "--classnames-from",
                             str(labeled_data), "--steps", "40", "--batch-size", "4"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("adapt")]
    matches = [LINE.match(line) for line in lines]
    assert len(lines) >= 2 and all(matches), lines
    steps = [int(match.group(1)) for match in matches]
    assert steps == sorted(steps) and steps[-1] == 40 and matches[-1].group(3) is None  # the last line: done, nothing left
    assert not any(character in result.stderr for character in "━\r\x1b")  # no bar, no cursor control
    with safe_open(str(tiny_workspace.path("adapted/rankone.safetensors")), "pt") as handle:
        losses = json.loads(handle.metadata()["rankone"])["losses"]
    assert len(losses) == 40 and float(matches[-1].group(2)) == round(losses[-1], 4)
