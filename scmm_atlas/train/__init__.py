"""The training layer: Ray Train workers running DDP over the loader, checkpoints, MLflow.

``run.train`` is the driver (what ``scmm-atlas train`` and ``pipelines.train`` call); ``loop`` is
what each Ray Train worker runs; ``state`` saves and restores checkpoints; ``tracking`` talks to
MLflow (rank 0 and the driver only) and ``pyfunc`` is the logged model's flavour.
"""
