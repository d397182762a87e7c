"""Peak memory and time of every pipeline stage against the number of experts T (issue: streaming stages).

    .venv/bin/python bench/memory.py                  # T = 2, 8, 20 at ViT-B/32 shapes
    .venv/bin/python bench/memory.py --tasks 2 8 --quick

For each T: a random ViT-B/32 CLIP (open_clip's own initialisation) is written as an
open_clip folder and T experts (its image tower plus noise) as .safetensors files, which
`rankone fetch` reads as any user's local files. Each stage then runs as its own process
through the real CLI (`rankone.cli.main`, see `--child`), and the parent reads that
process's peak RSS from `os.wait4` (ru_maxrss: anonymous and file-backed pages alike) and
its wall time; the child reports how long its start-up (Python, torch, rankone's modules)
took and how long the stage itself took. Separately, `--child-arithmetic` times only the
arithmetic a stage runs (build-pool's SVDs, each merge's maths) on tensors already in
memory, key by key, so "stage time / arithmetic time" is the stage's own overhead.

Writes the "memory" key of bench/results.json (the other keys belong to bench/run.py) and
prints the table docs/benchmarks.md reproduces. The workspace (about 0.7 GB per expert) is
deleted after each T unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.json"
# This process never imports torch: a child's ru_maxrss starts at its parent's peak (Linux keeps it across fork and
# exec), so the parent must stay small for each stage's peak to be its own.
ARCHITECTURE = "ViT-B-32"
K = 32
THREADS = 2
# WUDI's 400 Adam steps per matrix would dominate the run; its cost is linear in the steps.
WUDI_STEPS = 5
MERGES = ("task-arithmetic", "ties", "dare", "tsv-merge", "iso-c", "iso-cts", "wudi", "emr")
MERGE_OPTIONS = {"wudi": ["--steps", str(WUDI_STEPS)]}
# The merges whose cost at T = 20 is not hundreds of SVDs per matrix (TSV-Merge and Iso-CTS decompose every τ_t).
QUICK_MERGES = ("task-arithmetic", "ties", "dare", "iso-c", "emr")
NO_POOL = "--no-pool"
STATIC_EXPORT = "ties"  # every merge list here has it
NOISE = 1e-3


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", flush=True)


# ---- the models on disk ------------------------------------------------------------------------

def write_models(folder: Path, tasks: int) -> tuple[Path, dict[str, Path]]:
    """A random ViT-B/32 CLIP as an open_clip folder and `tasks` experts as .safetensors files of `visual.*` tensors."""
    import torch
    from safetensors.torch import save_file

    from rankone.models import build_clip, named_architecture

    architecture = named_architecture(ARCHITECTURE)
    torch.manual_seed(0)
    state = {key: value.detach().contiguous() for key, value in build_clip(architecture).state_dict().items()}
    base = folder / "base"
    base.mkdir(parents=True)
    model_cfg = {key: value for key, value in architecture.items() if key != "name"}
    (base / "open_clip_config.json").write_text(json.dumps({"model_name": ARCHITECTURE, "model_cfg": model_cfg, "preprocess_cfg": {}}))
    save_file(state, str(base / "open_clip_model.safetensors"))
    visual = {key: value for key, value in state.items() if key.startswith("visual.")}
    del state
    experts = {}
    for index in range(tasks):
        generator = torch.Generator().manual_seed(index + 1)
        expert = {key: value + NOISE * torch.randn(value.shape, generator=generator) for key, value in visual.items()}
        experts[f"task{index}"] = folder / f"task{index}.safetensors"
        save_file(expert, str(experts[f"task{index}"]))
        del expert
    return base, experts


# ---- one stage in its own process ---------------------------------------------------------------

def stage_commands(workspace: Path, base: Path, experts: dict[str, Path], merges: tuple[str, ...], export_root: Path,
                   merges_only: bool = False) -> list[tuple[str, list[str]]]:
    """(label, rankone arguments) in run order; with `merges_only`, just what the merges need before them."""
    w = ["-w", str(workspace)]
    fetch = ["fetch", "--base", str(base), *[arg for task, path in experts.items() for arg in ("--expert", f"{task}={path}")], *w]
    commands = [("fetch", fetch), ("task-vectors", ["task-vectors", *w])]
    merged = [(f"merge {method}", ["merge", "--method", method, *MERGE_OPTIONS.get(method, []), *w]) for method in merges]
    if merges_only:
        return commands + merged
    commands += [("build-pool", ["build-pool", "--k", str(K), "--svd", "randomized", *w]), *merged]
    commands += [("adapt rankone (subspace)", ["adapt", "--method", "rankone", "--router", "subspace", *w]),
                 ("export rankone", ["export", "--method", "rankone", "--out", str(export_root / "rankone"), *w]),
                 (f"export {STATIC_EXPORT}", ["export", "--method", STATIC_EXPORT,
                                  "--out", str(export_root / "static"), *w]),
                 ("inspect", ["inspect", str(workspace)])]
    return commands


STARTED = "bench-memory: stage started"


def stage_import_seconds(stderr: str) -> float:
    """Seconds of the top-level imports a stage made after it started, from `python -X importtime`'s lines
    (`import time: self | cumulative | name`, nested imports indented under their parent)."""
    after = stderr.split(STARTED, 1)[1] if STARTED in stderr else ""
    total_us = 0
    for line in after.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            _, cumulative, name = line.split("|")
            if cumulative.strip().isdigit() and not name.startswith("  "):
                total_us += int(cumulative)
    return total_us / 1e6


def run_child(arguments: list[str], threads: int) -> dict:
    """Run one child of this script; its peak RSS from wait4, its wall time, and what it reported."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as report:
        report_path = report.name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "BENCH_REPORT": report_path,
           "PYTHONPROFILEIMPORTTIME": "1"}
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, *arguments], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    code = os.waitstatus_to_exitcode(status)
    try:
        reported = json.loads(Path(report_path).read_text() or "{}")
    finally:
        os.unlink(report_path)
    if code != 0:
        messages = "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))
        raise SystemExit(f"{' '.join(arguments)} failed ({code}):\n{messages[-3000:]}")
    row = {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 2), **reported}
    if "stage_s" in row:
        # Modules a stage loads on first use (open_clip: seconds here) are start-up too, not the stage's work.
        row["stage_imports_s"] = round(stage_import_seconds(stderr), 2)
        row["work_s"] = round(row["stage_s"] - row["stage_imports_s"], 2)
    return row


