"""TIES merging: trim each τ to its largest magnitudes, elect a sign per entry, average the agreeing values."""

from __future__ import annotations

from dataclasses import dataclass

from rankone.methods.merging import MergeSteps, generalized, static_merge
from rankone.options import Options, lambda_option, option


@dataclass(frozen=True)
class TiesOptions(Options):
    lam: float = lambda_option(auto=True)
    top: float = option(0.2, "Fraction of largest-magnitude entries kept per tensor.", low=0.0, high=1.0, low_open=True)


METHOD = static_merge(
    "ties", "trim, elect signs, disjoint mean; θ0 + λ·merged", row=50, options=TiesOptions,
    merge=generalized(MergeSteps(sparsify="magnitude", sign_consensus=True, scale="lambda")),
)
