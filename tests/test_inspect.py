"""`rankone inspect`: roles, counts and bytes of workspaces and exports; counts from an architecture alone."""

from __future__ import annotations

import json

import pytest

from rankone.errors import RankoneError
from rankone.inspection import architecture_report, inventory, read_header, role_of
from rankone.models import named_architecture


def test_vit_b_32_counts_are_pinned():
    """docs/method.md §12: ViT-B/32, 8 tasks."""
    report = architecture_report(named_architecture("ViT-B-32"), tasks=8)
    assert report["tower"] == 87_849_216
    rankone = {row["k"]: row for row in report["rankone"]}
    assert sorted(rankone) == [16, 32, 64, 128]
    assert (rankone[32]["pool"], rankone[32]["routers"], rankone[32]["total"]) == (23_592_960, 2_362_368, 113_804_544)
    # Pool and routers are linear in k: 2 matrices × 12 blocks × T·k·(in + out), and T·k·(d + 1) per block.
    assert rankone[128]["pool"] == 4 * rankone[32]["pool"] and rankone[16]["routers"] == 12 * 8 * 16 * 769
    wemoe = {row["tasks"]: row for row in report["wemoe"]}
    assert sorted(wemoe) == [8, 20]
    assert (wemoe[8]["task_vectors"], wemoe[8]["routers"], wemoe[8]["total"]) == (453_353_472, 7_160_928, 548_363_616)
    assert wemoe[20]["task_vectors"] == 20 * 12 * 4_722_432 and wemoe[20]["routers"] == 12 * (768 * 769 + 20 * 769)


