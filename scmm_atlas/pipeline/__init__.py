"""The pipeline layer: end-to-end runs (:mod:`.run`), scheduled reprocessing (:mod:`.reprocess`).

The top layer: it drives store, train, infer and evaluate and is imported by none of them.
"""
