"""Weight averaging: mean θt = θ0 + (1/T)·Στ, no options."""

from __future__ import annotations

from rankone.methods.merging import MergeSteps, generalized, static_merge
from rankone.options import NoOptions

METHOD = static_merge(
    "weight-averaging", "mean of the experts' weights", row=30, options=NoOptions,
    merge=generalized(MergeSteps(sparsify=None, sign_consensus=False, scale="mean")),
)
