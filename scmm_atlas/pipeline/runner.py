"""The end-to-end pipeline: ingest (optional) -> feature statistics -> train + register -> infer -> report.

``scmm-atlas run --config FILE`` and ``python -m pipelines.run`` (the ``ray job submit`` entry point)
call :func:`run_pipeline`. Every stage is resumable (:mod:`.stages`): run it again and finished
stages are skipped; a training run that died is resumed from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..ingest.input_files import SourceSpec
from ..store import open_store, store_exists
from ..store.results.spec import ResultRecord
from .config import PipelineConfig
from .outputs import Ingested, Published, Reported, Selected, Trained
from .stages import StageRecords, fingerprint

STAGES = ("ingest", "stats", "train", "infer", "report")
log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """Each stage's outputs (the recorded ones where a stage was skipped)."""

    store: str
    tracking_uri: str
    workdir: str
    ingested: Ingested | None  # None: the config has no ingest section
    selected: Selected
    trained: Trained
    published: Published
    reported: Reported | None  # None: the report is off
    ran: tuple[str, ...] = ()  # the stages that ran this time; the others were skipped (already done)


def _file_id(spec: str) -> dict[str, Any]:
    """An input's identity for the fingerprint: its path, size and modification time."""
    path = SourceSpec.parse(spec).path
    try:
        st = path.stat()
    except OSError:
        raise InputError(path, "ingest.inputs", "no such file") from None
    return {"spec": spec, "path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _n_obs(uri: str) -> int:
    with open_store(uri) as store:
        return store.n_obs


def _ingest(cfg: PipelineConfig, records: StageRecords, progress: bool, force: bool) -> Ingested:
    from ..ingest.write import IngestOptions, ingest

    ing = cfg.ingest
    assert ing is not None

    def work() -> Ingested:
        if store_exists(cfg.store) and not ing.append:
            raise InputError(cfg.store, "store", "exists, and this pipeline did not ingest it: remove it, drop "
                             "the ingest section, or set ingest.append: true")
        opts = IngestOptions(append=ing.append, dataset=ing.dataset, batch_key=ing.batch_key, label_key=ing.label_key,
                             modalities=ing.modalities, prefix_barcodes=ing.prefix_barcodes, stats=False,
                             progress=progress)
        report = ingest(cfg.store, ing.inputs, opts)
        log.info("  %s cells ingested (%s)", f"{report.n_new:,}",
                 ", ".join(f"{m} {n:,}" for m, n in report.modalities.items()))
        return Ingested(n_new=report.n_new, n_total=report.n_total, modalities=report.modalities)

    inputs = {"store": cfg.store, "inputs": [_file_id(i) for i in ing.inputs], "options": asdict(ing)}
    return records.run("ingest", inputs, work, lambda out: store_exists(cfg.store) and
                       _n_obs(cfg.store) >= out.n_total, kind=Ingested, force=force)


def _stats(cfg: PipelineConfig, records: StageRecords, progress: bool, force: bool) -> Selected:
    from ..data.prepare import selection_fingerprint
    from ..ingest.stats import compute_stats

    def work() -> Selected:
        with open_store(cfg.store, writable=True) as store:
            compute_stats(store, n_top_genes=cfg.stats.n_top_genes, atac_quantile=cfg.stats.atac_quantile,
                          progress=progress)
            selected = {m: int(sel["n_selected"]) for m, sel in store.info.selection.items()}
        with open_store(cfg.store) as store:  # reopened: the writer's cached var predates the selection
            chosen = selection_fingerprint(store)
        log.info("  selected: %s", ", ".join(f"{m} {n:,}" for m, n in selected.items()))
        return Selected(n_obs=n_obs, selected=selected, selection=chosen)

    with open_store(cfg.store) as store:
        n_obs = store.n_obs

    def still_there(out: Selected) -> bool:  # and not replaced since by another `scmm-atlas stats`
        with open_store(cfg.store) as store:
            return (store.info.stats_n_obs == out.n_obs and bool(store.info.selection)
                    and selection_fingerprint(store) == out.selection)

    return records.run("stats", {"store": cfg.store, "n_obs": n_obs, **asdict(cfg.stats)}, work, still_there,
                       kind=Selected, force=force)


def _registered_version(uri: str, model_name: str, run_id: str | None, run_name: str) -> Trained | None:
    """The train stage's outputs for a run that already registered a version of ``model_name``."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = [v for v in (client.search_model_versions(f"run_id='{run_id}'") if run_id else [])
             if v.name == model_name]
    if not found:
        return None
    run = client.get_run(run_id)
    best = [m.value for m in client.get_metric_history(run_id, "best_val_loss")]
    epochs = len(client.get_metric_history(run_id, "train_loss"))
    return Trained(run_id=run_id, run_name=run_name, model_name=model_name, version=str(found[0].version),
                   champion=False, best_val=best[-1] if best else None, epochs=epochs,
                   train_s=round(((run.info.end_time or run.info.start_time) - run.info.start_time) / 1e3, 1),
                   model_uri=f"models:/{model_name}/{found[0].version}")


def _train(cfg: PipelineConfig, records: StageRecords, tracking: str, ray_address: str | None, progress: bool,
           force: bool) -> Trained:
    import mlflow

    from ..config import load_config
    from ..data.prepare import selection_fingerprint
    from ..train.driver import RUN_FILE, RunDir, train

    overrides = [f"distributed.storage_path={cfg.workdir.rstrip('/')}/ray", *cfg.train.overrides]
    if cfg.train.num_workers is not None:
        overrides.append(f"distributed.num_workers={cfg.train.num_workers}")
    if cfg.train.use_gpu:
        overrides.append("distributed.use_gpu=true")
    config = load_config(cfg.train.config, overrides)
    with open_store(cfg.store) as store:
        inputs = {"store": cfg.store, "n_obs": store.n_obs, "selection": selection_fingerprint(store),
                  "config": config.to_dict(), "tracking_uri": tracking}
    name = f"pipeline-{fingerprint(inputs)[:10]}"
    dist = config.distributed

    def work() -> Trained:
        run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}" if force else name  # forced: a fresh run
        recorded = RunDir(dist.storage_path, run_name).read(RUN_FILE)
        if recorded is not None:
            done = _registered_version(tracking, dist.model_name, json.loads(recorded).get("run_id"), run_name)
            if done is not None:  # trained and registered, then stopped before the record was saved
                log.info("  training run %s already registered %s version %s", run_name, dist.model_name,
                         done.version)
                return done
            log.info("  resuming training run %s from its last checkpoint", run_name)
        resume = recorded is not None
        result = train(config, cfg.store, ray_address=ray_address, resume=resume, run_name=run_name,
                       tracking=tracking, progress=progress)
        log.info("  %d epochs in %.0f s, best validation loss %s; registered %s version %s%s", result.epochs,
                 result.wall_s, f"{result.best_val:,.2f}", dist.model_name, result.model_version,
                 " (champion)" * result.champion)
        return Trained(run_id=result.run_id, run_name=run_name, model_name=dist.model_name,
                       version=result.model_version, champion=result.champion, best_val=result.best_val,
                       epochs=result.epochs, train_s=round(result.wall_s, 1),
                       model_uri=f"models:/{dist.model_name}/{result.model_version}")

    def still_there(out: Trained) -> bool:
        try:
            found = mlflow.MlflowClient(tracking).get_model_version(out.model_name, out.version)
        except mlflow.exceptions.MlflowException:
            return False
        return found.run_id == out.run_id

    return records.run("train", inputs, work, still_there, kind=Trained, force=force)


def _check_pairs(cfg: PipelineConfig) -> None:
    from ..infer.predict import check_pairs

    with open_store(cfg.store) as store:
        try:
            check_pairs(cfg.infer.pair_tuples() or [], store.modalities)
        except ValueError as exc:
            raise InputError(cfg.source, "infer.pairs", str(exc)) from None


def _infer(cfg: PipelineConfig, records: StageRecords, model: Trained, tracking: str, ray_address: str | None,
           progress: bool, force: bool) -> Published:
    from ..infer.stage import infer
    from ..infer.trained import load_trained
    from ..store.results import index

    sec = cfg.infer
    infer_cfg = sec.build()

    def work() -> Published:
        trained = load_trained(model.model_uri, tracking=tracking)
        result = infer(cfg.store, trained, config=infer_cfg, ray_address=ray_address, progress=progress)
        rec = result.record
        log.info("  published version %s (%s): %s cells at %s cells/s; programs in %.1f s", rec.version,
                 rec.entry, f"{result.cells:,}", f"{result.cells_per_s:,.0f}", result.programs_s)
        return Published(record=rec, cells_per_s=round(result.cells_per_s, 1))

    def still_there(out: Published) -> bool:
        with open_store(cfg.store) as store:
            return any(r.entry == out.record.entry for r in index(store))

    inputs = {"store": cfg.store, "n_obs": _n_obs(cfg.store), "model_uri": model.model_uri,
              "run_id": model.run_id, "infer": asdict(sec)}
    return records.run("infer", inputs, work, still_there, kind=Published, force=force)


def _report(cfg: PipelineConfig, records: StageRecords, published: ResultRecord, tracking: str,
            force: bool) -> Reported:
    from ..evaluate.report import report

    out_dir = cfg.report_dir

    def work() -> Reported:
        done = Reported(**report(cfg.store, out_dir, version=published.version, max_cells=cfg.report.max_cells,
                                 tracking=tracking))
        log.info("  %d figures and %s", len(done.figures), done.html)
        return done

    inputs = {"entry": published.entry, "n_cells": published.n_cells, "out": str(Path(out_dir).resolve()),
              "max_cells": cfg.report.max_cells}
    return records.run("report", inputs, work, lambda out: Path(out.html).exists(), kind=Reported, force=force)


def run_pipeline(cfg: PipelineConfig, *, ray_address: str | None = None, force: tuple[str, ...] = (),
                 progress: bool = True) -> PipelineResult:
    """Run every stage of ``cfg`` that has not already run on the same inputs; ``force`` reruns
    the named stages (and, through the fingerprints, whatever their new outputs feed)."""
    from ..train.tracking import tracking_uri

    unknown = set(force) - set(STAGES)
    if unknown:
        raise InputError("--force", sorted(unknown)[0], f"no such stage (stages: {', '.join(STAGES)})")
    tracking = tracking_uri(cfg.tracking_uri)
    records = StageRecords(cfg.workdir)
    ingested = None
    if cfg.ingest is not None:
        ingested = _ingest(cfg, records, progress, "ingest" in force)
    elif not store_exists(cfg.store):
        raise InputError(cfg.store, "store", "no store here, and the config has no ingest section")
    selected = _stats(cfg, records, progress, "stats" in force)
    _check_pairs(cfg)  # before training, not after it
    trained = _train(cfg, records, tracking, ray_address, progress, "train" in force)
    published = _infer(cfg, records, trained, tracking, ray_address, progress, "infer" in force)
    reported = (_report(cfg, records, published.record, tracking, "report" in force) if cfg.report.enabled
                else None)
    return PipelineResult(store=cfg.store, tracking_uri=tracking, workdir=cfg.workdir, ingested=ingested,
                          selected=selected, trained=trained, published=published, reported=reported,
                          ran=tuple(records.ran))
