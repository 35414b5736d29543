"""The results API: ``scmm_atlas.results.open(uri)`` reads published embeddings, predictions and programs."""

from .infer.query import Results, open

__all__ = ["Results", "open"]
