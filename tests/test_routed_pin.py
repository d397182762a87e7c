"""The routed model's outputs, pinned: a refactor must leave them bit-identical for a fixed seed.

tests/data/routed_pin.safetensors holds the embeddings of the adapted RankOne-MoE tower
(task-vectors → build-pool → two adaptation steps with seed 3, through the CLI as a user
runs it) with per-sample and per-batch routing, and the adapted router tensors. It was
written by the code as it stood before the method-registry refactor;
`RANKONE_WRITE_PIN=1 pytest tests/test_routed_pin.py` rewrites it, which is right only
when the maths is meant to change.

Float results can differ between processors, so the check is bit-exact on the processor
(its name, family, model and stepping) and torch version the file was made with, and within
1e-5 elsewhere (CROSS_PROCESSOR); the file records which. It was last rewritten on an AMD EPYC of family 25
model 17 after checking the outputs matched the earlier pin (made on another EPYC) to 1e-6.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rankone.methods.rankone.artifact import routed_from_workspace
from rankone.methods.base import router_state
from rankone.methods.rankone.module import set_routing

PIN = Path(__file__).parent / "data" / "routed_pin.safetensors"
# Another processor rounds differently, and two Adam steps at lr 1e-2 carry that into the routers: an Intel Xeon's
# outputs differ from the EPYC pin by up to 1.4e-6.
CROSS_PROCESSOR = 1e-5


def processor() -> str:
    """The processor's model name (what decides float rounding) and torch's version."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        # Virtual machines often report a bare "AMD EPYC": family, model and stepping tell the generations apart.
        fields = dict(line.split(":", 1) for line in cpuinfo.read_text().split("\n\n")[0].splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        name = " ".join(filter(None, (fields.get("model name", name),
                                      *(f"{key} {fields[key]}" for key in ("cpu family", "model", "stepping") if key in fields))))
    return f"{name} / torch {torch.__version__}"


def pin_images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def test_routed_outputs_are_pinned(tiny_workspace, unlabeled_data, labeled_data, rankone_cli):
    work = str(tiny_workspace.root)
    for args in (
        ("task-vectors", "-w", work),
        ("build-pool", "--k", "2", "--lambda", "0.3", "-w", work),
        ("adapt", "--data", unlabeled_data, "--classnames-from", labeled_data, "--steps", "2", "--batch-size", "2",
         "--seed", "3", "--lr", "1e-2", "-w", work),
    ):
        code, _, err = rankone_cli(*args)
        assert code == 0, err
    model, _ = routed_from_workspace(tiny_workspace, "cpu")
    outputs = {f"router.{name}": tensor.clone().contiguous() for name, tensor in router_state(model).items()}
    with torch.no_grad():
        outputs["per-sample"] = model(pin_images())
        set_routing(model, 0.75, "per-batch")
        outputs["per-batch"] = model(pin_images())
    if os.environ.get("RANKONE_WRITE_PIN") == "1":
        PIN.parent.mkdir(exist_ok=True)
        save_file(outputs, str(PIN), metadata={"rankone": json.dumps({"processor": processor()})})
        pytest.skip(f"wrote {PIN}")
    with safe_open(str(PIN), framework="pt") as handle:
        made_on = json.loads(handle.metadata()["rankone"])["processor"]
        expected = {name: handle.get_tensor(name) for name in handle.keys()}
    assert set(outputs) == set(expected)
    # The adapted routers moved away from their initialisation, so the pin covers adaptation too.
    assert not torch.equal(expected["per-sample"], expected["per-batch"])
    for name, tensor in expected.items():
        if made_on == processor():
            assert torch.equal(outputs[name], tensor), f"{name}: differs from the pinned output (bit-exact on {made_on})"
        else:
            torch.testing.assert_close(outputs[name], tensor, atol=CROSS_PROCESSOR, rtol=0)
