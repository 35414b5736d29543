"""``scmm-atlas run | reprocess | demo``: the end-to-end pipeline, scheduled reprocessing, the demo."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the pipeline: ingest -> stats -> train + register -> infer -> report (resumable)",
                       description="Run every stage of a pipeline config that has not already run on the same "
                       "inputs; finished stages are skipped and say so.")
    p.add_argument("--config", required=True, metavar="YAML",
                   help="a pipeline config file, or the name of a shipped one (e.g. pbmc_demo; a wrong name "
                   "lists them)")
    _common(p, store_required=False)
    p.add_argument("--workdir", metavar="DIR|s3://..", help="stage records, checkpoints and the report (overrides "
                   "the config's)")
    p.add_argument("--data", metavar="DIR", help="the real-data folder that {data} in ingest inputs stands for")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun this stage even if it is recorded as done (repeatable)")

    p = sub.add_parser("reprocess", help="map cells without results for the champion model; publish (idempotent)",
                       description="Bring a store's results up to date with the registered model's champion: map "
                       "newly appended cells with the existing model, recompute all cells when the champion "
                       "changed, or retrain (warm-started) when enough cells are new. A run with nothing to do "
                       "says so and changes nothing.")
    _common(p, store_required=True)
    p.add_argument("--model", required=True, metavar="NAME", help="the MLflow registered model (its champion alias)")
    p.add_argument("--retrain-if-new-fraction", type=float, metavar="F",
                   help="retrain, warm-started from the champion, when at least this fraction of the store's "
                   "cells arrived after the champion was trained; then recompute all cells")
    p.add_argument("--storage-path", metavar="DIR|s3://..", help="Ray Train checkpoints of a retrain "
                   "(default: the champion's config)")

    p = sub.add_parser("demo", help="the pipeline on the bundled real CITE-seq data (what `make demo` runs)")
    p.add_argument("--data", metavar="DIR", help="the real datasets (default: ../shared/data beside the repo)")
    p.add_argument("--fresh", action="store_true", help="delete runs/demo first (default: resume, skipping "
                   "finished stages)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="extra training config overrides, as on `scmm-atlas train` (e.g. train.epochs=3 for a "
                   "quick look)")


def _common(p: argparse.ArgumentParser, *, store_required: bool) -> None:
    p.add_argument("--store", required=store_required, metavar="URI",
                   help="store path or s3://bucket/prefix" + ("" if store_required else " (overrides the config's)"))
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: the config's, else "
                   "$MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_pipeline_cmd(args: argparse.Namespace) -> None:
    from .pipeline.config import load_pipeline
    from .pipeline.runner import run_pipeline

    cfg = load_pipeline(args.config, store=args.store, tracking_uri=args.tracking_uri, data=args.data,
                        workdir=args.workdir)
    result = run_pipeline(cfg, ray_address=args.ray_address, force=tuple(args.force), progress=not args.no_progress)
    rec = result.published.record
    print(f"\npipeline finished: version {rec.version} of {result.trained.model_name} published in "
          f"{cfg.store} ({rec.n_cells:,} cells)" + (f"; report: {result.reported.html}" if result.reported else ""))


def run_reprocess(args: argparse.Namespace) -> None:
    from .pipeline.reprocess import reprocess

    result = reprocess(args.store, args.model, tracking=args.tracking_uri,
                       retrain_if_new_fraction=args.retrain_if_new_fraction, storage_path=args.storage_path,
                       ray_address=args.ray_address, progress=not args.no_progress)
    print(result.message)


def run_demo(args: argparse.Namespace) -> None:
    from .pipeline.demo import TITLE
    from .pipeline.demo import run_demo as demo

    result = demo(data=args.data, fresh=args.fresh, progress=not args.no_progress, overrides=tuple(args.overrides))
    print(f"\n== {TITLE} ==", *result.lines, f"demo finished in {result.wall_s:.0f} s", sep="\n")