def test_architecture_cli_prints_the_counts_and_builds_no_weights(rankone_cli):
    code, out, err = rankone_cli("inspect", "--architecture", "ViT-L-14", "--tasks", "4", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["tower"] == 303_966_208
    assert [row["tasks"] for row in report["wemoe"]] == [4, 8, 20]
    assert all(row["tasks"] == 4 for row in report["rankone"])
    code, out, err = rankone_cli("inspect", "--architecture", "ViT-B-32")
    assert code == 0 and "113,804,544" in out and "548,363,616" in out and "1.295" in out
    code, _, err = rankone_cli("inspect", "--architecture", "ViT-Q-99")
    assert code == 2 and "ViT-Q-99" in err


def test_workspace_roles_match_the_files(every_stage_workspace, rankone_cli):
    workspace = every_stage_workspace
    found = {row.role: row for row in inventory(workspace.root).roles}
    expected_roles = {"pretrained image tower", "pretrained text tower", "experts", "task vectors", "merged towers",
                      "static", "pool", "routers", "coefficients", "heads"}
    assert expected_roles <= set(found)
    # Independent count: load every file and add up numel and bytes by where the tensor lives.
    experts = [workspace.load_tensors(f"experts/{task}.safetensors") for task in workspace.tasks]
    assert found["experts"].parameters == sum(tensor.numel() for state in experts for tensor in state.values())
    assert found["experts"].nbytes == sum(tensor.numel() * tensor.element_size() for state in experts for tensor in state.values())
    assert found["experts"].files == {f"experts/{task}.safetensors" for task in workspace.tasks}
    pool = workspace.load_tensors("pool.safetensors")
    assert found["pool"].parameters == sum(t.numel() for name, t in pool.items() if name.endswith((".pool_u", ".pool_v")))
    assert found["static"].parameters == sum(t.numel() for name, t in pool.items() if name.startswith("static."))
    routers = [workspace.load_tensors(f"adapted/{method}.safetensors") for method in ("rankone", "wemoe")]
    assert found["routers"].parameters == sum(t.numel() for state in routers for t in state.values())
    assert found["coefficients"].parameters == 3 * (2 * 6 + 6)
    total = sum(path.stat().st_size for path in workspace.root.rglob("*.safetensors"))
    assert sum(row.nbytes for row in found.values()) < total  # data only; the headers are the rest

    code, out, err = rankone_cli("inspect", "-w", workspace.root)
    assert code == 0, err
    assert "task vectors" in out and "coefficients" in out and f"{found['experts'].parameters:,}" in out
    code, out, _ = rankone_cli("inspect", workspace.root, "--json")
    rows = {row["role"]: row for row in json.loads(out)["roles"]}
    assert rows["experts"]["bytes"] == found["experts"].nbytes and rows["experts"]["files"] == 3


def test_exported_model_roles(every_stage_workspace, tmp_path, rankone_cli):
    from rankone.export import ExportOptions, export_method
    from rankone.workspace import load_tensors

    config = export_method(every_stage_workspace, ExportOptions(out=tmp_path / "model", dtype="fp16"))
    found = {row.role: row for row in inventory(tmp_path / "model").roles}
    assert set(found) == {"static", "pretrained MLP", "pool", "routers", "heads"}
    tensors = load_tensors(tmp_path / "model" / "model.safetensors")
    assert found["heads"].parameters == config["parameters"]["heads"]
    assert found["routers"].parameters == config["parameters"]["routers"]
    assert found["pool"].parameters == config["parameters"]["pool"]
    assert found["static"].parameters + found["pretrained MLP"].parameters == config["parameters"]["tower"]
    assert found["pretrained MLP"].tensors == 2 * 2  # c_fc and c_proj weights of two blocks
    # fp16 export: pool and routers in 2 bytes, the tower and heads in 4.
    assert found["pool"].nbytes == 2 * found["pool"].parameters and found["routers"].nbytes == 2 * found["routers"].parameters
    for role in ("static", "pretrained MLP", "heads"):
        assert found[role].nbytes == 4 * found[role].parameters
    assert sum(row.nbytes for row in found.values()) == sum(t.numel() * t.element_size() for t in tensors.values())
    code, out, err = rankone_cli("inspect", tmp_path / "model")
    assert code == 0 and "artifact" in out and "pretrained MLP" in out

    # A static export: the merged image tower and the base's text tower, in either layout, with the counts rankone.json states.
    for layout in ("open_clip", "transformers"):
        folder = tmp_path / f"ta-{layout}"
        record = export_method(every_stage_workspace, ExportOptions(out=folder, method="task-arithmetic", format=layout))
        found = {row.role: row for row in inventory(folder).roles}
        assert set(found) == {"image tower", "text tower"}
        assert found["image tower"].parameters == record["parameters"]["image_tower"]
        assert found["text tower"].parameters == record["parameters"]["text_tower"]


def test_role_of_names_each_kind_of_tensor():
    assert role_of("base.safetensors", "visual.conv1.weight") == "pretrained image tower"
    assert role_of("base.safetensors", "token_embedding.weight") == "pretrained text tower"
    assert role_of("model.safetensors", "visual.transformer.resblocks.3.mlp.c_proj.weight") == "pretrained MLP"
    assert role_of("model.safetensors", "visual.transformer.resblocks.3.mlp.c_proj.bias") == "static"
    assert role_of("model.safetensors", "visual.transformer.resblocks.3.mlp.c_fc.pool_u") == "pool"
    assert role_of("model.safetensors", "visual.transformer.resblocks.3.mlp.router.weight") == "routers"
    assert role_of("adapted/rankone-checkpoints/step-10.safetensors", "parameters.0") == "checkpoints"
    assert role_of("merged/emr.safetensors", "emr/mask/0/visual.conv1.weight") == "task masks"
    assert role_of("merged/emr.safetensors", "emr/rescalers") == "task masks"
    assert role_of("merged/emr.safetensors", "visual.conv1.weight") == "merged towers"
    assert role_of("adapted/regmean.safetensors", "visual.conv1.weight") == "merged towers"
    assert role_of("adapted/fisher.safetensors", "visual.proj") == "merged towers"
    assert role_of("merged/smile.safetensors", "smile/transformer.resblocks.0.mlp.c_fc/up") == "SMILE experts and routers"


def test_bad_inputs_are_one_line_errors(tmp_path, rankone_cli):
    (tmp_path / "empty").mkdir()
    code, _, err = rankone_cli("inspect", tmp_path / "empty")
    assert code == 2 and "neither a workspace" in err and len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(RankoneError, match="broken.safetensors: not a safetensors file"):
        read_header(broken)
    code, _, err = rankone_cli("inspect", broken)
    assert code == 2 and "broken.safetensors" in err
    code, _, err = rankone_cli("inspect", tmp_path / "empty", "--architecture", "ViT-B-32")
    assert code == 2 and "either PATH or --architecture" in err
