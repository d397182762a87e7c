"""SMILE against FusionBench's own SmileUpscalingAlgorithm, on the same weights and images.

tests/reference/data/smile.safetensors (`make_references.py smile`, in FusionBench's
virtualenv) holds, for the base and three experts of data_free_merges.safetensors,
FusionBench's upscaled CLIPVisionModel for three settings (top-1 and top-2 routing of
low-rank experts, and whole task vectors as experts), four random images, and each upscaled
model's embeddings of them (pooled output through the base's visual projection). Here the
same weights go through `rankone fetch`, `task-vectors` and `rankone merge --method smile`
as a user runs them; the experts, routers and embeddings must match FusionBench's.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DATA_FREE, REFERENCE_DATA, fetched_reference, reference, run_cli, snapshot, vision_keys
from rankone.convert import convert_state_dict
from rankone.methods import load_method
from rankone.methods.smile import SmileLinear, layer_experts, layer_parts, smile_tower

SMILE_REFERENCE = REFERENCE_DATA / "smile.safetensors"
TOLERANCE = 1e-5
# FusionBench's module (transformers' layout, in a block) → the layer's name in rankone's routed tower.
OUR_LAYER = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
             "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
# Their parts besides the pretrained layer: router and experts.
EXPERT_PARTS = (".gate.", ".experts.")


def smile_flags(config: dict) -> list[str]:
    """rankone's flags for one of FusionBench's settings (k, gate_k, top_k)."""
    return ["--expert-rank", str(config["k"]), "--gate-rank", str(config["gate_k"]), "--top-k", str(config["top_k"])]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours − theirs| over max |theirs|."""
    return float((ours - theirs).abs().max() / theirs.abs().max())


def our_layer(module: str) -> str:
    """`encoder.layers.0.mlp.fc1` → `transformer.resblocks.0.mlp.c_fc`."""
    _, _, index, rest = module.split(".", 3)
    return f"transformer.resblocks.{index}.{OUR_LAYER[rest]}"


@pytest.fixture(scope="module")
def upscaled(tmp_path_factory):
    """(FusionBench's settings, its tensors by group, the workspace, {setting: (merged file, embeddings, parameters)})."""
    metadata, groups = reference(DATA_FREE)
    smile_metadata, theirs = reference(SMILE_REFERENCE)
    workspace = fetched_reference(tmp_path_factory.mktemp("smile"), metadata, groups)
    settings = json.loads(smile_metadata["smile"])
    ours = {}
    for setting, config in settings.items():
        code, _, err = run_cli("merge", "--method", "smile", *smile_flags(config), "-w", workspace.root)
        assert code == 0, err
        model = load_method(workspace, "smile")
        with torch.no_grad():
            embeddings = model.encoder_for_task("alpha")(theirs["images"]["pixels"])
        ours[setting] = (workspace.load_tensors("merged/smile.safetensors"), embeddings, model.parameters)
    return settings, theirs, workspace, ours


@pytest.mark.parametrize("setting", ["top-1", "top-2", "dense"])
def test_experts_and_routers_match_fusionbench_s(upscaled, setting):
    settings, theirs, _, ours = upscaled
    stored, _, _ = ours[setting]
    their_state = vision_keys(theirs[setting])
    modules = sorted({key.removesuffix(".gate.weights") for key in their_state if key.endswith(".gate.weights")})
    layers = layer_parts(stored)
    # Every linear layer of the tower is upscaled, attention's four maps included: 2 blocks × 6.
    assert len(modules) == 12 and {our_layer(module) for module in modules} == set(layers)
    errors = []
    for module in modules:
        parts = layers[our_layer(module)]
        tasks, routed, width = parts["gate"].shape
        gates = their_state[f"{module}.gate.weights"].reshape(tasks, routed, width)
        for task in range(tasks):
            # Singular vectors are defined up to sign, so the experts are compared as U_k·(S_k·V_kᵀ) and the routers as the
            # projector V_g·V_gᵀ onto their span (all the router uses: the norm of a token's projection).
            if settings[setting]["k"] > 0:
                expert, their_expert = parts["up"][task] @ parts["down"][task], \
                    their_state[f"{module}.experts.{task}.u"] @ their_state[f"{module}.experts.{task}.svh"]
            else:
                expert, their_expert = parts["up"][task], their_state[f"{module}.experts.{task}.weight"]
            errors.append(relative_error(expert, their_expert))
            errors.append(relative_error(parts["bias"][task], their_state[f"{module}.experts.{task}.bias"]))
            errors.append(relative_error(parts["gate"][task].T @ parts["gate"][task], gates[task].T @ gates[task]))
    assert max(errors) <= TOLERANCE, f"{setting}: max relative error {max(errors):.3g}"
    # Everything else, the upscaled layers' shared weights included, is the pretrained tower in both.
    shared = {key.replace(".pretrained_model.", "."): value for key, value in their_state.items()
              if not any(part in key for part in EXPERT_PARTS)}
    for key, value in convert_state_dict(shared).items():
        assert torch.equal(stored[key], value), key


@pytest.mark.parametrize("setting", ["top-1", "top-2", "dense"])
def test_embeddings_match_fusionbench_s_upscaled_model(upscaled, setting):
    _, theirs, workspace, ours = upscaled
    # The same projection on both sides: FusionBench applies the base CLIPModel's, rankone's tower holds it.
    assert torch.equal(workspace.load_tensors("base.safetensors")["visual.proj"], theirs["projection"]["weight"].T)
    error = relative_error(ours[setting][1], theirs["embeddings"][setting])
    assert error <= TOLERANCE, f"{setting}: embeddings differ by {error:.3g} of their largest entry"


