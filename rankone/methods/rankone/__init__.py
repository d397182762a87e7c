"""RankOne-MoE: the pool, the routed module, its adaptation and its artifact, in one place."""

from rankone.methods.rankone.method import METHOD, PoolOptions, RankOneOptions, build_pool_stage

__all__ = ["METHOD", "PoolOptions", "RankOneOptions", "build_pool_stage"]
