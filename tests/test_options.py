"""Options declared once: every number is checked (finite, in range) before any file is read or written."""

from __future__ import annotations

import pytest

from conftest import snapshot
from rankone.methods import method_options
from rankone.methods.rankone import PoolOptions
from rankone.errors import RankoneError
from rankone.options import DEFAULT_LAMBDA


@pytest.mark.parametrize("args, message", [
    (["build-pool", "--lambda", "nan"], "--lambda nan: must be a finite number"),
    (["build-pool", "--k", "0"], "--k 0: must be at least 1"),
    (["build-pool", "--svd", "approximate"], "--svd 'approximate': expected one of exact, randomized"),
    (["merge", "--method", "dare", "--drop", "1"], "--drop 1.0: must be in [0, 1)"),
    (["merge", "--method", "ties", "--lambda", "inf"], "--lambda inf: must be a finite number"),
    (["merge", "--method", "ties", "--top", "0"], "--top 0.0: must be in (0, 1]"),
    (["adapt", "--data", "DATA", "--steps", "-1"], "--steps -1: must be at least 0"),
    (["adapt", "--data", "DATA", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["adapt", "--data", "DATA", "--lr", "0"], "--lr 0.0: must be greater than 0"),
    (["adapt", "--data", "DATA", "--lr", "nan"], "--lr nan: must be a finite number"),
    (["adapt", "--data", "DATA", "--save-every", "-1"], "--save-every -1: must be at least 0"),
    (["adapt", "--data", "DATA", "--workers", "-1"], "--workers -1: must be at least 0"),
    (["adapt", "--data", "DATA", "--method", "adamerging", "--select", "0.5"], "--select: not used by --method adamerging"),
    (["eval", "--method", "pretrained", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["export", "--out", "OUT", "--method", "individual"], "--method individual: yields no single model to export"),
])
def test_bad_options_are_one_line_and_change_nothing(tiny_workspace, unlabeled_data, tmp_path, rankone_cli, args, message):
    args = [str(unlabeled_data) if arg == "DATA" else str(tmp_path / "out") if arg == "OUT" else arg for arg in args]
    before = snapshot(tiny_workspace)
    code, _, err = rankone_cli(*args, "-w", tiny_workspace.root)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert snapshot(tiny_workspace) == before and not (tmp_path / "out").exists()


def test_the_library_checks_the_same_way():
    with pytest.raises(RankoneError, match=r"^--k 0: must be at least 1$"):
        PoolOptions(k=0)
    with pytest.raises(RankoneError, match=r"^--lambda inf: must be a finite number$"):
        method_options("task-arithmetic", lam=float("inf"))
    assert PoolOptions(k=4).lam == DEFAULT_LAMBDA and PoolOptions(k=4, lam=1).lam == 1.0  # an int λ is read as a float
