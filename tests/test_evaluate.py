"""Evaluation against predictions computed independently, the report, the method table."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import TASKS
from rankone.data import labeled_images
from rankone.errors import RankoneError
from rankone.evaluate import evaluate, evaluation_inputs, write_report
from rankone.heads import head_for_task
from rankone.methods import merge_workspace
from rankone.methods import MethodModel, load_method, names, registered
from rankone.models import count_parameters, load_clip, preprocess_for, visual_state
from rankone.task_vectors import compute_task_vectors


def hand_count(model, head, images, architecture) -> tuple[int, float]:
    """Correct predictions and the mean cross-entropy (in float64, from the log-softmax by hand) through
    open_clip's own encode_image, all images in one batch."""
    transform = preprocess_for(architecture)
    pixels = torch.stack([transform(Image.open(path).convert("RGB")) for path in images.paths])
    with torch.no_grad():
        embeddings = model.encode_image(pixels, normalize=True)
    logits = (embeddings @ head.T).double()
    predictions = logits.argmax(dim=-1).tolist()
    log_probabilities = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    loss = -sum(float(log_probabilities[index, label]) for index, label in enumerate(images.labels)) / len(images.labels)
    return sum(int(prediction == label) for prediction, label in zip(predictions, images.labels)), loss


def test_accuracy_against_hand_count(tiny_workspace, labeled_data, tiny_architecture, base_state, expert_states):
    tasks = list(TASKS)
    heads, datasets = evaluation_inputs(tiny_workspace, tasks, labeled_data)
    for method, states in (("pretrained", {task: base_state for task in tasks}), ("individual", expert_states)):
        report = evaluate(load_method(tiny_workspace, method), heads, datasets, batch_size=5, progress=False)
        assert list(report) == ["method", "tasks", "average", "parameters", "dtype"] and report["dtype"] == "fp32"
        assert report["method"] == method
        for task in tasks:
            model = load_clip(tiny_architecture, {**base_state, **states[task]})
            correct, loss = hand_count(model, heads[task], datasets[task], tiny_architecture)
            n = len(datasets[task].paths)
            assert report["tasks"][task] == {"accuracy": pytest.approx(100.0 * correct / n), "n": n, "loss": pytest.approx(loss, rel=1e-5)}
            assert isinstance(report["tasks"][task]["accuracy"], float)
        assert report["average"] == pytest.approx(sum(report["tasks"][t]["accuracy"] for t in tasks) / len(tasks))
    tower = count_parameters(visual_state(base_state))
    assert load_method(tiny_workspace, "pretrained").parameters == tower
    assert load_method(tiny_workspace, "individual").parameters == len(tasks) * tower


def test_class_mean_head(tiny_workspace, labeled_data, tiny_architecture, base_state):
    """A head that is not a text head: each class's mean image embedding."""
    images = labeled_images(labeled_data, "alpha")
    model = load_clip(tiny_architecture, base_state)
    transform = preprocess_for(tiny_architecture)
    pixels = torch.stack([transform(Image.open(path).convert("RGB")) for path in images.paths])
    with torch.no_grad():
        embeddings = model.encode_image(pixels, normalize=True)
    labels = torch.tensor(images.labels)
    head = torch.stack([embeddings[labels == c].mean(0) for c in range(len(images.classnames))])
    head = head / head.norm(dim=-1, keepdim=True)
    expected, _ = hand_count(model, head, images, tiny_architecture)
    report = evaluate(load_method(tiny_workspace, "pretrained"), {"alpha": head}, {"alpha": images}, batch_size=3, progress=False)
    assert report["tasks"]["alpha"]["accuracy"] == pytest.approx(100.0 * expected / len(images.paths))


def test_report_written_through_workspace(tiny_workspace, labeled_data):
    heads, datasets = evaluation_inputs(tiny_workspace, ["gamma"], labeled_data)
    report = evaluate(load_method(tiny_workspace, "pretrained"), heads, datasets, progress=False)
    relpath = write_report(tiny_workspace, report)
    assert relpath == "eval/pretrained.json"
    assert tiny_workspace.read_json(relpath) == json.loads(json.dumps(report))


