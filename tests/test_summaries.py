"""What a stage tells its user: the summary lines and `--json`, checked against the files the stage wrote."""

from __future__ import annotations

import json

from safetensors import safe_open

from conftest import TASKS


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as handle:
        return json.loads(handle.metadata()["rankone"])


def test_adapt_summary_and_loss_curve_match_what_it_wrote(every_stage_workspace, unlabeled_data, labeled_data, rankone_cli):
    work = every_stage_workspace
    arguments = ["adapt", "-w", work.root, "--data", unlabeled_data, "--classnames-from", labeled_data, "--steps", "6", "--batch-size", "2"]
    code, out, err = rankone_cli(*arguments)
    assert code == 0, err
    curve = work.read_json("adapted/rankone-curve.json")  # recorded in the manifest like every stage output
    assert curve["losses"] == metadata(work.path("adapted/rankone.safetensors"))["losses"] and len(curve["losses"]) == 6
    assert set(curve["task_losses"]) == set(TASKS) and curve["first_step"] == 1
    for step, total in enumerate(curve["losses"]):
        assert abs(total - sum(curve["task_losses"][task][step] for task in TASKS)) < 1e-9
    lines = out.splitlines()
    assert lines[0] == f"loss (sum over tasks of the mean entropy) {curve['losses'][0]:.4f} → {curve['losses'][-1]:.4f} over steps 1-6"
    assert lines[1] == "mean entropy, first → last step: " + ", ".join(
        f"{task} {curve['task_losses'][task][0]:.3f} → {curve['task_losses'][task][-1]:.3f}" for task in TASKS)
    assert lines[2].endswith(f"{curve['seconds']:.1f} s") and f"{curve['images_per_second']:,.1f} images/s" in lines[2]
    assert lines[3] == f"wrote {work.path('adapted/rankone.safetensors')} and its loss curve {work.path('adapted/rankone-curve.json')}"

    code, out, err = rankone_cli(*arguments, "--json")
    assert code == 0, err
    result = json.loads(out)
    curve = work.read_json("adapted/rankone-curve.json")
    assert result["loss"] == [curve["losses"][0], curve["losses"][-1]] and result["steps"] == 6
    assert result["entropy"] == {task: [values[0], values[-1]] for task, values in curve["task_losses"].items()}


def test_every_stage_prints_its_result_as_json(every_stage_workspace, labeled_data, tmp_path, rankone_cli):
    work = every_stage_workspace
    code, out, _ = rankone_cli("merge", "-w", work.root, "--method", "ties", "--top", "0.5", "--json")
    assert code == 0 and json.loads(out) == {key: value for key, value in metadata(work.path("merged/ties.safetensors")).items()
                                             if key != "tasks"}
    code, out, _ = rankone_cli("eval", "-w", work.root, "--method", "ties", "--data", labeled_data, "--json")
    assert code == 0 and json.loads(out) == {**work.read_json("eval/ties.json"), "written": "eval/ties.json"}
    code, out, _ = rankone_cli("build-pool", "-w", work.root, "--k", "3", "--json")
    pool = json.loads(out)
    assert code == 0 and pool["counts"]["total"] == pool["counts"]["pool"] + pool["counts"]["routers"] + pool["counts"]["tower"]
    code, out, _ = rankone_cli("export", "-w", work.root, "--method", "ties", "--out", tmp_path / "m", "--json")
    record = json.loads((tmp_path / "m" / "rankone.json").read_text())
    assert code == 0 and sorted(json.loads(out)["files"]) == sorted(record["files"]) and json.loads(out)["method"] == "ties"
    code, out, _ = rankone_cli("task-vectors", "-w", work.root, "--json")
    assert code == 0 and json.loads(out) == work.read_json("task_vectors/analysis.json")


def test_plot_draws_the_loss_curves_and_finetune_keeps_its_curve(every_stage_workspace, unlabeled_data, labeled_data, tmp_path, rankone_cli):
    from PIL import Image

    work = every_stage_workspace
    code, _, err = rankone_cli("adapt", "-w", work.root, "--method", "wemoe", "--data", unlabeled_data, "--classnames-from", labeled_data,
                               "--steps", "3", "--batch-size", "2", "--plot")
    assert code == 0, err
    work.require("adapted/wemoe-curve.png")  # recorded in the manifest with the rest of the stage
    with Image.open(work.path("adapted/wemoe-curve.png")) as image:
        assert image.format == "PNG" and image.size[0] > 100
    assert len(work.read_json("adapted/wemoe-curve.json")["losses"]) == 3

    out = tmp_path / "expert"
    code, stdout, err = rankone_cli("finetune", "-w", work.root, "--task", "alpha", "--data", labeled_data, "--out", out,
                                    "--steps", "4", "--batch-size", "4", "--plot")
    assert code == 0, err
    losses = json.loads((out / "finetune-curve.json").read_text())["losses"]
    assert len(losses) == 4 and f"loss {losses[0]:.3f} →" in stdout
    with Image.open(out / "finetune-curve.png") as image:
        assert image.format == "PNG"


def test_build_pool_summary_states_the_kept_energy_range(every_stage_workspace, rankone_cli):
    code, out, _ = rankone_cli("build-pool", "-w", every_stage_workspace.root, "--k", "3")
    assert code == 0
    kept = [value for per_task in metadata(every_stage_workspace.path("pool.safetensors"))["kept_energy"].values() for value in per_task.values()]
    assert f"kept ‖τ‖² per matrix and task: {min(kept):.3f} to {max(kept):.3f} (mean {sum(kept) / len(kept):.3f})" in out
