"""The errors every layer raises for bad input: one line that names the file (or URI) and the field."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (a source file or a store URI). ``str(err)`` is the one-line message."""

    def __init__(self, where: str, field: str, problem: str) -> None:
        self.where, self.field, self.problem = str(where), field, problem
        super().__init__(f"{self.where}: {field}: {problem}")


class StoreError(InputError):
    """A store URI that cannot be used as asked (missing, not a store, already exists, ...)."""


class ClusterError(InputError):
    """A cluster that cannot run what was asked (too few hosts for the workers, say): ``where`` is the cluster."""