def test_static_merge_method(tiny_workspace, labeled_data):
    with pytest.raises(RankoneError, match=r"merged/ties.safetensors: missing; run `rankone merge --method ties` first"):
        load_method(tiny_workspace, "ties")
    compute_task_vectors(tiny_workspace)
    merge_workspace(tiny_workspace, "ties")
    method_model = load_method(tiny_workspace, "ties")
    assert method_model.name == "ties"
    merged = tiny_workspace.load_tensors("merged/ties.safetensors")
    encoder = method_model.encoder_for_task("alpha")
    assert torch.equal(encoder.state_dict()["proj"], merged["visual.proj"])
    assert method_model.parameters == count_parameters(merged)


def test_method_table():
    assert {"pretrained", "individual", "weight-averaging", "task-arithmetic", "ties", "dare"} <= set(names())
    assert all(callable(method.load) for method in registered())


def test_errors(tiny_workspace, labeled_data):
    with pytest.raises(RankoneError, match=r"--method 'magic': unknown; choose from pretrained, individual"):
        load_method(tiny_workspace, "magic")
    with pytest.raises(RankoneError, match="unknown task 'delta'; the workspace has alpha, beta, gamma"):
        evaluation_inputs(tiny_workspace, ["delta"], labeled_data)
    with pytest.raises(RankoneError, match="--heads-source 'web'"):
        evaluation_inputs(tiny_workspace, ["alpha"], labeled_data, heads_source="web")
    images = labeled_images(labeled_data, "beta")
    head = head_for_task(tiny_workspace, "beta", ["only", "two"])
    with pytest.raises(RankoneError, match="task 'beta'.*2 classes, the data has 3"):
        evaluate(load_method(tiny_workspace, "pretrained"), {"beta": head}, {"beta": images}, progress=False)
    model = MethodModel(encoder_for_task=lambda task: None, parameters=0, name="bare")
    with pytest.raises(RankoneError, match="preprocessing"):
        evaluate(model, {"beta": head}, {"beta": images}, progress=False)


# bf16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 0.2% per operation), fp16 keeps 11;
# through the tiny tower's ~10 matmuls and LayerNorms the embedding direction moves by well
# under 1%, and logits are at most 100·cos, so they move by under 1 (bf16) or 0.2 (fp16) logit.
# Measured on this fixture: at most 0.28 (bf16) and 0.04 (fp16), fp32 top-2 margins ≥ 0.24.
HALF_LOGIT_TOLERANCE = {"bf16": 1.0, "fp16": 0.2}


@pytest.mark.parametrize("method", ["pretrained", "individual", "task-arithmetic", "rankone", "adamerging", "wemoe"])
def test_half_precision_logits_match_fp32(every_stage_workspace, labeled_data, method):
    from rankone.data import ImageDataset
    from rankone.heads import classify_logits

    heads, datasets = evaluation_inputs(every_stage_workspace, list(TASKS), labeled_data)
    full = load_method(every_stage_workspace, method, "cpu")
    for dtype, tolerance in HALF_LOGIT_TOLERANCE.items():
        half = load_method(every_stage_workspace, method, "cpu", dtype)
        assert half.dtype == dtype and half.parameters == full.parameters
        for task, images in datasets.items():
            dataset = ImageDataset(images.paths, images.labels, full.preprocess)
            pixels = torch.stack([dataset[index][0] for index in range(len(dataset))])
            with torch.no_grad():
                expected = classify_logits(full.encoder_for_task(task)(pixels), heads[task])
                embeddings = half.encoder_for_task(task)(pixels)
                logits = classify_logits(embeddings, heads[task])
            assert embeddings.dtype == torch.float32
            # Not identical: the encoder really ran in half precision.
            assert 0 < (logits - expected).abs().max() < tolerance, (task, dtype)
            assert torch.equal(logits.argmax(-1), expected.argmax(-1)), (task, dtype)


