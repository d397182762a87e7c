"""rankone benchmarks (`make bench`): routed forward latency, one adaptation step, build-pool SVD time.

    python bench/run.py            # the whole set, < 15 minutes on a 2-core CPU
    python bench/run.py --quick    # ViT-B/32 only, fewer repeats and sizes (a few minutes)
    python bench/run.py --only forward --only pool

Writes bench/results.json (every number, the machine, the load average) and prints the
table that docs/benchmarks.md reproduces. Timings are medians of interleaved repeats
with the same thread count on both sides; ratios come from the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    K,
    LAMBDA,
    SELECT,
    TASKS,
    THREADS,
    interleaved_medians,
    load_average,
    random_base,
    random_models,
    setup_threads,
    with_mlp_forward,
)

from rankone.methods.rankone.module import router_parameters, set_routing  # noqa: E402
from rankone.methods.rankone.pool import build_pool, mlp_weight_keys  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results.json"
IMAGE_SIZE = 224


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()[0]:.1f}] {message}", flush=True)


# ---- 1. forward latency ------------------------------------------------------------------

def build_models(name: str) -> dict:
    log(f"{name}: building random experts")
    began = time.perf_counter()
    models = random_models(name)
    models["setup_s"] = time.perf_counter() - began
    return models


def forward_latency(models: dict, batches: dict[int, int], reference_batches: dict[int, int], plain_batches: tuple[int, ...]) -> list[dict]:
    """Rows: static task arithmetic vs routed (fused per-sample, per-batch, plain per-sample, reference loop)."""
    name, setup_s = models["architecture"]["name"], models["setup_s"]
    static, routed = models["static"], models["routed"]
    per_batch = with_mlp_forward(routed, "fused")
    set_routing(per_batch, SELECT, "per-batch")
    variants = {"routed per-sample": routed, "routed per-batch": per_batch,
                "routed hard (subspace), grouped": with_mlp_forward(routed, "hard"),
                "routed hard (subspace), dense": with_mlp_forward(routed, "hard dense")}
    plain = with_mlp_forward(routed, "plain") if plain_batches else None
    reference = with_mlp_forward(routed, "reference")
    rows = []
    for batch, repeats in batches.items():
        images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(batch))
        runs = {"static": lambda: static(images), **{label: (lambda model=model: model(images)) for label, model in variants.items()}}
        if batch in plain_batches:
            runs["routed per-sample, plain path"] = lambda: plain(images)
        if batch == 1:
            runs.pop("routed per-batch")  # one image: per-batch routing is per-sample routing
        warmup = 0 if batch > 16 else 1  # smaller batches already warmed the same models
        log(f"forward {name} batch {batch}: {len(runs)} models × {repeats} interleaved repeats")
        load = load_average()
        with torch.inference_mode():
            timed = interleaved_medians(runs, repeats, warmup)
        for label, timing in timed.items():
            rows.append({"architecture": name, "batch": batch, "model": label, **timing,
                         "ratio_to_static": timing["median_s"] / timed["static"]["median_s"],
                         "min_ratio_to_static": timing["min_s"] / timed["static"]["min_s"], "load_before": load})
        if batch in reference_batches:
            log(f"forward {name} batch {batch}: reference-style per-sample loop")
            with torch.inference_mode():
                pair = interleaved_medians({"static": lambda: static(images), "reference loop": lambda: reference(images)},
                                           reference_batches[batch], warmup=0)
            rows.append({"architecture": name, "batch": batch, "model": "reference-style per-sample loop (baseline)",
                         **pair["reference loop"], "ratio_to_static": pair["reference loop"]["median_s"] / pair["static"]["median_s"],
                         "min_ratio_to_static": pair["reference loop"]["min_s"] / pair["static"]["min_s"], "load_before": load})
    for row in rows:
        row["setup_s"] = setup_s
    del variants, reference, plain
    return rows


# ---- 2. adaptation step ------------------------------------------------------------------

def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def timed_peak(run) -> tuple[float, float | None]:
    """(wall seconds of `run()`, its peak resident memory above the resident memory just before it, MiB).

    Linux only: writing 5 to /proc/self/clear_refs resets the VmHWM high-water mark; freed
    heap is returned first (gc, malloc_trim) so the starting point is what is really held.
    """
    gc.collect()
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
    except (OSError, RuntimeError):
        before = None
    began = time.perf_counter()
    run()
    seconds = time.perf_counter() - began
    return seconds, None if before is None else (_status_kib("VmHWM") - before) / 1024


def adaptation_step(models: dict, per_task_batches: dict[int, int]) -> list[dict]:
    """One step of `rankone.training.minimise_entropy` (8 tasks, entropy, Adam) routed vs a static forward+backward."""
    import statistics

    from torch.utils.data import TensorDataset

    from rankone.training import classify_with, minimise_entropy

    static, routed = models["static"], models["routed"]
    static.requires_grad_(False)
    embed_dim = models["architecture"]["embed_dim"]
    heads = {task: torch.nn.functional.normalize(torch.randn(10, embed_dim, generator=torch.Generator().manual_seed(index)), dim=-1)
             for index, task in enumerate(TASKS)}
    # The static tower has nothing to train; a per-channel input scale makes backward run through the whole tower.
    input_scale = torch.nn.Parameter(torch.ones(1, 3, 1, 1))
    classify_static = classify_with(lambda images: static(images * input_scale), heads)
    classify_routed = classify_with(routed, heads)
    routers = router_parameters(routed)
    rows = []
    for per_task, repeats in per_task_batches.items():
        data = {task: TensorDataset(torch.randn(per_task, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(index)))
                for index, task in enumerate(TASKS)}

        def step(classify, parameters):
            return lambda: minimise_entropy(classify, parameters, data, steps=1, batch_size=per_task, lr=1e-4, seed=0,
                                            device="cpu", progress=False)

        runs = {"static forward+backward": step(classify_static, [input_scale]), "routed adaptation step": step(classify_routed, routers)}
        log(f"adapt step: {per_task} images per task × {len(TASKS)} tasks, 1 warm-up + {repeats} interleaved repeats")
        load = load_average()
        for run in runs.values():
            run()
        measured: dict[str, list[tuple[float, float | None]]] = {label: [] for label in runs}
        for _ in range(repeats):
            for label, run in runs.items():
                measured[label].append(timed_peak(run))
        medians = {label: statistics.median(seconds for seconds, _ in values) for label, values in measured.items()}
        minimums = {label: min(seconds for seconds, _ in values) for label, values in measured.items()}
        for label, values in measured.items():
            peaks = [peak for _, peak in values if peak is not None]
            rows.append({"per_task_batch": per_task, "images_per_step": per_task * len(TASKS), "model": label,
                         "median_s": medians[label], "repeats": repeats,
                         "ratio_to_static": medians[label] / medians["static forward+backward"], "min_s": minimums[label],
                         "min_ratio_to_static": minimums[label] / minimums["static forward+backward"],
                         "peak_extra_mib": max(peaks) if peaks else None, "load_before": load})
    return rows


# ---- 3. build-pool SVD -------------------------------------------------------------------

def decaying_matrix(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A dense matrix whose singular values fall off like i^(-1/2): (G1·diag(d))·G2, scale 1e-3.

    Real fine-tuning deltas concentrate their energy in a few directions (that is what makes
    a rank-one pool work); a pure Gaussian matrix has a flat spectrum, the worst case for a
    randomized range finder.
    """
    rows, cols = shape
    inner = min(rows, cols)
    decay = torch.arange(1, inner + 1, dtype=torch.float32).rsqrt()
    left = torch.randn(rows, inner, generator=generator) * decay
    return (left @ torch.randn(inner, cols, generator=generator)).mul_(1e-3 / inner**0.5)


