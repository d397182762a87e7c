"""The built-in example suite: deterministic data, disjoint splits, a cached zoo, the demo."""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pytest
import torch

from conftest import OperatorCensus
from rankone import numerics
from rankone.data import labeled_images, unlabeled_images
from rankone.errors import RankoneError
from rankone.examples import recipes, suite, zoo
from rankone.sources import load_source

SMALL = {"pretrain": 12, "finetune": 12, "test": 12, "unlabeled": 6}


def read_open_clip_dir(path):
    loaded = load_source(str(path))
    return loaded.architecture, loaded.state_dict


def _digests(split: suite.Split) -> set[str]:
    return {hashlib.sha256(image.tobytes()).hexdigest() for image in split.images}


def test_at_least_five_tasks_with_different_label_spaces():
    assert len(suite.TASKS) >= 5
    label_spaces = [set(task.classnames) for task in suite.TASKS.values()]
    assert all(not (a & b) for a, b in itertools.combinations(label_spaces, 2))
    assert recipes.FULL_RECIPE["tasks"] == list(suite.TASKS)


def test_same_seed_same_bytes_other_seed_other_images():
    first = suite.generate_task("letters", SMALL, seed=3)
    again = suite.generate_task("letters", SMALL, seed=3)
    other = suite.generate_task("letters", SMALL, seed=4)
    for split in suite.SPLITS:
        assert [suite.png_bytes(image) for image in first[split].images] == [suite.png_bytes(image) for image in again[split].images]
        assert np.array_equal(first[split].labels, again[split].labels)
        assert not np.array_equal(first[split].images, other[split].images)


@pytest.mark.parametrize("task", list(suite.TASKS))
def test_splits_are_disjoint_and_images_are_32px_rgb(task):
    splits = suite.generate_task(task, SMALL, seed=0)
    for split in splits.values():
        assert split.images.shape == (SMALL[split.split], 32, 32, 3) and split.images.dtype == np.uint8
        assert len(_digests(split)) == len(split.images)
        assert split.labels.min() >= 0 and split.labels.max() < len(suite.TASKS[task].classnames)
    for a, b in itertools.combinations(suite.SPLITS, 2):
        assert not (_digests(splits[a]) & _digests(splits[b])), f"{task}: an image is in both {a} and {b}"


def test_digit_source_images_are_partitioned():
    partition = suite._digit_partition(0, recipes.FULL_RECIPE["sizes"])
    indices = np.concatenate(list(partition.values()))
    assert len(indices) == len(set(indices.tolist())) == sum(recipes.FULL_RECIPE["sizes"].values())


def test_a_finetune_split_larger_than_the_digits_left_redraws_its_own_sources():
    sizes = {"pretrain": 600, "finetune": 1000, "test": 320, "unlabeled": 160}
    partition = suite._digit_partition(0, sizes)
    left = 1797 - 600 - 320 - 160
    assert len(partition["finetune"]) == left
    indices = np.concatenate(list(partition.values()))
    assert len(indices) == len(set(indices.tolist()))
    finetune = suite.generate_task("digits", {"finetune": 1000}, seed=0)["finetune"]
    assert len(finetune.images) == 1000 and len(_digests(finetune)) == 1000
    _, targets = suite._digits()
    sources = suite._digit_partition(0, {"finetune": 1000})["finetune"]
    assert np.array_equal(finetune.labels, targets[sources[np.arange(1000) % len(sources)]])
    with pytest.raises(RankoneError, match="1800 digit images asked for outside fine-tuning"):
        suite._digit_partition(0, {"pretrain": 1000, "finetune": 10, "test": 800})


def test_full_size_test_splits_have_300_images_and_every_class():
    assert recipes.FULL_RECIPE["sizes"]["test"] >= 300
    for task, spec in suite.TASKS.items():
        test = suite.generate_task(task, {"test": recipes.FULL_RECIPE["sizes"]["test"]}, seed=0)["test"]
        assert len(test.images) >= 300
        assert set(test.labels.tolist()) == set(range(len(spec.classnames)))


def test_written_folders_read_back_with_the_cli_data_loader(tmp_path):
    data = suite.generate_suite(SMALL, seed=0, tasks=["digits", "photos"])
    root = suite.write_split_folders(data, tmp_path / "data")
    for task in ("digits", "photos"):
        test = labeled_images(root / "test", task)
        assert len(test.paths) == SMALL["test"]
        assert set(test.classnames) <= set(suite.TASKS[task].classnames)
        # The label a folder gives back names the class the generator drew.
        expected = sorted((suite.TASKS[task].classnames[label], n) for n, label in enumerate(data[task]["test"].labels))
        got = sorted((test.classnames[label], int(path.stem)) for path, label in zip(test.paths, test.labels))
        assert got == expected
        assert len(unlabeled_images(root / "unlabeled", task)) == SMALL["unlabeled"]
        assert not (root / "pretrain").exists()


