"""``scmm-atlas infer``, ``query`` and ``report``: making published results and reading them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from .errors import InputError

FORMATS = (".csv", ".parquet", ".h5ad")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="embeddings, cross-modal predictions and programs, published into the store")
    p.add_argument("--store", required=True, metavar="URI", help="store path or s3://bucket/prefix")
    p.add_argument("--model", required=True, metavar="URI",
                   help="models:/NAME@champion, models:/NAME/VERSION, runs:/ID/model or a model folder")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///runs/mlflow.db)")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    p.add_argument("--pairs", metavar="S:T,...", help="predictions to write, e.g. RNA:ADT,ATAC:RNA "
                   "(default: every modality from every other, into targets of <= 1,000 features)")
    p.add_argument("--library-size", default="1e4", metavar="N|model",
                   help="predictions per N counts (default 1e4); 'model': the model's library scale")
    p.add_argument("--traversal", choices=("atlas", "faithful"), default="atlas", help="program traversal")
    p.add_argument("--top-n", type=int, default=50, help="features per program direction (default 50)")
    p.add_argument("--genome", metavar="FASTA", help="the ATAC peaks' genome (e.g. mm10.fa): JASPAR motifs "
                   "enriched in each ATAC program, against GC-matched peaks (query programs --motifs)")
    p.add_argument("--actors", type=int, default=0, help="inference actors (default: one per CPU, at most 4)")
    p.add_argument("--version", metavar="LABEL", help="publish under this label instead of the model's version")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("report", help="figures (UMAP, programs, observed vs predicted) and an HTML page")
    p.add_argument("--store", required=True, metavar="URI")
    p.add_argument("--out", default="runs/report", metavar="DIR", help="where the PNGs and index.html go")
    p.add_argument("--version", metavar="V", help="a published version (default: the latest)")
    p.add_argument("--max-cells", type=int, default=20_000, help="cells drawn for the figures (default 20,000)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI for logging the figures")

    p = sub.add_parser("query", help="read published results for a cell filter or a latent dim")
    p.add_argument("what", choices=("embeddings", "predictions", "programs", "markers", "versions"))
    p.add_argument("--store", required=True, metavar="URI")
    p.add_argument("--version", metavar="V", help="a published version (default: the latest)")
    p.add_argument("--where", action="append", default=[], metavar="COL=V1,V2",
                   help="keep cells whose obs column takes one of these values (repeatable)")
    p.add_argument("--ids", metavar="ID,...", help="keep these cell ids")
    p.add_argument("--key", default="joint", help="embeddings: 'joint' or a modality (default: joint)")
    p.add_argument("--dim", type=int, help="embeddings / programs: one latent dim")
    p.add_argument("--target", help="predictions: the predicted modality, e.g. ADT")
    p.add_argument("--source", help="predictions: predicted from this modality (default: the first published)")
    p.add_argument("--features", metavar="F,...", help="predictions: only these features")
    p.add_argument("--modality", help="programs: one modality")
    p.add_argument("--direction", choices=("up", "down"), help="programs: one direction")
    p.add_argument("--motifs", action="store_true",
                   help="programs: the JASPAR motifs enriched in the ATAC programs (infer --genome) instead")
    p.add_argument("--resolution", type=float, default=1.0, help="markers: Leiden resolution of the clusters")
    p.add_argument("--sub-resolution", type=float, default=0.3,
                   help="markers: Leiden resolution of the sub-clusters inside each label (default 0.3)")
    p.add_argument("--label-key", default="cell_type", help="markers: the obs column whose labels are sub-clustered")
    p.add_argument("--top", type=int, default=10, help="markers: features per group and modality (default 10)")
    p.add_argument("--max-cells", type=int, default=20_000, help="markers: cells drawn (default 20,000)")
    p.add_argument("--out", metavar="FILE", help=f"write {'/'.join(FORMATS)} instead of printing a table")
    p.add_argument("--limit", type=int, default=20, help="rows printed in the terminal (default 20)")


def _where(items: list[str]) -> dict[str, list[str]]:
    out = {}
    for item in items:
        col, sep, values = item.partition("=")
        if not sep or not col:
            raise InputError(item, "--where", "expected COL=V1,V2")
        out[col] = values.split(",")
    return out


def run_infer(args: argparse.Namespace) -> None:
    from .infer.stage import InferConfig, infer
    from .infer.trained import load_trained
    from .train.tracking import tracking_uri

    pairs = None
    if args.pairs:
        pairs = tuple(tuple(p.split(":", 1)) for p in args.pairs.split(","))
        if any(len(p) != 2 for p in pairs):
            raise InputError(args.pairs, "--pairs", "expected SOURCE:TARGET,...")
    library = None if args.library_size == "model" else float(args.library_size)
    tracking = tracking_uri(args.tracking_uri) if args.model.startswith(("models:", "runs:")) else None
    trained = load_trained(args.model, tracking=tracking, version=args.version)
    config = InferConfig(pairs=pairs, library_size=library, programs_mode=args.traversal, top_n=args.top_n,
                         actors=args.actors, genome=args.genome)
    result = infer(args.store, trained, config=config, ray_address=args.ray_address, progress=not args.no_progress)
    rec = result.record
    motifs = f" (motifs {result.timings['motifs_s']:.1f} s)" if "motifs_s" in result.timings else ""
    print(f"published version {rec.version} ({rec.entry}) of {args.store}: {result.cells:,} cells at "
          f"{result.cells_per_s:,.0f} cells/s, programs in {result.programs_s:.1f} s{motifs}; predictions: "
          f"{', '.join(f'{t} from {s}' for s, t in rec.pairs)}")


def run_query(args: argparse.Namespace) -> None:
    from . import results

    if args.what == "markers":
        from .evaluate.report import store_markers

        table = store_markers(args.store, version=args.version, max_cells=args.max_cells, label_key=args.label_key,
                              resolution=args.resolution, sub_resolution=args.sub_resolution, top=args.top)
        _output(table, args.out, args.limit)
        return
    if args.motifs and args.what != "programs":
        raise InputError(args.store, "--motifs", "only with `query programs`")
    with results.open(args.store, args.version) as res:
        ids = args.ids.split(",") if args.ids else None
        if args.what == "versions":
            table = res.versions()
        elif args.what == "embeddings":
            table = res.embeddings(args.key, where=_where(args.where), ids=ids, dim=args.dim)
        elif args.what == "predictions":
            if not args.target:
                raise InputError(args.store, "--target", "predictions need --target (e.g. ADT)")
            table = res.predictions(args.target, source=args.source, where=_where(args.where), ids=ids,
                                    features=args.features.split(",") if args.features else None)
        else:
            table = (res.motifs if args.motifs else res.programs)(dim=args.dim, modality=args.modality,
                                                                  direction=args.direction)
    _output(table, args.out, args.limit)


def run_report(args: argparse.Namespace) -> None:
    from .evaluate.report import report
    from .train.tracking import tracking_uri

    done = report(args.store, args.out, version=args.version, max_cells=args.max_cells,
                  tracking=tracking_uri(args.tracking_uri))
    for path in [*done["figures"], done["html"]]:
        print(path)
    print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in done["numbers"].items())
          + (f"; logged to MLflow run {done['mlflow_run']}" if done["mlflow_run"] else ""))


def _output(table: pd.DataFrame, out: str | None, limit: int) -> None:
    if out is None:
        with pd.option_context("display.width", 200, "display.max_columns", 12):
            print(table.head(limit).to_string())
        if len(table) > limit:
            print(f"... {len(table):,} rows in all (--out FILE for all of them)")
        return
    path = Path(out)
    if path.suffix not in FORMATS:
        raise InputError(out, "--out", f"unknown format: use one of {', '.join(FORMATS)}")
    if path.suffix == ".csv":
        table.to_csv(path)
    elif path.suffix == ".parquet":
        table.to_parquet(path)
    else:
        import anndata as ad

        numeric = table.select_dtypes("number")
        ad.AnnData(numeric.to_numpy(), obs=pd.DataFrame(index=table.index.astype(str)),
                   var=pd.DataFrame(index=numeric.columns.astype(str))).write_h5ad(path)
    print(f"{len(table):,} rows written to {path}", file=sys.stderr)