def pool_svd(exact_blocks: int | None, spectrum: str = "decaying") -> list[dict]:
    """`rankone.methods.rankone.pool.build_pool` on eight dense random ViT-B/32 MLP task vectors, exact and randomized.

    `spectrum`: "decaying" (singular values ∝ i^(-1/2), like real task vectors) or
    "gaussian" (flat, the randomized SVD's worst case).
    """
    _, base = random_base("ViT-B-32")
    keys = mlp_weight_keys(base)
    log(f"pool: generating 8 dense {spectrum} task vectors over {len(keys)} MLP matrices")
    generator = torch.Generator().manual_seed(5)
    if spectrum == "gaussian":
        task_vectors = [{key: torch.randn(base[key].shape, generator=generator).mul_(1e-3) for key in keys} for _ in TASKS]
    else:
        task_vectors = [{key: decaying_matrix(base[key].shape, generator) for key in keys} for _ in TASKS]
    del base
    blocks = len(keys) // 2
    subset = blocks if exact_blocks is None else min(exact_blocks, blocks)
    subset_keys = keys[: 2 * subset]
    rows = []
    results = {}
    for svd, chosen in (("randomized", keys), ("exact", subset_keys)):
        vectors = [{key: vector[key] for key in chosen} for vector in task_vectors]
        log(f"pool: {svd} SVD, {len(chosen)} matrices × {len(TASKS)} tasks")
        load = load_average()
        began = time.perf_counter()
        _, kept = build_pool(vectors, K, svd, tasks=TASKS)
        seconds = time.perf_counter() - began
        results[svd] = kept
        rows.append({"svd": svd, "spectrum": spectrum, "matrices": len(chosen), "tasks": len(TASKS), "seconds": seconds,
                     "seconds_for_all_blocks": seconds * len(keys) / len(chosen), "extrapolated": len(chosen) < len(keys),
                     "kept_energy_mean": sum(sum(v) for v in kept.values()) / (len(kept) * len(TASKS)), "load_before": load})
    # Kept energy, randomized against exact, on the matrices both ran.
    relative = [abs(results["randomized"][key][t] - results["exact"][key][t]) / results["exact"][key][t]
                for key in subset_keys for t in range(len(TASKS))]
    for row in rows:
        row["kept_energy_max_relative_gap"] = max(relative)
        row["compared_matrices"] = len(subset_keys)
    return rows


