"""Start-up cost of the `rankone` command (`make bench` runs it after bench/run.py).

    python bench/startup.py              # every command, 5 runs each
    python bench/startup.py --runs 9

Each command runs as a fresh process, as a user types it: `rankone --help`, `--version`
and `demo --zoo-path` (targets: under 1 s), then `rankone COMMAND --help` for every other
command, which is that command's fixed cost before it does any work (imports and its
flags); `python -c "import torch"` is printed beside them as the floor a command that
computes cannot go under. Medians of the runs; writes bench/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "startup.json"
TARGET_S = 1.0
FAST = (("--help",), ("--version",), ("demo", "--zoo-path"), ("demo", "--quick", "--zoo-path"))


def rankone_executable() -> list[str]:
    found = shutil.which("rankone", path=str(Path(sys.executable).parent)) or shutil.which("rankone")
    if found is None:
        raise SystemExit("bench/startup.py: no `rankone` on PATH; install the package first (make install)")
    return [found]


def command_names() -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rankone.cli.catalog import COMMANDS

    return list(COMMANDS)


def median_seconds(arguments: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        done = subprocess.run(arguments, capture_output=True, text=True)
        times.append(time.perf_counter() - began)
        if done.returncode != 0:
            raise SystemExit(f"bench/startup.py: {' '.join(arguments)} failed: {done.stderr.strip()}")
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (the median is kept)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rankone = rankone_executable()
    # --zoo-path is timed on a zoo built before (the first call builds it, minutes for the full one).
    for arguments in FAST:
        if arguments[0] == "demo":
            subprocess.run([*rankone, *arguments], capture_output=True, check=True)
    rows = [{"command": "rankone " + " ".join(arguments), "seconds": median_seconds([*rankone, *arguments], args.runs),
             "target_s": TARGET_S} for arguments in FAST]
    rows += [{"command": f"rankone {name} --help", "seconds": median_seconds([*rankone, name, "--help"], args.runs)}
             for name in command_names() if name != "demo"]
    floor = median_seconds([sys.executable, "-c", "import torch"], args.runs)
    results = {"machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "python": platform.python_version()},
               "load_average": os.getloadavg(), "runs": args.runs, "import_torch_s": floor, "commands": rows,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"| command | median s (of {args.runs}) |\n|---|---:|")
    for row in rows:
        mark = "" if "target_s" not in row else (" (target < 1 s: met)" if row["seconds"] < TARGET_S else " (target < 1 s: MISSED)")
        print(f"| `{row['command']}` | {row['seconds']:.2f}{mark} |")
    print(f"| `python -c \"import torch\"` (floor) | {floor:.2f} |")
    print(f"\nwrote {args.output}")
    return 0 if all(row["seconds"] < TARGET_S for row in rows if "target_s" in row) else 1


if __name__ == "__main__":
    raise SystemExit(main())
