"""The data layer: shuffle plans (pure, seeded, testable without Ray). The Ray Data datasource and
the per-worker iterator come with the loader issue."""

from .plan import BlockShufflePlan, LoadRequest

__all__ = ["BlockShufflePlan", "LoadRequest"]
