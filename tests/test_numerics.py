"""rankone.numerics: which CPU kernels differ by vendor, and that the example's training avoids them."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import OperatorCensus
from rankone import numerics
from rankone.examples import recipes, zoo

# For each listed transcendental operator, and for numerics.exp: the
# sha256 of its output, printed as JSON by a child started with one ATEN_CPU_CAPABILITY.
PROBE = """
import hashlib, json, math, torch
torch.manual_seed(0)
x = torch.rand(20000) * 3 + 0.05
digest = lambda tensor: hashlib.sha256(tensor.detach().numpy().tobytes()).hexdigest()
found = {name: digest(getattr(torch, name)(x)) for name in NAMES}
found["numerics.exp"] = digest(torch.pow(math.e, x))
print(json.dumps(found))
"""
TRANSCENDENTAL = ["exp", "log", "tanh", "erf", "sin", "cos", "atan"]


def _probe(capability: str) -> dict[str, str]:
    script = PROBE.replace("NAMES", repr(TRANSCENDENTAL))
    environment = {"ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return json.loads(subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(not (torch.backends.mkl.is_available() and torch.cpu._is_avx2_supported()),
                    reason="the vendor-dependent kernels are MKL's, on x86 CPUs with AVX2")
def test_the_listed_operators_run_mkls_kernels_and_the_replacements_atens():
    # ATen's own kernels differ between its scalar and AVX2 code; MKL's vector math ignores the setting.
    scalar, vector = _probe("default"), _probe("avx2")
    for name in TRANSCENDENTAL:
        assert f"aten.{name}" in numerics.VENDOR_DEPENDENT_OPS
        assert scalar[name] == vector[name], f"torch.{name} follows ATEN_CPU_CAPABILITY: it is ATen's, not MKL's"
    assert scalar["numerics.exp"] != vector["numerics.exp"], "numerics.exp ignores ATEN_CPU_CAPABILITY"


def test_numerics_exp_and_adam_compute_what_torch_does():
    x = torch.linspace(-3, 5, 101)
    exact = torch.tensor([math.exp(value) for value in x.tolist()], dtype=torch.float64)
    # Within two float32 units in the last place of e^x.
    torch.testing.assert_close(numerics.exp(x).double(), exact, rtol=2.4e-7, atol=0)
    scale = torch.nn.Parameter(torch.tensor(2.3))
    numerics.exp(scale).backward()
    assert math.isclose(float(scale.grad), math.exp(2.3), rel_tol=1e-6)
    results = []
    for make in (lambda p: torch.optim.Adam(p, lr=0.01), lambda p: numerics.adam(p, "cpu", lr=0.01)):
        parameter = torch.nn.Parameter(torch.linspace(-1, 1, 50))
        optimizer = make([parameter])
        for _ in range(20):
            optimizer.zero_grad()
            (parameter ** 4).sum().backward()
            optimizer.step()
        results.append(parameter.detach())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
    assert isinstance(numerics.adam([torch.nn.Parameter(torch.ones(2))], "cpu", decoupled=True, lr=0.1), torch.optim.AdamW)


def test_the_example_build_calls_no_vendor_dependent_kernel(tmp_path):
    tiny = recipes.recipe(quick=True, tasks=["digits", "letters"], held_out=["letters"],
                          sizes={"pretrain": 16, "finetune": 8, "test": 4, "unlabeled": 4},
                          pretrain={"steps": 2, "batch_size": 8, "lr": 1e-3}, finetune={"steps": 2, "lr": 1e-4, "batch_size": 4})
    with OperatorCensus() as census:
        zoo.build_into(tiny, tmp_path, "cpu", lambda description, total: (lambda step, loss: None))
    # Adam's step and the scale's exp were the two before; the census saw the training run.
    assert census.calls["aten._fused_adamw_"] == 2 and census.calls["aten._fused_adam_"] == 2 * 2
    assert census.vendor_dependent() == {}
    report = json.loads((tmp_path / recipes.REPORT_FILE).read_text())
    assert list(report["parts"]) == ["data", "base", "experts/digits", "experts/letters"]
    assert set(report["build"]["packages"]) == set(zoo.BUILD_PACKAGES)
