"""Task arithmetic: θ0 + λ·Στ."""

from __future__ import annotations

from dataclasses import dataclass

from rankone.methods.merging import MergeSteps, generalized, static_merge
from rankone.options import Options, lambda_option


@dataclass(frozen=True)
class TaskArithmeticOptions(Options):
    lam: float = lambda_option(auto=True)


METHOD = static_merge(
    "task-arithmetic", "θ0 + λ·Στ", row=40, options=TaskArithmeticOptions,
    merge=generalized(MergeSteps(sparsify=None, sign_consensus=False, scale="lambda")),
)