def test_eval_cli_dtype(every_stage_workspace, labeled_data, rankone_cli):
    work = every_stage_workspace
    code, _, err = rankone_cli("eval", "-w", work.root, "--method", "rankone", "--data", labeled_data)
    assert code == 0, err
    full = work.read_json("eval/rankone.json")
    code, stdout, err = rankone_cli("eval", "-w", work.root, "--method", "rankone", "--data", labeled_data, "--dtype", "bf16")
    assert code == 0, err
    half = work.read_json("eval/rankone.json")
    assert "(bf16)" in stdout and half["dtype"] == "bf16" and full["dtype"] == "fp32"
    # Same predictions in bf16 here; the loss moves by bf16's rounding only.
    assert {task: (entry["accuracy"], entry["n"]) for task, entry in half["tasks"].items()} == \
        {task: (entry["accuracy"], entry["n"]) for task, entry in full["tasks"].items()}
    assert all(half["tasks"][task]["loss"] == pytest.approx(full["tasks"][task]["loss"], rel=1e-2) for task in full["tasks"])
    assert half["parameters"] == full["parameters"]
    before = (work.root / "manifest.json").read_bytes()
    code, _, err = rankone_cli("eval", "-w", work.root, "--method", "rankone", "--data", labeled_data, "--dtype", "fp8")
    assert code == 2 and err.count("\n") == 1 and "--dtype 'fp8': expected one of fp32, fp16, bf16" in err
    assert (work.root / "manifest.json").read_bytes() == before and work.read_json("eval/rankone.json") == half


def test_eval_routing_reports_gate_shares_that_match_the_router_weights(every_stage_workspace, labeled_data, rankone_cli):
    import numpy as np

    from conftest import reference_gates
    from rankone.methods.rankone.artifact import routed_from_workspace
    from rankone.data import ImageDataset
    from rankone.methods.rankone.module import rankone_mlps

    work = every_stage_workspace
    code, stdout, err = rankone_cli("eval", "-w", work.root, "--method", "rankone", "--data", labeled_data, "--routing")
    assert code == 0, err
    routing = work.read_json("eval/rankone.json")["routing"]
    assert routing["experts"] == work.tasks and list(routing["gates"]) == work.tasks
    assert "averaged over 2 blocks" in stdout

    # Independently: capture each block's MLP input, apply the router weights and the method's top-p in numpy.
    model, settings = routed_from_workspace(work)
    mlps = rankone_mlps(model)
    inputs: list[list[torch.Tensor]] = [[] for _ in mlps]
    handles = [mlp.register_forward_pre_hook(lambda module, args, store=store: store.append(args[0].detach()))
               for mlp, store in zip(mlps, inputs)]
    task_count, experts = len(work.tasks), mlps[0].router.out_features
    k = experts // task_count
    for task in work.tasks:
        for store in inputs:
            store.clear()
        images = labeled_images(labeled_data, task)
        dataset = ImageDataset(images.paths, images.labels, preprocess_for(work.architecture))
        with torch.no_grad():
            model(torch.stack([dataset[index][0] for index in range(len(dataset))]))
        for block, (mlp, store) in enumerate(zip(mlps, inputs)):
            gated = reference_gates(mlp, store[0].double().numpy(), settings["select"], settings["routing"])
            expected = [gated[:, t * k : (t + 1) * k].mean() for t in range(task_count)]
            np.testing.assert_allclose(routing["gates"][task][block], expected, rtol=1e-4, atol=1e-6)
    for handle in handles:
        handle.remove()

    before = (work.root / "manifest.json").read_bytes()
    code, _, err = rankone_cli("eval", "-w", work.root, "--method", "ties", "--data", labeled_data, "--routing")
    assert code == 2 and err.count("\n") == 1 and "--routing: --method ties has no routers" in err
    assert (work.root / "manifest.json").read_bytes() == before
