"""`rankone run PIPELINE.yaml`: a whole run from one file, resumed and rerun from what the manifest records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TASKS, make_base_state, make_expert_state, snapshot, write_open_clip_dir
from rankone.errors import RankoneError
from rankone.methods.ties import TiesOptions
from rankone.pipeline import load_pipeline, plan

STAGE_LINES = ["task-vectors", "build-pool: {k: 2, lambda: 0.3}", "merge: {method: task-arithmetic}",
               "adapt: {method: rankone, data: UNLABELED, classnames_from: LABELED, steps: 1, batch_size: 2}",
               "eval: {method: rankone, data: LABELED}", "compare: {data: LABELED}"]


@pytest.fixture
def models(tmp_path) -> tuple[Path, dict[str, Path]]:
    """An open_clip base folder and one expert .safetensors file per task, as a user has them."""
    base = make_base_state(0)
    write_open_clip_dir(tmp_path / "models" / "base", base)
    experts = {}
    for index, task in enumerate(TASKS):
        experts[task] = tmp_path / "models" / f"{task}.safetensors"
        save_file(make_expert_state(base, seed=index + 1), experts[task])
    return tmp_path / "models" / "base", experts


def write_pipeline(path: Path, models, labeled: Path, unlabeled: Path, stages: list[str] = STAGE_LINES, extra: str = "") -> Path:
    base, experts = models
    lines = [f"workspace: {path.parent / 'work'}", "device: cpu", f"base: {base}", "experts:"]
    lines += [f"  {task}: {source}" for task, source in experts.items()]
    lines += ["stages:"] + [f"  - {line.replace('UNLABELED', str(unlabeled)).replace('LABELED', str(labeled))}" for line in stages]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def run_lines(out: str) -> list[str]:
    """The stages a `rankone run` printed as run (`$ rankone STAGE`) or skipped (`skip rankone STAGE`)."""
    return [" ".join(line.split()[:3]) for line in out.splitlines() if line.startswith(("$ rankone", "skip rankone"))]


def test_run_skips_what_is_done_and_reruns_from_a_changed_option(tmp_path, models, labeled_data, unlabeled_data, rankone_cli):
    file = write_pipeline(tmp_path / "pipeline.yaml", models, labeled_data, unlabeled_data)
    code, out, err = rankone_cli("run", file)
    assert code == 0, err
    stages = ["fetch", "task-vectors", "build-pool", "merge", "adapt", "eval", "compare"]
    assert run_lines(out) == [f"$ rankone {stage}" for stage in stages]
    work = tmp_path / "work"
    compare = json.loads((work / "compare.json").read_text())
    assert [row["method"] for row in compare["rows"]] == ["pretrained", "individual", "task-arithmetic", "rankone"]
    # The eval stage wrote what `rankone eval` writes, and the run printed its average.
    report = json.loads((work / "eval" / "rankone.json").read_text())
    assert f"rankone: average {report['average']:.2f}%" in out

    # A second run of the same file skips every stage and changes nothing.
    before = snapshot(work)
    code, out, err = rankone_cli("run", file)
    assert code == 0, err
    assert run_lines(out) == [f"skip rankone {stage}" for stage in stages]
    assert out.count("(up to date)") == len(stages)
    assert snapshot(work) == before

    # k changed: build-pool and every stage after it run again, and only those.
    write_pipeline(file, models, labeled_data, unlabeled_data, [line.replace("k: 2", "k: 3") for line in STAGE_LINES])
    code, out, err = rankone_cli("run", file, "--dry-run")
    assert code == 0, err
    assert "options changed: k 2 → 3" in out
    assert snapshot(work) == before  # a dry run touches nothing
    code, out, err = rankone_cli("run", file)
    assert code == 0, err
    assert run_lines(out) == ["skip rankone fetch", "skip rankone task-vectors"] + [f"$ rankone {stage}" for stage in stages[2:]]
    after = snapshot(work)
    assert all(after[name] == before[name] for name in before if name.startswith(("base.", "experts/", "task_vectors/")))
    assert after["pool.safetensors"] != before["pool.safetensors"]
    assert json.loads((work / "manifest.json").read_text())["pipeline"]["stages"][2]["options"]["k"] == 3


def test_run_resumes_after_a_failed_stage(tmp_path, models, labeled_data, unlabeled_data, rankone_cli):
    missing = tmp_path / "heads-later"
    stages = STAGE_LINES[:3] + [f"eval: {{method: task-arithmetic, data: LABELED, classnames: [alpha={missing}]}}"]
    file = write_pipeline(tmp_path / "pipeline.yaml", models, labeled_data, unlabeled_data, stages)
    code, out, err = rankone_cli("run", file)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and str(missing) in errors[0] and err.strip().endswith(errors[0].split(": ", 1)[1])
    assert run_lines(out)[-1] == "$ rankone eval"
    missing.write_text("\n".join(["red", "green"]) + "\n")
    code, out, err = rankone_cli("run", file)
    assert code == 0, err
    assert run_lines(out) == ["skip rankone fetch", "skip rankone task-vectors", "skip rankone build-pool",
                              "skip rankone merge", "$ rankone eval"]


def test_a_manual_stage_in_between_reruns_the_stage_it_overwrote(tmp_path, models, labeled_data, unlabeled_data, rankone_cli):
    file = write_pipeline(tmp_path / "pipeline.yaml", models, labeled_data, unlabeled_data, STAGE_LINES[:3])
    assert rankone_cli("run", file)[0] == 0
    assert rankone_cli("build-pool", "--k", "1", "-w", tmp_path / "work")[0] == 0
    planned = plan(load_pipeline(file))
    assert [(step.step.stage.name, step.run) for step in planned] == [
        ("fetch", False), ("task-vectors", False), ("build-pool", True), ("merge", True)]
    assert planned[2].reason == "pool.safetensors changed since it ran"


@pytest.mark.parametrize("text, line, message", [
    ("stages:\n  - task-vectors\ncolour: blue\n", 3, "colour: unknown key 'colour'"),
    ("stages:\n  - task-vectors\n  - build-pool:\n      k: 0\n", 4, "stages[1].build-pool.k: --k 0: must be at least 1"),
    ("stages:\n  - build-pool: {k: two}\n", 2, "stages[0].build-pool.k: --k 'two': expected a whole number"),
    ("stages:\n  - build-pool: {kk: 2}\n", 2, "stages[0].build-pool.kk: unknown option 'kk' for build-pool"),
    ("stages:\n  - merge: {method: ties, top: 1.5}\n", 2, "stages[0].merge.top: --top 1.5: must be in (0, 1]"),
    ("stages:\n  - merge: {method: task-arithmetic, top: 0.5}\n", 2, "stages[0].merge.top: --top: not used by --method task-arithmetic"),
    ("stages:\n  - merge: {method: magic}\n", 2, "stages[0].merge.method: --method 'magic': not a static method"[:40]),
    ("stages:\n  - smooth\n", 2, "stages[0]: unknown stage 'smooth'"),
    ("stages:\n  - adapt: {data: NOWHERE}\n", 2, "stages[0].adapt.data: --data NOWHERE: no such folder"),
    ("stages:\n  - task-vectors\n  - adapt: {data: HERE}\n", 3, "stages[1].adapt: needs pool.safetensors, which no earlier stage writes"),
    ("stages:\n  - eval: {method: ties, data: HERE}\n", 2, "stages[0].eval: needs merged/ties.safetensors"),
    ("stages:\n  - build-pool: {k: 2]\n", 2, "not valid YAML"),
    ("base: ${NO_SUCH_VARIABLE_X}\nstages: [task-vectors]\n", 1, "base: ${NO_SUCH_VARIABLE_X}: no such variable"),
    ("base: BASE\nstages: [task-vectors]\n", 1, "--expert: give at least one TASK=SOURCE"),
    ("device: abacus\nstages: [task-vectors]\n", 1, "device: --device 'abacus': not a device"),
    ("example: tiny\nstages: [task-vectors]\n", 1, "example: example 'tiny': expected one of full, quick"),
])
def test_bad_pipeline_files_name_file_key_and_line_and_write_nothing(tmp_path, models, unlabeled_data, rankone_cli, text, line, message):
    base, experts = models
    work = tmp_path / "work"
    header = f"workspace: {work}\n" + ("" if text.startswith("base:") else f"base: {base}\nexperts:\n  alpha: {experts['alpha']}\n")
    text = text.replace("NOWHERE", str(tmp_path / "nowhere")).replace("HERE", str(unlabeled_data)).replace("BASE", str(base))
    message = message.replace("NOWHERE", str(tmp_path / "nowhere"))
    file = tmp_path / "bad.yaml"
    file.write_text(header + text)
    offset = header.count("\n")
    code, _, err = rankone_cli("run", file)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{file}:{line + offset}: " in err and message in err, err
    assert not work.exists()


def test_a_missing_pipeline_file_is_one_line(tmp_path, rankone_cli):
    code, _, err = rankone_cli("run", tmp_path / "absent.yaml")
    assert code == 2 and f"{tmp_path / 'absent.yaml'}: no such pipeline file" in err


def test_an_out_of_range_value_reads_the_same_from_cli_yaml_and_python(tmp_path, tiny_workspace, models, labeled_data, unlabeled_data, rankone_cli):
    expected = "--top 1.5: must be in (0, 1]"
    with pytest.raises(RankoneError) as raised:
        TiesOptions(top=1.5)
    assert str(raised.value) == expected
    code, _, err = rankone_cli("merge", "--method", "ties", "--top", "1.5", "-w", tiny_workspace.root)
    assert code == 2 and err.strip().endswith(expected)
    file = write_pipeline(tmp_path / "pipeline.yaml", models, labeled_data, unlabeled_data, ["task-vectors", "merge: {method: ties, top: 1.5}"])
    code, _, err = rankone_cli("run", file)
    assert code == 2 and err.strip().endswith(expected)


def test_example_pipeline_files_load(tmp_path, monkeypatch):
    from rankone.examples.demo import pipeline_file

    monkeypatch.setenv("SVHN_TEST", str(tmp_path / "svhn"))
    # The paper's setting reads and checks without the Hub: nothing is fetched before a run.
    paper = load_pipeline(Path(__file__).resolve().parent.parent / "examples" / "vit-b-32-ta8.yaml", workspace=tmp_path / "w")
    assert [step.stage.name for step in paper.steps][:2] == ["fetch", "task-vectors"]
    assert next(step for step in paper.steps if step.stage.name == "build-pool").options.k == 32
    zoo = {"ZOO": str(tmp_path), "LAMBDA": "0.3"}
    with pytest.raises(RankoneError, match=r"demo\.yaml:\d+: stages\[\d+\]\.adapt\.data: --data .*: no such folder"):
        load_pipeline(pipeline_file("full"), workspace=tmp_path / "w", examples=lambda name: zoo)


@pytest.mark.slow
def test_the_quick_example_reruns_as_all_skipped(tmp_path, monkeypatch, rankone_cli, restores_cpu_settings):
    from rankone.examples.demo import pipeline_file

    monkeypatch.setenv("RANKONE_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "example"
    code, out, err = rankone_cli("run", pipeline_file("quick"), "-w", work, "--device", "cpu")
    assert code == 0, err
    # A file that names the example runs pinned, as `rankone demo` does.
    assert os.environ["MKL_CBWR"] == "COMPATIBLE" and not torch.backends.mkldnn.enabled
    assert run_lines(out) and all(line.startswith("$ rankone") for line in run_lines(out))
    before = snapshot(work)
    code, out, err = rankone_cli("run", pipeline_file("quick"), "-w", work, "--device", "cpu")
    assert code == 0, err
    # compare rewrites the eval reports, the seeds' adaptations overwrite each other: still all up to date.
    assert run_lines(out) and all(line.startswith("skip rankone") for line in run_lines(out)), out
    assert snapshot(work) == before
    # The same file with another k: build-pool and every stage after it would run, and only those.
    changed = tmp_path / "quick-k3.yaml"
    changed.write_text(pipeline_file("quick").read_text().replace("build-pool: {k: 2,", "build-pool: {k: 3,"))
    code, out, err = rankone_cli("run", changed, "-w", work, "--device", "cpu", "--dry-run")
    assert code == 0, err
    plan_lines = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    first_run = next(index for index, words in enumerate(plan_lines) if words[1] == "run")
    assert plan_lines[first_run][2] == "build-pool" and "options changed: k 2 → 3" in " ".join(plan_lines[first_run])
    assert all(words[1] == "skip" for words in plan_lines[:first_run]) and all(words[1] == "run" for words in plan_lines[first_run:])
    assert snapshot(work) == before
