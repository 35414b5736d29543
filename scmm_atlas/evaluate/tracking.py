"""The MLflow run a report is logged to: found from the published model's URI before the page is
written (the page links to it), then given the report's files under ``report/``."""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..store.results.spec import ResultRecord

log = logging.getLogger(__name__)


@dataclass
class MlflowRun:
    """The MLflow run a published model came from, where the report's files are logged."""

    client: Any
    run_id: str
    experiment_id: str
    tracking_uri: str

    def links(self) -> tuple[str | None, str | None]:
        """The run's page, and for a store without a server the command that serves it: a local
        (SQLite or file) store is read by ``mlflow ui``, which listens on 127.0.0.1:5000."""
        path = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"{self.tracking_uri.rstrip('/')}/{path}", None
        local = re.match(r"^(sqlite|file):|^[^:]*$", self.tracking_uri)  # a plain path is a file store
        if local and not self.tracking_uri.startswith("databricks"):
            return f"http://127.0.0.1:5000/{path}", f"mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)}"
        return None, None  # e.g. databricks: the run id is all we can say


def find_run(record: ResultRecord, tracking: str | None) -> MlflowRun | None:
    """The run of ``record``'s model (``runs:/`` or ``models:/``), found before the page is written
    so that the page can link to it; None for a model folder or a run MLflow does not know."""
    uri = record.model_uri
    if not uri.startswith(("models:/", "runs:/")):
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking)
    try:
        if uri.startswith("runs:/"):
            run_id = uri.split("/")[1]
        else:
            name = uri[len("models:/"):].split("@")[0].split("/")[0]
            run_id = client.get_model_version(name, record.version).run_id
        experiment = client.get_run(run_id).info.experiment_id
    except mlflow.exceptions.MlflowException as exc:
        log.warning("report not logged to MLflow (%s)", str(exc).splitlines()[0])
        return None
    return MlflowRun(client, run_id, str(experiment), str(client.tracking_uri))


def log_artifacts(run: MlflowRun, paths: list[Path]) -> bool:
    """Log ``paths`` under ``report/`` in ``run``; False (with a warning) when MLflow refuses: the
    report still stands on disk, and the page must then not link to the run."""
    import mlflow

    try:
        for p in paths:
            run.client.log_artifact(run.run_id, str(p), artifact_path="report")
    except mlflow.exceptions.MlflowException as exc:
        log.warning("report not logged to MLflow (%s)", str(exc).splitlines()[0])
        return False
    return True