def test_parameters_are_the_tower_plus_every_expert_and_router(upscaled):
    settings, _, workspace, ours = upscaled
    tower = sum(value.numel() for key, value in workspace.load_tensors("base.safetensors").items() if key.startswith("visual."))
    tasks = len(workspace.tasks)
    for setting, config in settings.items():
        added = 0
        for out, width in [(32, 32)] * 4 * 2 + [(64, 32), (32, 64)] * 2:  # q, k, v, out, fc1, fc2 in two blocks
            rank, gate = min(config["k"], out, width), min(config["gate_k"], out, width)
            expert = rank * (out + width) if config["k"] > 0 else out * width
            added += tasks * (expert + out + gate * width)
        assert ours[setting][2] == tower + added, setting


def test_compare_reports_smile_and_export_refuses_it(tiny_workspace, labeled_data, rankone_cli, tmp_path):
    for command in (["task-vectors"], ["merge", "--method", "smile"]):
        code, _, err = rankone_cli(*command, "-w", tiny_workspace.root)
        assert code == 0, err
    stored = tiny_workspace.load_tensors("merged/smile.safetensors")
    # The default rank 128 is capped at the tiny tower's 32; c_fc is 128 × 32.
    assert stored["smile/transformer.resblocks.0.mlp.c_fc/up"].shape == (3, 128, 32)
    code, _, err = rankone_cli("compare", "-w", tiny_workspace.root, "--data", labeled_data, "--methods", "smile,pretrained")
    assert code == 0, err
    rows = {row["method"]: row for row in tiny_workspace.read_json("compare.json")["rows"]}
    extras = sum(value.numel() for key, value in stored.items() if key.startswith("smile/"))
    assert rows["smile"]["parameters"] == rows["pretrained"]["parameters"] + extras and not rows["smile"]["needs_task"]
    assert "| smile |" in tiny_workspace.path("compare.md").read_text()
    code, _, err = rankone_cli("export", "-w", tiny_workspace.root, "--method", "smile", "--out", tmp_path / "out")
    assert code == 2 and "--method smile: yields no single model to export" in err and not (tmp_path / "out").exists()


def test_bad_options_name_the_option_and_leave_the_workspace_unchanged(tiny_workspace, rankone_cli):
    assert rankone_cli("task-vectors", "-w", tiny_workspace.root)[0] == 0
    before = snapshot(tiny_workspace)
    for flags, message in ((["--top-k", "0"], "--top-k 0: must be at least 1"),
                           (["--top-k", "4"], "--top-k 4: more than the 3 experts (one per task)"),
                           (["--gate-rank", "0"], "--gate-rank 0: must be at least 1"),
                           (["--expert-rank", "-1"], "--expert-rank -1: must be at least 0")):
        code, _, err = rankone_cli("merge", "--method", "smile", *flags, "-w", tiny_workspace.root)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = rankone_cli("merge", "--method", "ties", "--top-k", "2", "-w", tiny_workspace.root)
    assert code == 2 and "--top-k: not used by --method ties" in err
    assert snapshot(tiny_workspace) == before


def test_a_layer_no_task_changed_stays_a_plain_linear_layer(tiny_architecture, base_state):
    generator = torch.Generator().manual_seed(0)
    assert layer_experts([torch.zeros(4, 3)] * 2, [torch.ones(4)] * 2, 2, 1) is None
    experts = layer_experts([torch.randn(128, 32, generator=generator) for _ in range(2)],
                            [torch.randn(128, generator=generator) for _ in range(2)], 4, 2)
    stored = {**base_state, **{f"smile/transformer.resblocks.1.mlp.c_fc/{part}": tensor for part, tensor in experts.items()}}
    tower = smile_tower(tiny_architecture, stored, 1, "test")
    assert isinstance(tower.transformer.resblocks[1].mlp.c_fc, SmileLinear)
    assert type(tower.transformer.resblocks[0].mlp.c_fc) is torch.nn.Linear
    assert type(tower.transformer.resblocks[0].attn) is torch.nn.MultiheadAttention


def test_a_damaged_file_names_the_tensor(tiny_architecture, base_state):
    from rankone.errors import RankoneError

    generator = torch.Generator().manual_seed(0)
    experts = layer_experts([torch.randn(128, 32, generator=generator) for _ in range(2)],
                            [torch.randn(128, generator=generator) for _ in range(2)], 4, 2)
    layer = "smile/transformer.resblocks.0.mlp.c_fc"
    for damaged, message in (({f"{layer}/bias": experts["bias"][:, :5]}, f"{layer}/bias is (2, 5), the layer needs (2, 128)"),
                             ({f"{layer}/extra": experts["bias"]}, f"{layer}/extra is (2, 128), the layer needs none"),
                             ({"smile/transformer.resblocks.0.ln_1/gate": experts["gate"]}, "tensors for transformer.resblocks.0.ln_1")):
        stored = {**base_state, **{f"{layer}/{part}": tensor for part, tensor in experts.items()}, **damaged}
        with pytest.raises(RankoneError, match="^merged/smile.safetensors: " + message.replace("(", r"\(").replace(")", r"\)")):
            smile_tower(tiny_architecture, stored, 1, "merged/smile.safetensors")
    with pytest.raises(RankoneError, match="top_k 3 is more than the 2 experts"):
        smile_tower(tiny_architecture, {**base_state, **{f"{layer}/{part}": tensor for part, tensor in experts.items()}}, 3, "file")
