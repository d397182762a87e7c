"""Streaming stages: task vectors read lazily give the same merges and pool as task vectors in memory, the lazy
file reads a tensor only when asked (and from the file it opened), and streamed files load back exactly."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TASKS
from rankone.errors import RankoneError
from rankone.methods import merge_task_vectors, merge_workspace, merged_state, registered
from rankone.methods.merging import merged_path
from rankone.methods.rankone.pool import build_pool, static_part
from rankone.models import visual_state
from rankone.task_vectors import compute_task_vectors, load_task_vectors, task_vector_path
from rankone.workspace import LazyTensors, load_tensors, tensor_shape, write_tensor_stream

# Few Adam steps: WUDI's result is compared with itself, not with its converged value.
OPTIONS = {"wudi": {"steps": 3}, "dare": {"drop": 0.5, "seed": 3}}


def data_offsets(path) -> tuple[int, dict]:
    """(where tensor data starts, the header) of a safetensors file, parsed here from the format's definition."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return 8 + length, json.loads(handle.read(length))


def overwrite(path, name: str, tensor: torch.Tensor) -> None:
    """Write `tensor`'s bytes over tensor `name`'s in place (same dtype and size), as a disk fault or an editor would."""
    start, header = data_offsets(path)
    begin, end = header[name]["data_offsets"]
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    assert len(data) == end - begin
    with open(path, "r+b") as handle:
        handle.seek(start + begin)
        handle.write(data)


def eager_task_vectors(workspace) -> list[dict[str, torch.Tensor]]:
    return [load_tensors(workspace.path(task_vector_path(task))) for task in workspace.tasks]


def static_methods_of_task_vectors() -> list[str]:
    return [method.name for method in registered() if method.kind == "static" and method.inputs == ("base", "task-vectors")]


@pytest.fixture
def vectors_workspace(tiny_workspace):
    compute_task_vectors(tiny_workspace)
    return tiny_workspace


# ---- the lazy file --------------------------------------------------------------------------

def test_lazy_tensors_read_each_tensor_when_asked_and_cache_nothing(tmp_path):
    path = tmp_path / "file.safetensors"
    first, second = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.ones(4)
    save_file({"first": first, "second": second}, str(path))
    lazy = LazyTensors(path)
    assert sorted(lazy) == ["first", "second"] and len(lazy) == 2
    assert tensor_shape(lazy, "first") == (2, 3) and tensor_shape(lazy, "second") == (4,)
    # Changed on disk after the mapping was made: the new bytes are what an access returns, so nothing was read before.
    overwrite(path, "second", torch.full((4,), 7.0))
    assert torch.equal(lazy["second"], torch.full((4,), 7.0))
    assert torch.equal(lazy["first"], first)
    overwrite(path, "first", -first)
    assert torch.equal(lazy["first"], -first)  # read again, not kept from the first access
    with pytest.raises(KeyError):
        lazy["third"]


def test_lazy_tensors_keep_reading_the_file_they_opened(tmp_path):
    """A stage committing a new file at the same path (os.replace) mid-merge must not mix it into a running one."""
    path = tmp_path / "file.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    lazy = LazyTensors(path)
    replacement = tmp_path / "new.safetensors"
    save_file({"weight": torch.ones(3)}, str(replacement))
    os.replace(replacement, path)
    assert torch.equal(lazy["weight"], torch.zeros(3))
    assert torch.equal(LazyTensors(path)["weight"], torch.ones(3))


def test_lazy_tensors_refuse_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(RankoneError, match="broken.safetensors: not a readable safetensors file"):
        LazyTensors(path)


def test_deleting_a_key_hides_it_and_leaves_the_file_alone(tmp_path):
    path = tmp_path / "file.safetensors"
    save_file({"a": torch.zeros(1), "b": torch.ones(1)}, str(path))
    lazy = LazyTensors(path)
    del lazy["a"]
    assert list(lazy) == ["b"] and "a" not in lazy
    assert sorted(load_file(str(path))) == ["a", "b"]


# ---- writing a tensor at a time ----------------------------------------------------------------

def test_streamed_file_loads_back_with_every_dtype_aligned(tmp_path):
    tensors = {"mask": torch.tensor([True, False, True]), "weight": torch.randn(3, 5), "half": torch.randn(7).half(),
               "index": torch.arange(3), "double": torch.randn(2).double(), "empty": torch.zeros(0), "odd": torch.ones(5, dtype=torch.bool)}
    path = tmp_path / "streamed.safetensors"
    write_tensor_stream(path, iter(tensors.items()), {"note": "kept"})
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    start, header = data_offsets(path)
    assert header["__metadata__"] == {"note": "kept"}
    for name, entry in header.items():
        if name != "__metadata__":
            assert (start + entry["data_offsets"][0]) % tensors[name].element_size() == 0, f"{name} is not aligned"


