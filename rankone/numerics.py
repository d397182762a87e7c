"""Kernels whose bits are the same on every x86 CPU, for the computations that must be.

torch's CPU builds send a few elementwise functions of contiguous float tensors (`exp`, `log`,
`sqrt`, `tanh`, `erf`, `sin`, `cos`, ...) to MKL's vector-math library instead of ATen's own
kernels. That library picks its code by processor vendor and model, and neither
`MKL_CBWR=COMPATIBLE` nor `ATEN_CPU_CAPABILITY` moves it: on a 2-core AMD EPYC (Zen 5) its
`sqrt` is not correctly rounded for 20 % of float32 inputs, whatever either setting says,
where a hardware square root always is. Adam calls `sqrt` on every parameter at every step,
so a training run that uses it differs between CPU vendors from its first step.

The functions here compute the same things with ATen's kernels (pinned by
`ATEN_CPU_CAPABILITY`) or exactly rounded instructions. `VENDOR_DEPENDENT_OPS` names the
operators to keep out of such runs; tests/test_numerics.py measures the list on the machine
it runs on and checks the example's training loops against it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import torch

# aten operators whose float32 CPU kernel is MKL's vector math on an MKL build of torch
# (found by which results stay the same under every ATEN_CPU_CAPABILITY; see the test).
VENDOR_DEPENDENT_OPS = frozenset({
    "aten.exp", "aten.log", "aten.sqrt", "aten.rsqrt", "aten.tanh", "aten.erf", "aten.sin", "aten.cos", "aten.atan",
    "aten.exp_", "aten.log_", "aten.sqrt_", "aten.rsqrt_", "aten.tanh_", "aten.erf_", "aten.sin_", "aten.cos_",
})


def adam(parameters: Iterable[torch.nn.Parameter], device: torch.device | str, decoupled: bool = False,
         **settings: float | tuple[float, float]) -> torch.optim.Optimizer:
    """Adam (AdamW when `decoupled`) whose step is one ATen kernel on CPU and CUDA.

    The fused step takes its square root with the exactly rounded instruction; the default
    step calls `torch.sqrt`, MKL's on CPU (module docstring).
    """
    optimizer = torch.optim.AdamW if decoupled else torch.optim.Adam
    return optimizer(parameters, fused=torch.device(device).type in ("cpu", "cuda"), **settings)


def exp(tensor: torch.Tensor) -> torch.Tensor:
    """e ** `tensor` through ATen's power kernel instead of `torch.exp` (module docstring)."""
    return torch.pow(math.e, tensor)


# Two threads whatever the machine: reductions split by thread count (1 and 2 give other bits),
# and one thread made the example's build half as fast again.
PINNED_THREADS = 2


def pinned_environment(cpu_capability: str) -> dict[str, str]:
    """The settings that hold MKL's and ATen's CPU kernels to one code path, given the CPU's ATen capability.

    MKL's COMPATIBLE branch is the one Intel documents as giving the same results on Intel and
    non-Intel CPUs (its AVX2 branch falls back to the CPU's own on AMD); it covers MKL's BLAS
    and LAPACK, not its vector math (module docstring). ATen's kernels are held to AVX2, the
    widest most x86 CPUs have, only where this CPU has it: the variable is obeyed without a check.
    """
    environment = {
        "MKL_CBWR": "COMPATIBLE",
        "MKL_NUM_THREADS": str(PINNED_THREADS),
        "OMP_NUM_THREADS": str(PINNED_THREADS),
        "MKL_DYNAMIC": "FALSE",
        "OMP_DYNAMIC": "FALSE",
    }
    if cpu_capability in ("AVX2", "AVX512"):
        environment["ATEN_CPU_CAPABILITY"] = "avx2"
    return environment


def pin_torch() -> None:
    """What a pinned process sets in torch itself; oneDNN (convolutions) picks its kernels by
    instruction set and cache sizes, and without it those ops run ATen's and MKL's."""
    torch.set_num_threads(PINNED_THREADS)
    torch.backends.mkldnn.enabled = False


def hardware_capability() -> str:
    """AVX2 when the CPU has it, else DEFAULT: asked of the hardware, not of ATen, whose answer follows a forced
    ATEN_CPU_CAPABILITY and is fixed by its first kernel."""
    return "AVX2" if getattr(torch.cpu, "_is_avx2_supported", lambda: False)() else "DEFAULT"


def pin_this_process() -> dict[str, Any]:
    """`pinned_environment` and `pin_torch` for this process; MKL and ATen read the settings when
    their first CPU kernel runs, so they take hold only before that (as at the start of
    `rankone demo`). Returns `pinned_state()`, which says whether they did."""
    os.environ.update(pinned_environment(hardware_capability()))
    pin_torch()
    return pinned_state()


def pinned_state() -> dict[str, Any]:
    """The CPU kernel settings in force in this process (recorded with the results they made)."""
    return {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": os.environ.get("MKL_CBWR"), "mkldnn": torch.backends.mkldnn.enabled}
