"""Batch inference: embeddings, cross-modal predictions and pseudocell programs, written back to the store."""