def test_a_failing_stream_leaves_no_file(vectors_workspace):
    def failing():
        yield "visual.a", torch.zeros(2)
        raise RankoneError("task vectors: lack tensor visual.b of the base image tower")

    before = sorted(path.name for path in vectors_workspace.root.rglob("*"))
    with pytest.raises(RankoneError, match="lack tensor visual.b"):
        with vectors_workspace.transaction() as staging:
            staging.save_tensor_stream("merged/broken.safetensors", failing())
    assert sorted(path.name for path in vectors_workspace.root.rglob("*")) == before


# ---- the same numbers, lazy or in memory -------------------------------------------------------

@pytest.mark.parametrize("method", static_methods_of_task_vectors())
def test_every_static_merge_is_identical_on_lazy_task_vectors(vectors_workspace, method):
    values = OPTIONS.get(method, {})
    eager = merge_task_vectors(eager_task_vectors(vectors_workspace), method, **values)
    lazy = merge_task_vectors(load_task_vectors(vectors_workspace), method, **values)
    assert set(lazy) == set(eager)
    for key, tensor in eager.items():
        assert torch.equal(lazy[key], tensor), f"{method} {key}"


@pytest.mark.parametrize("method", ["ties", "dare", "iso-c", "emr"])
def test_merge_stage_writes_the_in_memory_merge(vectors_workspace, base_state, method):
    """The stage (lazy inputs, streamed output) against θ0 + update computed from task vectors held in memory."""
    values = OPTIONS.get(method, {})
    merge_workspace(vectors_workspace, method, **values)
    written = load_tensors(vectors_workspace.path(merged_path(method)))
    eager = eager_task_vectors(vectors_workspace)
    update = merge_task_vectors(eager, method, **values)
    expected = {**merged_state(visual_state(base_state), eager, method, **values),
                **{key: value for key, value in update.items() if not key.startswith("visual.")}}
    assert set(written) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor), f"{method} {key}"


def test_dare_keeps_its_draw_order_when_streamed(vectors_workspace):
    """DARE sums task by task: one CPU stream, tasks in order, each task's tensors in sorted key order."""
    eager = eager_task_vectors(vectors_workspace)
    drop, lam, seed = 0.5, 0.3, 3
    generator = torch.Generator().manual_seed(seed)
    expected = {key: torch.zeros_like(tensor) for key, tensor in eager[0].items()}
    for vector in eager:
        for key in sorted(vector):
            kept = torch.rand(vector[key].shape, generator=generator) >= drop
            expected[key] += torch.where(kept, vector[key] / (1 - drop), torch.zeros_like(vector[key]))
    update = merge_task_vectors(load_task_vectors(vectors_workspace), "dare", lam=lam, drop=drop, seed=seed)
    for key, tensor in expected.items():
        torch.testing.assert_close(update[key], lam * tensor, rtol=0, atol=1e-7)


def test_pool_and_static_part_are_identical_on_lazy_task_vectors(vectors_workspace, base_state):
    eager, lazy = eager_task_vectors(vectors_workspace), load_task_vectors(vectors_workspace)
    for svd in ("exact", "randomized"):
        pool, kept = build_pool(eager, 4, svd, tasks=list(TASKS))
        lazy_pool, lazy_kept = build_pool(lazy, 4, svd, tasks=list(TASKS))
        assert lazy_kept == kept
        assert set(lazy_pool) == set(pool) and all(torch.equal(lazy_pool[key], pool[key]) for key in pool)
    base_visual = visual_state(base_state)
    static, lazy_static = static_part(base_visual, eager, 0.3), static_part(base_visual, lazy, 0.3)
    assert all(torch.equal(lazy_static[key], static[key]) for key in static)


def test_mismatched_shapes_are_named_from_the_headers(vectors_workspace, tmp_path):
    lazy = load_task_vectors(vectors_workspace)
    key = "visual.proj"
    other = tmp_path / "other.safetensors"
    save_file({**{name: lazy[1][name] for name in lazy[1] if name != key}, key: torch.zeros(3, 3)}, str(other))
    with pytest.raises(RankoneError, match=r"task vector 1: tensor visual.proj has shape \(3, 3\), task vector 0 has"):
        merge_task_vectors([lazy[0], LazyTensors(other)], "task-arithmetic")
