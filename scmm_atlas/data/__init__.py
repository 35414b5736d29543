"""The data layer: shuffle plans (pure, seeded, testable without Ray), sparse blocks and their compact
arrays, the pre-shuffled training layout, the feeder actors that read blocks and the per-worker loader.

Modules that feeder actors import (plan, blocks, layout, feeder) import neither torch nor the store
backends; ``loader`` (torch) runs in the training process only.
"""

from .plan import BlockShufflePlan, LoadRequest

__all__ = ["BlockShufflePlan", "LoadRequest"]
