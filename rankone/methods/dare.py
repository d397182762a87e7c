"""DARE: drop each entry of every τ at random and rescale the rest, then task arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

from rankone.methods.merging import MergeSteps, generalized, static_merge
from rankone.options import Options, lambda_option, option, seed_option


@dataclass(frozen=True)
class DareOptions(Options):
    lam: float = lambda_option(auto=True)
    drop: float = option(0.9, "Probability of dropping each entry.", low=0.0, high=1.0, high_open=True)
    seed: int = seed_option("Seed of the random drops.")


METHOD = static_merge(
    "dare", "random drop with rescale, then task arithmetic", row=60, options=DareOptions,
    merge=generalized(MergeSteps(sparsify="random", sign_consensus=False, scale="lambda")),
)
