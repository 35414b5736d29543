"""What each pipeline stage hands on, as records: saved in the workdir's ``pipeline.json`` (as plain
JSON, :func:`dataclasses.asdict`) and read back when a finished stage is skipped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..store.results.spec import ResultRecord


@dataclass(frozen=True)
class Ingested:
    n_new: int  # cells this run added
    n_total: int  # cells in the store after it
    modalities: dict[str, int]  # cells that have each modality


@dataclass(frozen=True)
class Selected:
    n_obs: int  # cells the statistics were computed over
    selected: dict[str, int]  # features selected per modality
    selection: str  # fingerprint of the selection (another `scmm-atlas stats` changes it)


@dataclass(frozen=True)
class Trained:
    run_id: str
    run_name: str
    model_name: str
    version: str  # the registered model version
    champion: bool
    best_val: float | None
    epochs: int
    train_s: float
    model_uri: str  # models:/NAME/VERSION


@dataclass(frozen=True)
class Published:
    record: ResultRecord  # the results index record of the published version
    cells_per_s: float

    def __post_init__(self) -> None:
        if isinstance(self.record, Mapping):  # read back from pipeline.json
            object.__setattr__(self, "record", ResultRecord.from_json(self.record))


@dataclass(frozen=True)
class Reported:
    figures: list[str]
    html: str
    numbers: dict[str, Any]
    mlflow_run: str | None = None
    tables: list[str] = field(default_factory=list)
    mlflow_url: str | None = None
