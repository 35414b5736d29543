"""The data layer: shuffle plans (pure, seeded, testable without Ray), sparse blocks, the shuffle
buffer and dense minibatches. The Ray Data datasource is still to come (loader issue)."""

from .plan import BlockShufflePlan, LoadRequest

__all__ = ["BlockShufflePlan", "LoadRequest"]
