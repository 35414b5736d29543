"""Scheduled reprocessing of a growing atlas: ``scmm-atlas reprocess --store URI --model NAME``.

Compares the store with the published results of the model's current champion version:

- the champion's results cover every cell: nothing to do (a second run is always a no-op);
- cells were appended since (a new dataset): only those are mapped with the existing model and
  added to the champion's results entry, which is republished; the rows already published and
  the programs are not rewritten;
- the champion has no results yet (it changed since the last run): all cells are recomputed;
- ``retrain_if_new_fraction=F`` and at least that fraction of the store's cells arrived after the
  champion was trained: a new version is trained, warm-started from the champion's weights, made
  champion, and all cells are recomputed with it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import yaml

from ..config import RunConfig
from ..errors import InputError
from ..infer.stage import InferConfig, infer
from ..infer.trained import TrainedModel, load_trained
from ..store import open_store
from ..store.results import index
from ..store.results.spec import ResultRecord
from ..train.driver import train
from ..train.tracking import CHAMPION, STORE_CELLS_TAG, tracking_uri

log = logging.getLogger(__name__)


@dataclass
class ReprocessResult:
    action: str  # "nothing", "extend", "recompute" or "retrain"
    message: str
    version: str
    new_cells: int
    record: ResultRecord | None = None


def _champion(client: mlflow.MlflowClient, name: str) -> Any:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        raise InputError(name, "--model", f"no registered model {name!r} with a '{CHAMPION}' alias in "
                         f"{client.tracking_uri}: train one first") from None


def _trained_on(client: mlflow.MlflowClient, version: Any) -> int:
    """The store's cell count when ``version`` was trained (its tag, else its run's layout params)."""
    if STORE_CELLS_TAG in version.tags:
        return int(version.tags[STORE_CELLS_TAG])
    params = client.get_run(version.run_id).data.params
    return int(params.get("layout.train_cells", 0)) + int(params.get("layout.val_cells", 0))


def _warm_weights(trained: TrainedModel, store_uri: str) -> dict[str, Any]:
    """The champion's weights, less a modality's encoder and decoder whose feature selection changed
    since (its tensors may have the same shapes, but their rows and columns are other features)."""
    with open_store(store_uri) as store:
        changed = [m for m, names in trained.features.items()
                   if m not in store.modalities or [str(f) for f in store.feature_names(m, "selected")] != names]
    if changed:
        log.info("warm start: the feature selection of %s changed: its encoder and decoder start fresh",
                 ", ".join(changed))
    prefixes = tuple(f"{part}.{m}." for m in changed for part in ("encoders", "decoders"))
    return {k: v for k, v in trained.state.items() if not k.startswith(prefixes)}


def _retrain(client: mlflow.MlflowClient, champion: Any, trained: TrainedModel, store_uri: str, *,
             tracking: str, storage_path: str | None, ray_address: str | None, progress: bool) -> str:
    """Train a new version with the champion's config, warm-started from its weights; returns it."""
    with tempfile.TemporaryDirectory() as d:
        path = client.download_artifacts(champion.run_id, "config.yaml", d)
        config = RunConfig.from_dict(yaml.safe_load(Path(path).read_text()), f"runs:/{champion.run_id}/config.yaml")
    if storage_path:
        config = replace(config, distributed=replace(config.distributed, storage_path=storage_path))
    result = train(config, store_uri, ray_address=ray_address, run_name=time.strftime("reprocess-%Y%m%d-%H%M%S"),
                   tracking=tracking, progress=progress, warm_start=_warm_weights(trained, store_uri),
                   make_champion=True)
    log.info("retrained: %d epochs in %.0f s, best validation loss %s; version %s is the champion", result.epochs,
             result.wall_s, f"{result.best_val:,.2f}", result.model_version)
    return str(result.model_version)


def reprocess(store_uri: str, model_name: str, *, tracking: str | None = None,
              retrain_if_new_fraction: float | None = None, infer_config: InferConfig | None = None,
              storage_path: str | None = None, ray_address: str | None = None, progress: bool = True
              ) -> ReprocessResult:
    """Bring ``store_uri``'s results for ``model_name``'s champion up to date (module doc)."""
    if retrain_if_new_fraction is not None and not 0 < retrain_if_new_fraction <= 1:
        raise InputError(str(retrain_if_new_fraction), "--retrain-if-new-fraction", "must be in (0, 1]")
    uri = tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    champion = _champion(client, model_name)
    with open_store(store_uri) as store:
        n, published = store.n_obs, index(store)
    if infer_config is None and published:  # recomputed results keep the published pairs and library size
        last = published[-1]
        infer_config = InferConfig(pairs=last.pairs, library_size=last.library_size)
    model_uri = f"models:/{model_name}/{champion.version}"
    trained_on = _trained_on(client, champion)
    new = max(0, n - trained_on)
    if retrain_if_new_fraction is not None and n and new / n >= retrain_if_new_fraction:
        log.info("%s of %s cells (%s) arrived after version %s was trained (>= %s): retraining, warm-started "
                 "from it", f"{new:,}", f"{n:,}", f"{new / n:.0%}", champion.version, f"{retrain_if_new_fraction:.0%}")
        trained = load_trained(model_uri, tracking=uri)
        version = _retrain(client, champion, trained, store_uri, tracking=uri, storage_path=storage_path,
                           ray_address=ray_address, progress=progress)
        result = infer(store_uri, load_trained(f"models:/{model_name}/{version}", tracking=uri), config=infer_config,
                       ray_address=ray_address, progress=progress)
        return ReprocessResult("retrain", f"retrained version {version} and computed all {result.cells:,} cells",
                               version, result.cells, result.record)
    record = next((r for r in published if r.version == str(champion.version)), None)
    if record is not None and record.n_cells == n:
        return ReprocessResult("nothing", f"nothing to do: version {champion.version} (champion) has results for "
                               f"all {n:,} cells", str(champion.version), 0, record)
    trained = load_trained(model_uri, tracking=uri)
    if record is None:
        before = ", ".join(r.version for r in published) or "none"
        log.info("champion version %s has no results (published: %s): computing all %s cells", champion.version,
                 before, f"{n:,}")
        result = infer(store_uri, trained, config=infer_config, ray_address=ray_address, progress=progress)
        return ReprocessResult("recompute", f"computed all {result.cells:,} cells with version {champion.version}",
                               str(champion.version), result.cells, result.record)
    log.info("%s cells appended since version %s was published: mapping them", f"{n - record.n_cells:,}",
             champion.version)
    result = infer(store_uri, trained, config=infer_config, ray_address=ray_address, progress=progress,
                   extend_record=record)
    return ReprocessResult("extend", f"mapped {result.cells:,} new cells with version {champion.version}; its "
                           f"results now cover {result.record.n_cells:,} cells", str(champion.version),
                           result.cells, result.record)