def test_zoo_is_built_once_and_cached_by_recipe(tmp_path):
    torch.manual_seed(0)
    tiny = recipes.recipe(
        quick=True,
        tasks=["digits", "textures"],
        held_out=["textures"],
        sizes={"pretrain": 16, "finetune": 8, "test": 4, "unlabeled": 4},
        pretrain={"steps": 2, "batch_size": 8, "lr": 1e-3},
        finetune={"steps": 2, "lr": 1e-4, "batch_size": 4},
    )
    built = zoo.build_zoo(tiny, cache=tmp_path)
    assert built.root.parent == tmp_path / "examples"
    architecture, base = read_open_clip_dir(built.base)
    assert architecture["vision_cfg"] == tiny["architecture"]["vision_cfg"]
    for task in tiny["tasks"]:
        _, expert = read_open_clip_dir(built.expert(task))
        assert any(not torch.equal(expert[key], base[key]) for key in expert if key.startswith("visual."))
        assert len(labeled_images(built.data("test"), task).paths) == 4
    stamp = (built.root / zoo.REPORT_FILE).stat().st_mtime_ns
    again = zoo.build_zoo(tiny, cache=tmp_path)
    assert again.root == built.root and (again.root / zoo.REPORT_FILE).stat().st_mtime_ns == stamp
    # The fingerprint the build recorded is the one its files give on a later load.
    assert again.report["fingerprint"] == recipes.weights_fingerprint(again.root) == built.fingerprint
    assert built.report["build"]["threads"] == numerics.PINNED_THREADS and built.report["key"] == built.root.name
    assert json.loads((built.root / zoo.RECIPE_FILE).read_text()) == tiny
    other = zoo.build_zoo({**tiny, "seed": 1}, cache=tmp_path)
    assert other.root != built.root
    assert not [path for path in (tmp_path / "examples").iterdir() if path.name.startswith(".")]


def _write_weights(root, tensors):
    from safetensors.torch import save_file

    for folder in ("base", "experts/digits", "experts/photos"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(root / folder / "open_clip_model.safetensors"))


def test_weights_fingerprint_changes_with_one_ulp_and_is_stable_across_a_reload(tmp_path):
    # A zoo as a build before fingerprints leaves it: no fingerprint in its report.
    tensors = {"visual.proj": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), "logit_scale": torch.tensor(2.5)}
    _write_weights(tmp_path, tensors)
    (tmp_path / recipes.RECIPE_FILE).write_text(json.dumps(recipes.recipe(quick=True, tasks=["digits", "photos"])))
    (tmp_path / recipes.REPORT_FILE).write_text(json.dumps({"key": tmp_path.name}))
    fingerprint = recipes.load_zoo(tmp_path).fingerprint
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert recipes.load_zoo(tmp_path).fingerprint == fingerprint
    nudged = tensors["visual.proj"].clone()
    nudged[1, 2] = torch.nextafter(nudged[1, 2], torch.tensor(float("inf")))
    from safetensors.torch import save_file

    save_file({**tensors, "visual.proj": nudged}, str(tmp_path / "experts" / "photos" / "open_clip_model.safetensors"))
    assert recipes.weights_fingerprint(tmp_path) != fingerprint
    # A recorded fingerprint is what a load gives: the files are not read again.
    (tmp_path / recipes.REPORT_FILE).write_text(json.dumps({"key": tmp_path.name, "fingerprint": "0123456789abcdef"}))
    assert recipes.load_zoo(tmp_path).fingerprint == "0123456789abcdef"


def test_the_build_environment_pins_mkl_threads_and_aten_where_the_cpu_has_avx2():
    pinned = numerics.pinned_environment("AVX512")
    assert pinned["MKL_CBWR"] == "COMPATIBLE" and pinned["ATEN_CPU_CAPABILITY"] == "avx2"
    assert pinned["OMP_NUM_THREADS"] == pinned["MKL_NUM_THREADS"] == str(numerics.PINNED_THREADS)
    assert numerics.pinned_environment("AVX2")["ATEN_CPU_CAPABILITY"] == "avx2"
    # Forcing AVX2 kernels on a CPU without it would crash them, so it is left out there.
    assert "ATEN_CPU_CAPABILITY" not in numerics.pinned_environment("DEFAULT")


def test_the_build_ignores_the_callers_threads_and_instruction_set(tmp_path, monkeypatch):
    tiny = recipes.recipe(quick=True, tasks=["digits"], held_out=[], sizes={"pretrain": 16, "finetune": 8, "test": 4, "unlabeled": 4},
                          pretrain={"steps": 2, "batch_size": 8, "lr": 1e-3}, finetune={"steps": 2, "lr": 1e-4, "batch_size": 4})
    plain = zoo.build_zoo(tiny, cache=tmp_path / "plain")
    # Left to reach the build, MKL_CBWR or ATEN_CPU_CAPABILITY alone gives this recipe other bits.
    for name, value in {"OMP_NUM_THREADS": "1", "MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx512"}.items():
        monkeypatch.setenv(name, value)
    other = zoo.build_zoo(tiny, cache=tmp_path / "other")
    assert other.fingerprint == plain.fingerprint