def child_stage(arguments: list[str]) -> None:
    """`--child ARGS`: run `rankone ARGS` in this process, reporting start-up and stage time apart."""
    began = time.perf_counter()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", THREADS)))
    from rankone.cli import main  # what `rankone` itself loads before it parses a command

    started = time.perf_counter()
    print(STARTED, file=sys.stderr, flush=True)
    sys.argv = ["rankone", *arguments]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finished = time.perf_counter()
    Path(os.environ["BENCH_REPORT"]).write_text(json.dumps({"startup_s": round(started - began, 2),
                                                           "stage_s": round(finished - started, 2)}))
    raise SystemExit(code)


# ---- the arithmetic alone -----------------------------------------------------------------------

def child_arithmetic(workspace: Path, merges: list[str]) -> None:
    """`--child-arithmetic W METHOD...`: the seconds of build-pool's SVDs and of each merge's maths, on tensors read
    into memory beforehand key by key (reading is not timed), as the stages compute them."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", THREADS)))
    from rankone import methods
    from rankone.methods.merging import update_items
    from rankone.methods.rankone.pool import build_pool, mlp_weight_keys
    from rankone.task_vectors import load_task_vectors
    from rankone.workspace import Workspace

    lazy = load_task_vectors(Workspace(workspace))
    keys = list(lazy[0])
    seconds: dict[str, float] = {}

    def in_memory(key: str) -> list[dict[str, torch.Tensor]]:
        return [{key: vector[key].clone()} for vector in lazy]

    if NO_POOL in merges:  # an --add run: no build-pool stage to compare with
        merges = [method for method in merges if method != NO_POOL]
    else:
        total = 0.0
        for key in mlp_weight_keys({key: None for key in keys}):
            vectors = in_memory(key)
            began = time.perf_counter()
            build_pool(vectors, K, "randomized")
            total += time.perf_counter() - began
        seconds["build-pool"] = total
    for method in merges:
        chosen = methods.get(method)
        values = {"steps": WUDI_STEPS} if method == "wudi" else {}
        options = methods.method_options(chosen, **values)
        merge = getattr(chosen.merge, "stream", chosen.merge)
        total = 0.0
        for key in keys:
            vectors = in_memory(key)
            began = time.perf_counter()
            for _ in update_items(merge, vectors, options, None):
                pass
            total += time.perf_counter() - began
        seconds[f"merge {method}"] = total
    Path(os.environ["BENCH_REPORT"]).write_text(json.dumps({"arithmetic_s": {name: round(value, 2) for name, value in seconds.items()}}))


# ---- the run ------------------------------------------------------------------------------------

def measure(tasks: int, root: Path, merges: tuple[str, ...], threads: int, keep: bool, merges_only: bool = False,
            arithmetic: bool = True) -> dict:
    folder = Path(tempfile.mkdtemp(dir=root, prefix=f"memory-T{tasks}-"))
    try:
        log(f"T={tasks}: writing a random {ARCHITECTURE} base and {tasks} experts")
        began = time.perf_counter()
        # In a child too: ru_maxrss survives fork and exec, so every stage would inherit a large parent's peak.
        run_child(["--child-models", str(folder / "models"), str(tasks)], threads)
        base, experts = folder / "models" / "base", {f"task{index}": folder / "models" / f"task{index}.safetensors" for index in range(tasks)}
        setup_s = time.perf_counter() - began
        rows = []
        for label, arguments in stage_commands(folder / "work", base, experts, merges, folder / "exports", merges_only):
            row = {"stage": label, **run_child(["--child", *arguments], threads)}
            rows.append(row)
            log(f"T={tasks} {label}: {row['peak_rss_mb']:.0f} MB peak, {row['wall_s']:.1f} s "
                f"(start-up {row['startup_s']:.1f} s, stage {row['stage_s']:.1f} s, of which imports {row['stage_imports_s']:.1f} s)")
        if not arithmetic:
            return {"tasks": tasks, "setup_s": round(setup_s, 1), "stages": rows}
        arithmetic = run_child(["--child-arithmetic", str(folder / "work"), *merges, *([NO_POOL] if merges_only else [])],
                               threads)["arithmetic_s"]
        for row in rows:
            if row["stage"] in arithmetic:
                row["arithmetic_s"] = arithmetic[row["stage"]]
                row["overhead"] = round(row["work_s"] / max(arithmetic[row["stage"]], 1e-9), 2)
        log(f"T={tasks}: arithmetic alone {arithmetic}")
        return {"tasks": tasks, "setup_s": round(setup_s, 1), "stages": rows}
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def table(runs: list[dict]) -> str:
    """Markdown: one row per stage, peak RSS and stage time per T, the ratio of the largest T to the smallest."""
    counts = [run["tasks"] for run in runs]
    head = ("| stage | " + " | ".join(f"T={t} peak" for t in counts) + f" | T={counts[-1]}/T={counts[0]} | "
            + " | ".join(f"T={t} work (arith.)" for t in counts) + " |")
    lines = [head, "|---|" + "---:|" * (2 * len(counts) + 1)]
    for index, row in enumerate(runs[0]["stages"]):
        cells = [run["stages"][index] for run in runs]
        ratio = cells[-1]["peak_rss_mb"] / cells[0]["peak_rss_mb"]
        times = [f"{cell['work_s']:.1f} s" + (f" ({cell['arithmetic_s']:.1f} s)" if "arithmetic_s" in cell else "") for cell in cells]
        lines.append(f"| {row['stage']} | " + " | ".join(f"{cell['peak_rss_mb'] / 1024:.2f} GB" for cell in cells)
                     + f" | {ratio:.2f}× | " + " | ".join(times) + " |")
    return "\n".join(lines)


def write_results(section: dict) -> None:
    """Set the "memory" key of bench/results.json, leaving every other key as it is."""
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["memory"] = section
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def added_to(section: dict, addition: dict, merges: tuple[str, ...]) -> dict:
    """`section` (the recorded "memory" key) with the rows of `merges` from `addition` (an --add run) put in or
    replaced, for the same values of T, and the run that measured them listed under "additions"."""
    labels = {f"merge {method}" for method in merges}
    added = {run["tasks"]: run for run in addition.pop("runs")}
    if {run["tasks"] for run in section["runs"]} != set(added):
        raise SystemExit(f"--add: measure the same T as the recorded run ({sorted(run['tasks'] for run in section['runs'])})")
    for run in section["runs"]:
        rows = {row["stage"]: row for row in added[run["tasks"]]["stages"] if row["stage"] in labels}
        kept = [row for row in run["stages"] if row["stage"] not in rows]
        at = next((index for index, row in enumerate(kept) if not row["stage"].startswith(("fetch", "task-vectors", "build-pool", "merge"))), len(kept))
        run["stages"] = kept[:at] + list(rows.values()) + kept[at:]
    section.setdefault("additions", []).append({**addition, "stages": sorted(labels)})
    return section


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_stage(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--child-models":
        write_models(Path(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-arithmetic":
        child_arithmetic(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 20])
    parser.add_argument("--quick", action="store_true", help=f"only the merges {', '.join(QUICK_MERGES)}")
    parser.add_argument("--merges", nargs="+", help=f"the merges to run (default: {', '.join(MERGES)}; must include {STATIC_EXPORT})")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()), help="where the workspaces go")
    parser.add_argument("--keep", action="store_true", help="keep the workspaces")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave bench/results.json alone")
    parser.add_argument("--add", action="store_true", help="run only fetch, task-vectors and --merges, and put the merges' rows "
                                                          "into the recorded run (same --tasks) instead of replacing it")
    parser.add_argument("--memory-only", action="store_true", help="skip timing the arithmetic alone (it repeats each merge)")
    args = parser.parse_args()
    merges = tuple(args.merges) if args.merges else QUICK_MERGES if args.quick else MERGES
    if STATIC_EXPORT not in merges and not args.add:
        parser.error(f"--merges: include {STATIC_EXPORT}, the merge the static export writes")
    began = time.perf_counter()
    load_start = [round(value, 2) for value in os.getloadavg()]
    runs = [measure(tasks, args.root, merges, args.threads, args.keep, merges_only=args.add, arithmetic=not args.memory_only)
            for tasks in sorted(args.tasks)]
    section = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() - (time.perf_counter() - began))),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {"architecture": ARCHITECTURE, "k": K, "svd": "randomized", "threads": args.threads,
                     "wudi_steps": WUDI_STEPS, "weights": "random (open_clip init; experts = base + 1e-3 noise)"},
        "load_average_start": load_start, "load_average_end": [round(value, 2) for value in os.getloadavg()],
        "wall_s": round(time.perf_counter() - began, 1), "runs": runs,
    }
    if args.add:
        section = added_to(json.loads(RESULTS.read_text())["memory"], section, merges)
        runs = section["runs"]
    print(table(runs))
    if not args.no_write:
        write_results(section)
        print(f"wrote the memory key of {RESULTS}")


if __name__ == "__main__":
    main()