# ---- 4. artifact size ----------------------------------------------------------------------

def artifact_sizes(models: dict) -> list[dict]:
    """Bytes of `rankone export`'s model.safetensors (heads left out) per storage dtype, against the fp32 tower."""
    import tempfile

    from rankone.methods.artifact import Classifier
    from rankone.methods.rankone.artifact import rankone_tensors
    from rankone.models import build_visual
    from rankone.workspace import save_tensors_atomic

    tower_bytes = sum(tensor.numel() * 4 for tensor in build_visual(models["architecture"]).state_dict().values())
    classifier = Classifier(models["routed"], {}, {}, {})
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dtype in ("fp32", "fp16", "bf16"):
            path = Path(folder) / f"{dtype}.safetensors"
            save_tensors_atomic(path, rankone_tensors(classifier, dtype))
            size = path.stat().st_size
            rows.append({"dtype": dtype, "bytes": size, "tower_bytes": tower_bytes, "ratio_to_tower": size / tower_bytes})
            log(f"artifact: {dtype} {size / 2**20:.1f} MiB, {size / tower_bytes:.3f}× the fp32 tower")
            path.unlink()
    return rows


# ---- table and main ----------------------------------------------------------------------

def table(results: dict) -> str:
    lines = ["| benchmark | configuration | model | median | ratio (medians) | ratio (minimums) |", "|---|---|---|---|---|---|"]
    for row in results.get("forward", []):
        lines.append(f"| forward | {row['architecture']}, batch {row['batch']} | {row['model']} | {row['median_s'] * 1e3:.0f} ms | {row['ratio_to_static']:.2f}× | {row['min_ratio_to_static']:.2f}× |")
    for row in results.get("adapt", []):
        memory = "n/a" if row["peak_extra_mib"] is None else f"{row['peak_extra_mib']:.0f} MiB peak"
        lines.append(f"| adapt step | ViT-B-32, {row['per_task_batch']}/task × 8 | {row['model']} ({memory}) | {row['median_s'] * 1e3:.0f} ms | {row['ratio_to_static']:.2f}× | {row['min_ratio_to_static']:.2f}× |")
    for row in results.get("pool", []):
        note = f", measured on {row['matrices']} matrices, scaled to all" if row["extrapolated"] else ""
        lines.append(f"| build-pool | ViT-B-32, 8 tasks, k {K}, {row.get('spectrum', 'gaussian')} τ{note} | {row['svd']} SVD (kept energy {row['kept_energy_mean']:.4f}) | {row['seconds_for_all_blocks']:.1f} s | – | energy gap {row['kept_energy_max_relative_gap']:.2%} |")
    for row in results.get("artifact", []):
        lines.append(f"| artifact size | ViT-B-32, 8 tasks, k {K}, pool and routers in {row['dtype']} | model.safetensors without heads | {row['bytes'] / 2**20:.1f} MiB | {row['ratio_to_tower']:.3f}× the fp32 tower | – |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ViT-B/32 only, batches 1 and 16, few repeats")
    parser.add_argument("--only", action="append", choices=["forward", "adapt", "pool", "artifact"], help="run only these benchmarks")
    parser.add_argument("--spectrum", choices=["decaying", "gaussian"], default="decaying", help="singular-value profile of the build-pool task vectors")
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=None, help="include ViT-L/14 (default: on unless --quick)")
    parser.add_argument("--exact-blocks", type=int, default=None, help="time exact SVD on the first N blocks and scale up (default 2, quick 1; 0 = all)")
    parser.add_argument("--adapt-per-task", type=int, nargs="+", help="images per task of the adapt-step rows, two repeats each "
                                                                       "(default 2 and 4; SPEC's batch is 16)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    setup_threads()
    chosen = set(args.only or ["forward", "adapt", "pool", "artifact"])
    large = (not args.quick) if args.large is None else args.large
    exact_blocks = (1 if args.quick else 2) if args.exact_blocks is None else (args.exact_blocks or None)
    results: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": THREADS, "cpu_count": __import__("os").cpu_count()},
        "settings": {"tasks": len(TASKS), "k": K, "select": SELECT, "lambda": LAMBDA, "dtype": "float32", "quick": args.quick},
        "load_average_start": load_average(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    began = time.perf_counter()
    if chosen & {"forward", "adapt", "artifact"}:
        models = build_models("ViT-B-32")
        if "artifact" in chosen:
            results["artifact"] = artifact_sizes(models)
        if "forward" in chosen:
            batches = {1: 5, 16: 2} if args.quick else {1: 15, 16: 4, 64: 2}
            results["forward"] = forward_latency(models, batches, {1: 2, 16: 1}, plain_batches=(1, 16))
        if "adapt" in chosen:
            batches = {per_task: 2 for per_task in args.adapt_per_task} if args.adapt_per_task else {2: 1} if args.quick else {2: 2, 4: 1}
            results["adapt"] = adaptation_step(models, batches)
        del models
        gc.collect()
        if "forward" in chosen and large:
            results["forward"] += forward_latency(build_models("ViT-L-14"), {1: 2}, {}, plain_batches=())
            gc.collect()
    if "pool" in chosen:
        results["pool"] = pool_svd(exact_blocks, args.spectrum)
    results["load_average_end"] = load_average()
    results["wall_s"] = time.perf_counter() - began
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwall {results['wall_s']:.0f} s, load average {results['load_average_start']} → {results['load_average_end']}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
