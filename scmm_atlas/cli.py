"""``scmm-atlas``: one entry point, one subcommand per stage."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from . import cli_infer, cli_pipeline
from .errors import InputError
from .ingest.selection import ATAC_QUANTILE, N_TOP_GENES

INGEST_EPILOG = """\
inputs:
  MOD=FILE.h5ad   one AnnData file per modality (e.g. RNA=rna.h5ad ADT=protein.h5ad)
  FILE.h5mu       a MuData file: every modality in it (rna->RNA, protein/prot/adt->ADT, atac->ATAC)
  FILE.h5         a 10x Cell Ranger feature-barcode matrix (Gene Expression->RNA,
                  Antibody Capture->ADT, Peaks->ATAC)
Cells are matched across modalities by barcode; cells missing from some modality keep a
presence flag (has_<MOD>) and no fake counts. Counts must be raw integers.

examples:
  scmm-atlas ingest --store atlas.soma RNA=rna.h5ad ADT=protein.h5ad --label-key cell_type
  scmm-atlas ingest --store atlas.zarr sample.h5mu --batch-key donor
  scmm-atlas ingest --store s3://bucket/atlas --append --dataset run2 --prefix-barcodes new.h5
"""


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="ingest h5ad / h5mu / 10x h5 files into a store",
                       description="Ingest users' files into a TileDB-SOMA or Zarr store, streamed in chunks "
                       "of cells (memory bounded by the chunk, not the file).",
                       epilog=INGEST_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files (see 'inputs' below)")
    p.add_argument("--store", required=True, metavar="URI", help="store path or s3://bucket/prefix")
    p.add_argument("--backend", choices=("soma", "zarr"), default=None,
                   help="backend of a new store (default: zarr if URI ends in .zarr, else soma)")
    p.add_argument("--append", action="store_true",
                   help="add new cells (a new dataset or batch) to an existing store; existing cells are not rewritten")
    p.add_argument("--dataset", metavar="NAME",
                   help="value of obs 'dataset' for these cells (default: the file name, or the folder "
                   "of one-file-per-modality inputs)")
    p.add_argument("--batch-key", metavar="COL", help="input obs column copied to obs 'batch' (default: dataset)")
    p.add_argument("--label-key", metavar="COL", help="input obs column copied to obs 'cell_type' (default: none)")
    p.add_argument("--layer", action="append", default=[], metavar="NAME|MOD=NAME",
                   help="read counts from layers/NAME instead of X (h5ad/h5mu): NAME for every input, MOD=NAME "
                   "for one modality (repeatable; the others read X), e.g. --layer RNA=counts")
    p.add_argument("--modalities", metavar="MOD,...", help="only these modalities of the inputs (e.g. RNA,ADT)")
    p.add_argument("--feature-map", action="append", default=[], metavar="MOD=intersect|MOD=FILE.tsv",
                   help="with --append, map a differing feature space onto the store's: 'intersect' keeps "
                   "features of the same name, FILE.tsv maps SOURCE<TAB>STORE names; store features "
                   "that are not mapped get zero counts (repeatable)")
    p.add_argument("--prefix-barcodes", action="store_true",
                   help="store cell ids as DATASET:BARCODE (for datasets whose barcodes collide)")
    p.add_argument("--chunk-cells", type=int, default=20_000, metavar="N",
                   help="at most N cells per chunk (default: 20000)")
    p.add_argument("--chunk-nnz", type=int, default=1 << 24, metavar="N",
                   help="at most N stored values per chunk, which bounds memory (default: 16777216)")
    stats = p.add_mutually_exclusive_group()
    stats.add_argument("--no-stats", action="store_true", help="skip feature statistics on a new store")
    stats.add_argument("--recompute-stats", action="store_true",
                       help="after --append, recompute feature statistics and selection over all cells")
    p.add_argument("--n-top-genes", type=int, default=N_TOP_GENES, metavar="N",
                   help=f"highly variable genes to select for RNA (default: {N_TOP_GENES})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_store_cmds(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="compute feature statistics and the feature selection (dask, out-of-core)")
    p.add_argument("--store", required=True, metavar="URI")
    p.add_argument("--n-top-genes", type=int, default=N_TOP_GENES, metavar="N",
                   help=f"RNA highly variable genes (default: {N_TOP_GENES})")
    p.add_argument("--atac-quantile", type=float, default=ATAC_QUANTILE, metavar="Q",
                   help=f"keep ATAC peaks whose total counts reach this quantile (default: {ATAC_QUANTILE})")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("prepare", help="write or extend the pre-shuffled training layout the loader reads")
    p.add_argument("--store", required=True, metavar="URI", help="store path or s3://bucket/prefix")
    p.add_argument("--seed", type=int, default=0, help="seed of the cell shuffle (default: 0)")
    p.add_argument("--shard-cells", type=int, default=1 << 16, metavar="N",
                   help="cells per shard: bounds the memory of the shuffle (default: 65536)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="cells held out for validation, by a stable hash of the cell id (default: 0.1)")
    p.add_argument("--rebuild", action="store_true", help="rewrite the whole layout, not only new cells")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = sub.add_parser("train", help="train scMM on a store with Ray Train (DDP), tracked and registered in MLflow")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides with dotted keys, e.g. train.epochs=50 distributed.num_workers=2")
    p.add_argument("--config", default="atlas_cite", metavar="YAML",
                   help="a config file, or the name of a shipped one (default: atlas_cite; a wrong name "
                   "lists them)")
    p.add_argument("--store", required=True, metavar="URI", help="store path or s3://bucket/prefix")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    p.add_argument("--num-workers", type=int, metavar="N", help="DDP workers (overrides distributed.num_workers)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast (distributed.bf16)")
    p.add_argument("--name", metavar="NAME", help="run name (default: scmm-<time>); with --resume, the run to continue")
    p.add_argument("--resume", action="store_true", help="continue the run --name from its last checkpoint")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    p.add_argument("--no-tracking", action="store_true",
                   help="no MLflow run or registered model (checkpoints only), e.g. on a host without MLflow")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = sub.add_parser("info", help="summarise a store")
    p.add_argument("--store", required=True, metavar="URI")


def _add_gene_activity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gene-activity", help="ATAC peaks per gene (body + upstream of the TSS) into a new store")
    p.add_argument("--store", required=True, metavar="URI", help="the store whose ATAC counts are read")
    p.add_argument("--genes", required=True, metavar="TABLE",
                   help="gene table: TSV (gene_name chrom start end strand, 0-based) or GTF, optionally gzipped")
    p.add_argument("--out", required=True, metavar="URI", help="the new store (modality GA; .zarr suffix: Zarr)")
    p.add_argument("--modality", default="ATAC", help="the modality of peaks (default: ATAC)")
    p.add_argument("--upstream", type=int, default=2000, metavar="BP", help="bp upstream of the TSS (default: 2000)")
    p.add_argument("--chunk-cells", type=int, default=20_000, metavar="N", help="cells per chunk (default: 20000)")
    p.add_argument("--backend", choices=["soma", "zarr"], help="store backend of --out (default: by its suffix)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .bench import BENCHES

    p = sub.add_parser("bench", help="benchmarks: ours and the peers on the same data, in one run")
    p.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("--json", metavar="FILE", help="also write {'rows': [...]} to FILE")
    p.add_argument("--cells", type=int, help="cells to generate (bench default if omitted)")
    p.add_argument("--genes", type=int, help="genes to generate (bench default if omitted)")
    p.add_argument("--workdir", metavar="DIR", help="where generated data and stores go (default: a temp dir)")
    p.add_argument("--no-scaling", action="store_true", help="skip the run at twice the cells (ingest)")
    p.add_argument("--no-full-epoch", action="store_true", help="scale: skip the full epoch over the largest store")
    p.add_argument("--epochs", type=int, metavar="N",
                   help="cap training epochs (quality, sweep; default: the configs')")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="initialisations averaged per config (faithful: default 1; quality: default 3)")
    p.add_argument("--systems", metavar="S,...", help="quality: some of scmm-atlas,scvi,wnn,knn (default: all)")
    p.add_argument("--grid", metavar="FILE", help="sweep: YAML {cite|rna_atac: {name: [key=value, ...]}}")
    p.add_argument("--jobs", type=int, metavar="N", help="sweep: variants trained at once (default 1)")
    p.add_argument("--runs", type=int, metavar="N", help="chaos: runs with a random kill (default 5)")
    p.add_argument("--s3", action="store_true", help="chaos: as many runs on S3 behind injected faults")
    p.add_argument("--datasets", metavar="D,...", help="unpaired: some of snare,a549 (default: both)")
    p.add_argument("--gpu", action="store_true",
                   help="on a GPU (train: 1 worker with bf16 autocast off and on, totalVI on the same GPU)")
    p.add_argument("--steps", type=int, metavar="N", help="cluster: timed DDP steps per system")
    p.add_argument("--batch", type=int, metavar="N", help="cluster: cells per worker per step")
    p.add_argument("--gpu-step-ms", type=float, metavar="MS",
                   help="cluster: one GPU's step time the 8x8 projection starts from (default: the GPU anchor's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scmm-atlas", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_ingest(sub)
    _add_store_cmds(sub)
    cli_infer.add_commands(sub)
    cli_pipeline.add_commands(sub)
    _add_gene_activity(sub)
    _add_bench(sub)
    return parser


def _split_pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    from .ingest.input_files import canonical_modality

    out = {}
    for item in items:
        mod, sep, value = item.partition("=")
        if not sep or not mod or not value:
            raise InputError(item, flag, "expected MOD=VALUE")
        out[canonical_modality(mod)] = value
    return out


def _layers(items: Sequence[str]) -> str | dict[str, str] | None:
    """``--layer NAME`` (every input) or ``--layer MOD=NAME ...`` (per modality)."""
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    if any("=" not in item for item in items):
        raise InputError(" ".join(items), "--layer", "give one NAME for every input, or MOD=NAME per modality")
    return _split_pairs(items, "--layer")


def _run_ingest(args: argparse.Namespace) -> None:
    from .ingest.write import IngestOptions, ingest
    from .store import open_store

    opts = IngestOptions(
        backend=args.backend, append=args.append, dataset=args.dataset, batch_key=args.batch_key,
        label_key=args.label_key, layer=_layers(args.layer),
        modalities=args.modalities.split(",") if args.modalities else None,
        feature_maps=_split_pairs(args.feature_map, "--feature-map"), prefix_barcodes=args.prefix_barcodes,
        chunk_cells=args.chunk_cells, chunk_nnz=args.chunk_nnz,
        stats=False if args.no_stats else (True if args.recompute_stats else None),
        n_top_genes=args.n_top_genes, progress=not args.no_progress)
    report = ingest(args.store, args.inputs, opts)  # warnings are logged as they are found
    mods = ", ".join(f"{m} {n:,}" for m, n in report.modalities.items())
    print(f"ingested {report.n_new:,} cells ({mods}) into {report.uri}; store now has {report.n_total:,} cells")
    with open_store(args.store) as store:
        print(store.summary())


def _run_stats(args: argparse.Namespace) -> None:
    from .ingest.stats import compute_stats
    from .store import open_store

    with open_store(args.store, writable=True) as store:
        compute_stats(store, n_top_genes=args.n_top_genes, atac_quantile=args.atac_quantile,
                      progress=not args.no_progress)
        for mod, sel in store.info.selection.items():
            print(f"{mod}: {sel['n_selected']:,} features selected ({sel['method']})")


def _run_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train.driver import train

    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"distributed.num_workers={args.num_workers}")
    if args.gpu:
        overrides.append("distributed.use_gpu=true")
    config = load_config(args.config, overrides)
    result = train(config, args.store, ray_address=args.ray_address, resume=args.resume, run_name=args.name,
                   tracking=args.tracking_uri, track=not args.no_tracking, progress=not args.no_progress)
    best = f"{result.best_val:,.2f}" if result.best_val is not None else "n/a"
    registered = (f"registered {config.distributed.model_name} version {result.model_version}"
                  f"{' (champion)' if result.champion else ''}" if result.run_id else "not tracked")
    print(f"run {result.run_name} ({result.run_id or 'no MLflow run'}): {result.epochs} epochs in {result.wall_s:.0f} "
          f"s, best validation loss {best}; {registered}")


def _run_prepare(args: argparse.Namespace) -> None:
    from .data.prepare import prepare_layout
    from .store import open_store

    with open_store(args.store) as store:
        _, what = prepare_layout(store, seed=args.seed, val_fraction=args.val_fraction, shard_cells=args.shard_cells,
                                 rebuild=args.rebuild, progress=not args.no_progress)
    print(what)


def _run_info(args: argparse.Namespace) -> None:
    from .store import open_store

    with open_store(args.store) as store:
        print(store.summary())


def _run_gene_activity(args: argparse.Namespace) -> None:
    from .ingest.gene_activity import gene_activity

    r = gene_activity(args.store, args.genes, args.out, modality=args.modality, upstream=args.upstream,
                      chunk_cells=args.chunk_cells, backend=args.backend, progress=not args.no_progress)
    print(f"gene activity of {r.n_cells:,} cells x {r.n_genes:,} genes ({r.n_regions_overlapping:,} of "
          f"{r.n_regions:,} regions in a gene window) written to {r.uri} ({r.backend}) in {r.seconds:.1f} s")


def _run_bench(args: argparse.Namespace) -> None:
    from .bench import run_bench

    run_bench(args)


HANDLERS = {"ingest": _run_ingest, "stats": _run_stats, "prepare": _run_prepare, "train": _run_train,
            "infer": cli_infer.run_infer, "query": cli_infer.run_query, "report": cli_infer.run_report,
            "info": _run_info, "run": cli_pipeline.run_pipeline_cmd, "reprocess": cli_pipeline.run_reprocess,
            "demo": cli_pipeline.run_demo, "bench": _run_bench,
            "gene-activity": _run_gene_activity}


# A write that failed for want of room (a full disk, a file-size limit, a quota) or of a working disk.
WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO)
# Commands that put the store back as it was when a write fails (ingest: the new store or the append;
# prepare: the training layout).
RESTORED_ON_WRITE_FAILURE = ("ingest", "prepare")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _storage_failure(exc: BaseException) -> str | None:
    """What failed, if ``exc`` (or one it was raised from) is the object store failing after its
    retries (botocore / aiohttp under s3fs, TileDB's S3 client), or a local write failing for want of
    room (an OSError with one of :data:`WRITE_ERRNOS`; TileDB gives the reason in words)."""
    for seen in _chain(exc):  # object storage first: s3fs reports unknown S3 errors as EIO
        mod, text = type(seen).__module__, str(seen)
        if mod.startswith(("botocore", "aiobotocore", "aiohttp")) or (
                mod.startswith("tiledb") and ("[TileDB::S3]" in text or text.startswith("S3:"))):
            return f"object storage failed after retries: {(text.splitlines() or [type(seen).__name__])[0]}"
    for seen in _chain(exc):
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            return f"write failed: {seen.strerror} (a full disk, a quota or a file-size limit)"
        if type(seen).__module__.startswith("tiledb"):
            words = [os.strerror(e) for e in WRITE_ERRNOS if os.strerror(e) in str(seen)]
            if words:
                return f"write failed: {words[0]} (a full disk, a quota or a file-size limit)"
    return None


def _one_line(text: str) -> str:
    """Control characters escaped (a newline in a file or cell name), so that an error stays one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class _PrintHandler(logging.Handler):
    """A record's message on the current ``sys.stdout`` (looked up when written: tests and callers may
    have replaced it since the handler was made)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), flush=True)
        except Exception:
            self.handleError(record)


def _print_pipeline_progress() -> None:
    """The pipeline's stage reports (logger ``scmm_atlas.pipeline``, INFO) printed as plain lines."""
    log = logging.getLogger("scmm_atlas.pipeline")
    if not any(isinstance(h, _PrintHandler) for h in log.handlers):
        log.addHandler(_PrintHandler())
    log.setLevel(logging.INFO)
    log.propagate = False  # not a second time, prefixed, through the root's stderr handler


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    _print_pipeline_progress()
    if not args.verbose:  # INFO lines of MLflow (database setup) and Ray Data (execution plans) are noise here
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # read when ray.data sets up its logging
    try:
        HANDLERS[args.command](args)
    except InputError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:  # only failed storage is handled here: anything else is re-raised as it is
        reason = _storage_failure(exc)
        if reason is None:
            raise
        where = str(getattr(args, "store", None) or "output")
        kept = args.command in RESTORED_ON_WRITE_FAILURE and not where.startswith("s3://")
        print(f"error: {_one_line(where)}: {_one_line(reason)}{'; the store was left as it was' * kept}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