def test_the_demo_summary_and_its_json_give_the_zoos_fingerprint(tmp_path):
    from rankone.examples.demo import DemoResult, result_lines, write_result_json

    result = DemoResult(lam=0.3, entropies={0.3: 1.0}, summary={"rows": []}, perfect_router={"average": 50.0, "tasks": {}},
                        rankone_seeds={0: {"average": 40.0}}, zoo_key="0011223344556677", zoo_fingerprint="0123456789abcdef")
    assert "example zoo 0011223344556677, weights fingerprint 0123456789abcdef" in result_lines(result)[-1]
    write_result_json(result, tmp_path / "demo.json")
    assert json.loads((tmp_path / "demo.json").read_text())["zoo"] == {"key": "0011223344556677", "fingerprint": "0123456789abcdef"}


@pytest.mark.slow
def test_demo_quick_runs_every_stage_through_the_cli(tmp_path, monkeypatch, restores_cpu_settings):
    from typer.testing import CliRunner

    from rankone.cli import app

    monkeypatch.setenv("RANKONE_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "demo-work"
    with OperatorCensus() as census:
        result = CliRunner().invoke(app, ["demo", "--quick", "-w", str(work), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # Every stage in this process (the zoo's build has its own test) keeps to kernels that are the same on every x86 CPU.
    assert census.calls["aten._fused_adam_"] > 0 and census.vendor_dependent() == {}
    for stage in ("fetch", "task-vectors", "merge", "build-pool", "adapt", "eval", "compare"):
        assert f"$ rankone {stage} " in result.output
    summary = json.loads((work / "compare.json").read_text())
    methods = [row["method"] for row in summary["rows"]]
    assert methods == ["pretrained", "individual", "weight-averaging", "task-arithmetic", "ties", "dare", "tsv-merge", "emr",
                       "adamerging", "regmean", "fisher", "wemoe", "rankone"]
    assert summary["tasks"] == recipes.QUICK_RECIPE["tasks"]
    demo = json.loads((work / "demo.json").read_text())
    assert demo["lambda"] in (0.1, 0.3)
    assert set(demo["perfect_router"]["tasks"]) == set(summary["tasks"])
    # The router kinds and the pool oracle, each evaluated with its routing before the next adapt replaced it.
    assert set(demo["router_kinds"]) == {"subspace", "task"} and set(demo["pool_oracle"]["tasks"]) == set(summary["tasks"])
    assert demo["pool_oracle"]["routing"]["own_task"] and all(rates == [1.0] * len(rates) for rates in demo["pool_oracle"]["routing"]["own_task"].values())
    assert f"pool oracle (each task's own experts at gate 1; told the task): average {demo['pool_oracle']['average']:.1f}" in result.output.replace("\n", " ")
    # The summary lines agree with the reports the stages wrote.
    rankone_row = next(row for row in summary["rows"] if row["method"] == "rankone")
    assert f"RankOne-MoE over seeds [0]: {rankone_row['average']:.1f}" in result.output.replace("\n", " ")
    assert f"weights fingerprint {demo['zoo']['fingerprint']}" in result.output.replace("\n", " ")
    # Too late to pin MKL and ATen in a process that ran kernels before; the record says what was in force.
    assert demo["cpu_kernels"]["threads"] == numerics.PINNED_THREADS and demo["cpu_kernels"]["mkldnn"] is False
    assert f"CPU kernels: ATen {demo['cpu_kernels']['cpu_capability']}, MKL" in result.output.replace("\n", " ")
    assert len(list((tmp_path / "cache" / "examples").iterdir())) == 1


def test_demo_refuses_a_foreign_workspace(tiny_workspace, tmp_path, monkeypatch):
    from rankone.errors import RankoneError

    monkeypatch.setenv("RANKONE_CACHE", str(tmp_path / "cache"))
    built = zoo.build_zoo(recipes.recipe(quick=True, tasks=["digits"], held_out=[], sizes={"pretrain": 8, "finetune": 4, "test": 4, "unlabeled": 4},
                                     pretrain={"steps": 1, "batch_size": 4, "lr": 1e-3}, finetune={"steps": 1, "lr": 1e-4, "batch_size": 2}))
    from rankone.examples.demo import Example, demo_pipeline

    before = (tiny_workspace.root / "manifest.json").read_bytes()
    with pytest.raises(RankoneError, match="not made by `rankone demo`"):
        demo_pipeline(Example("quick", built), tiny_workspace.root, "cpu", None)
    assert (tiny_workspace.root / "manifest.json").read_bytes() == before


def test_readme_walkthrough_fetches_every_example_task():
    # `rankone adapt` refuses unlabeled folders of tasks the workspace has no head for, so the
    # README's walkthrough on the example zoo must fetch an expert for every task it holds.
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    fetch = re.search(r"^rankone fetch --base \$ZOO/base(.*?)\n\n", readme, flags=re.M | re.S)
    assert fetch, "README: no `rankone fetch --base $ZOO/base` walkthrough command"
    experts = re.findall(r"--expert (\w+)=\$ZOO/experts/(\w+)", fetch.group(1))
    assert all(name == folder for name, folder in experts)
    assert sorted(name for name, _ in experts) == sorted(recipes.recipe()["tasks"])
