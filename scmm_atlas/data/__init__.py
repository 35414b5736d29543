"""The data layer: shuffle plans (pure, seeded, testable without Ray), sparse blocks and their wire
format, the pre-shuffled training layout, the Ray Data datasource and the per-worker loader.

Modules that Ray read workers import (plan, blocks, layout, source) import neither torch nor the
store backends; ``loader`` (torch) runs in the training process only.
"""

from .plan import BlockShufflePlan, LoadRequest

__all__ = ["BlockShufflePlan", "LoadRequest"]
