"""``scmm-atlas ingest``: users' files into a store, streamed in bounded chunks of cells.

Two passes over the inputs. The first only reads (names, obs columns, a scan of every count) and
raises :class:`InputError` on anything wrong, so bad input never touches a store. The second
writes chunks of cells. A new local store is built beside its final path and renamed into place
when complete; an append becomes visible when the store's cell count is committed, and a failed
append to a local store (a full disk, say) puts every file back as it was (:func:`restored_on_failure`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from ..errors import InputError
from ..store import backend_for, create_store, open_store, parse_uri, store_exists
from ..store.base import HASH_CHUNK, LAYOUT_NAME, Store, StoreInfo, StoreWriter, empty_var, hash_strings, modality_kind
from ..store.lease import LEASE_DIR, lock
from ..store.staging import check_new_store, remove_store, restored_on_failure, staging
from ..store.uri import StoreURI
from .input_files import MatrixSource, SourceSpec, open_sources
from .selection import N_TOP_GENES
from .validate import CellCounts, check_features_match, check_names, scan_counts

log = logging.getLogger(__name__)
APPEND_WAIT_S = 6 * 3600.0  # another append of the same store still writing


@dataclass
class IngestOptions:
    backend: str | None = None
    append: bool = False
    dataset: str | None = None
    batch_key: str | None = None
    label_key: str | None = None
    layer: str | dict[str, str] | None = None  # layers/NAME for every input, or per modality
    modalities: Sequence[str] | None = None
    feature_maps: Mapping[str, str] = field(default_factory=dict)
    prefix_barcodes: bool = False
    chunk_cells: int = 20_000
    chunk_nnz: int = 1 << 24
    stats: bool | None = None  # None: on a new store yes, on --append no
    n_top_genes: int = N_TOP_GENES
    progress: bool = True


@dataclass
class IngestReport:
    uri: str
    backend: str
    n_new: int
    n_total: int
    modalities: dict[str, int]  # new cells that have each modality
    zero_dropped: dict[str, int]  # cells with zero counts dropped from each modality
    cells_dropped: int  # cells left with no modality
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    """Everything decided in the read-only pass."""

    n: int  # new cells
    prefix: str  # prepended to barcodes to make obs_id
    rows: dict[str, np.ndarray]  # modality -> source row per new cell (-1: absent)
    counts: dict[str, CellCounts]
    obs: pd.DataFrame  # every obs column but obs_id (read per chunk from the files)
    remap: dict[str, np.ndarray | None]  # modality -> store column per source column (-1: dropped)
    n_var: dict[str, int]


def _remap_from_spec(src: MatrixSource, store_features: pd.Index, spec: str) -> np.ndarray:
    if spec == "intersect":
        pairs = pd.Series(src.var.index, index=src.var.index)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise InputError(path, "path", "feature map file not found")
        table = pd.read_csv(path, sep="\t", header=None, dtype=str)
        if table.shape[1] < 2:
            raise InputError(path, "columns", "a feature map needs two tab-separated columns: SOURCE STORE")
        pairs = pd.Series(table[1].to_numpy(), index=table[0].to_numpy())
    target = pairs.reindex(src.var.index)
    remap = store_features.get_indexer(target.fillna("\0").to_numpy())
    if (remap >= 0).sum() == 0:
        raise InputError(src.path, f"{src.modality} var_names", f"no feature maps onto the store's with {spec!r}")
    hit = remap[remap >= 0]
    if len(np.unique(hit)) != len(hit):
        raise InputError(src.path, f"{src.modality} var_names", "the feature map sends two features to one")
    return remap


def _rows_of(source: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Row of each cell (by barcode hash) in ``source`` (-1: absent); cheap when the order is the same."""
    if np.array_equal(source, cells):
        return np.arange(len(cells), dtype=np.int64)
    return pd.Index(source).get_indexer(cells)


def _obs_ids(sources: Sequence[MatrixSource], rows: Mapping[str, np.ndarray], prefix: str,
             start: int, stop: int) -> np.ndarray:
    """obs_id of new cells ``[start, stop)``, read from the files; refuses a barcode-hash collision."""
    ids = np.empty(stop - start, dtype=object)
    filled = np.zeros(stop - start, dtype=bool)
    for src in sources:
        row = rows[src.modality][start:stop]
        present = row >= 0
        values = np.empty(stop - start, dtype=object)
        values[present] = src.barcodes.take(row[present])
        both = present & filled
        if both.any() and not (ids[both] == values[both]).all():
            raise InputError(src.path, "obs_names", "two barcodes share a 64-bit hash; rename one of them")
        new = present & ~filled
        ids[new] = values[new]
        filled |= present
    return ids if not prefix else np.array([prefix + v for v in ids], dtype=object)


def _new_id_hashes(sources: Sequence[MatrixSource], rows: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    """Hashes of the new cells' obs_id: the barcode hashes already held, unless a prefix changes the ids."""
    n = len(next(iter(rows.values())))
    if prefix:
        return np.concatenate([hash_strings(_obs_ids(sources, rows, prefix, a, min(a + HASH_CHUNK, n)))
                               for a in range(0, n, HASH_CHUNK)])
    out = np.zeros(n, dtype=np.uint64)
    filled = np.zeros(n, dtype=bool)
    for src in sources:
        row = rows[src.modality]
        take = (row >= 0) & ~filled
        out[take] = src.barcodes.hashes[row[take]]
        filled |= take
    return out


def _combine_obs(sources: Sequence[MatrixSource], rows: Mapping[str, np.ndarray], key: str | None) -> pd.Categorical:
    """An obs column for the new cells, from the first source that has it for each cell ("" if none)."""
    n = len(next(iter(rows.values())))
    if key is None:
        return pd.Categorical.from_codes(np.zeros(n, np.int8), [""])
    out = np.full(n, "", dtype=object)
    found = False
    for src in sources:
        values = src.obs_column(key)
        if values is None:
            continue
        found = True
        row = rows[src.modality]
        take = (row >= 0) & (out == "")
        vals = values[row[take]]
        out[take] = np.where(pd.isna(vals), "", vals.astype(str))
    if not found:
        raise InputError(", ".join(sorted({str(s.path) for s in sources})), f"obs/{key}",
                         "column not found in any input's obs")
    return pd.Categorical(out)


def _default_dataset(sources: Sequence[MatrixSource]) -> str:
    """One file: its name; one file per modality in a folder: the folder's name."""
    paths = {s.path for s in sources}
    parents = {p.parent for p in paths}
    if len(paths) > 1 and len(parents) == 1:
        return next(iter(parents)).name
    return sources[0].path.name.split(".")[0]


def _feature_remaps(sources: Sequence[MatrixSource], opts: IngestOptions, store: Store | None, report: IngestReport
                    ) -> tuple[dict[str, np.ndarray | None], dict[str, int]]:
    """Per modality: where each file feature goes among the store's (None: same order) and how many
    features the stored modality has; an appended file must match the store's features or be mapped."""
    remap: dict[str, np.ndarray | None] = {}
    n_var: dict[str, int] = {}
    for src in sources:
        if store is None:
            remap[src.modality], n_var[src.modality] = None, len(src.var)
            continue
        if src.modality not in store.modalities:
            raise InputError(src.path, "modality", f"{src.modality} is not in the store {store.uri} "
                             f"(it has {store.modalities})")
        features = store.var(src.modality).index
        spec = opts.feature_maps.get(src.modality)
        if spec is None:
            order = check_features_match(src, features, str(store.uri))
            remap[src.modality] = None if (order == np.arange(len(order))).all() else np.argsort(order)
        else:
            remap[src.modality] = _remap_from_spec(src, features, spec)
            missing = len(features) - int((remap[src.modality] >= 0).sum())
            if missing:
                report.warnings.append(f"{src.path}: {src.modality} var_names: {missing} store features "
                                       "absent from this file are stored as zero counts")
        n_var[src.modality] = len(features)
    return remap, n_var


def _match_cells(sources: Sequence[MatrixSource], counts: Mapping[str, CellCounts], report: IngestReport
                 ) -> dict[str, np.ndarray]:
    """Per modality, each stored cell's row in its file (-1: the cell lacks it). Cells are matched by
    64-bit barcode hashes (strings are read per chunk when written); cells with zero counts are
    dropped from that modality, and cells left with no modality at all from the store."""
    keys = sources[0].barcodes.hashes
    for src in sources[1:]:
        if not np.array_equal(src.barcodes.hashes, keys):
            keys = np.concatenate([keys, src.barcodes.hashes[~np.isin(src.barcodes.hashes, keys)]])
    if any(not np.array_equal(s.barcodes.hashes, keys) for s in sources):
        for src in sources:
            others = [o.barcodes.hashes for o in sources if o is not src]
            if not any(np.isin(src.barcodes.hashes, o).any() for o in others):
                raise InputError(src.path, f"{src.modality} obs_names",
                                 "no cell barcode in common with the other modalities' files")
    rows = {src.modality: _rows_of(src.barcodes.hashes, keys) for src in sources}
    keep = np.zeros(len(keys), dtype=bool)
    for src in sources:
        row = rows[src.modality]
        zero = (row >= 0) & (counts[src.modality].total[np.maximum(row, 0)] == 0)
        if zero.any():
            report.zero_dropped[src.modality] = int(zero.sum())
            report.warnings.append(f"{src.path}: {src.field}: {int(zero.sum())} cells with zero total counts "
                                   f"dropped from {src.modality}")
            row[zero] = -1
        if not (row >= 0).any():
            raise InputError(src.path, src.field, f"empty modality {src.modality}: every cell has zero counts")
        keep |= row >= 0
    report.cells_dropped = int((~keep).sum())
    if report.cells_dropped:
        report.warnings.append(f"{report.cells_dropped} cells dropped: zero counts in every modality")
    return rows if keep.all() else {mod: row[keep] for mod, row in rows.items()}


def _check_new_ids(sources: Sequence[MatrixSource], rows: Mapping[str, np.ndarray], prefix: str, store: Store) -> None:
    new_ids = _new_id_hashes(sources, rows, prefix)
    clash = np.isin(new_ids, store.obs_id_hashes())
    if clash.any():
        first = _obs_ids(sources, rows, prefix, int(np.argmax(clash)), int(np.argmax(clash)) + 1)[0]
        raise InputError(sources[0].path, "obs_names", f"{int(clash.sum())} cell barcodes are already in the "
                         f"store, e.g. {first!r}: use --prefix-barcodes with a distinct --dataset")


def _obs_table(sources: Sequence[MatrixSource], rows: Mapping[str, np.ndarray], counts: Mapping[str, CellCounts],
               all_mods: Sequence[str], dataset: str, opts: IngestOptions, report: IngestReport) -> pd.DataFrame:
    """The new cells' obs: dataset, batch, label, and per modality presence, total counts and features."""
    n = len(next(iter(rows.values())))
    obs = pd.DataFrame(index=pd.RangeIndex(n))
    # Categoricals: a byte or two per cell, so that memory hardly grows with the cell count.
    obs["dataset"] = pd.Categorical.from_codes(np.zeros(n, np.int8), [dataset])
    obs["batch"] = obs["dataset"] if opts.batch_key is None else _combine_obs(sources, rows, opts.batch_key)
    obs["cell_type"] = _combine_obs(sources, rows, opts.label_key)
    for mod in all_mods:
        row = rows.get(mod, np.full(n, -1))
        present = row >= 0
        obs[f"has_{mod}"] = present
        for col, arr in ((f"total_counts_{mod}", "total"), (f"n_features_{mod}", "nnz")):
            values = np.zeros(n, dtype=np.int64)
            if mod in counts:
                values[present] = getattr(counts[mod], arr)[row[present]]
            obs[col] = values
        report.modalities[mod] = int(present.sum())
    return obs


def _plan(sources: Sequence[MatrixSource], opts: IngestOptions, store: Store | None,
          report: IngestReport) -> _Plan:
    """Everything decided before a byte is written: feature maps, matched cells, their obs."""
    for src in sources:
        check_names(src)
    remap, n_var = _feature_remaps(sources, opts, store, report)
    counts = {src.modality: scan_counts(src, max_cells=opts.chunk_cells, max_nnz=opts.chunk_nnz,
                                        progress=opts.progress) for src in sources}
    rows = _match_cells(sources, counts, report)
    dataset = opts.dataset or _default_dataset(sources)
    prefix = f"{dataset}:" if opts.prefix_barcodes else ""
    if store is not None:
        _check_new_ids(sources, rows, prefix, store)
    all_mods = store.modalities if store is not None else [s.modality for s in sources]
    obs = _obs_table(sources, rows, counts, all_mods, dataset, opts, report)
    return _Plan(n=len(obs), prefix=prefix, rows=rows, counts=counts, obs=obs, remap=remap, n_var=n_var)


def _chunk_bounds(plan: _Plan, max_cells: int, max_nnz: int) -> list[tuple[int, int]]:
    nnz = np.zeros(plan.n, dtype=np.int64)
    for mod, row in plan.rows.items():
        present = row >= 0
        nnz[present] += plan.counts[mod].nnz[row[present]]
    cum = np.concatenate([[0], np.cumsum(nnz)])
    bounds, start = [], 0
    while start < len(nnz):
        stop = min(start + max_cells, len(nnz))
        limit = int(np.searchsorted(cum, cum[start] + max_nnz, side="right")) - 1
        stop = max(start + 1, min(stop, limit))
        bounds.append((start, stop))
        start = stop
    return bounds


def _chunk_matrix(src: MatrixSource, rows: np.ndarray, remap: np.ndarray | None, n_var: int) -> sp.csr_matrix:
    """The store-space CSR of one chunk of cells (empty rows where a cell lacks the modality)."""
    present = rows >= 0
    src_rows = rows[present]
    order = np.argsort(src_rows, kind="stable")
    mat = src.read_rows(src_rows[order])
    if not (order == np.arange(len(order))).all():
        mat = mat[np.argsort(order)]
    mat = sp.csr_matrix(mat, dtype=np.int32)
    if remap is not None:
        cols = remap[mat.indices]
        keep = cols >= 0
        ptr = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])[mat.indptr]
        mat = sp.csr_matrix((mat.data[keep], cols[keep], ptr), shape=(mat.shape[0], n_var))
    mat.sum_duplicates()  # canonical: sorted, unique column indices per row
    mat.eliminate_zeros()
    per_row = np.zeros(len(rows), dtype=np.int64)
    per_row[present] = np.diff(mat.indptr)
    indptr = np.concatenate([[0], np.cumsum(per_row)])
    return sp.csr_matrix((mat.data, mat.indices, indptr), shape=(len(rows), n_var))


def _write(writer: StoreWriter, sources: Sequence[MatrixSource], plan: _Plan, all_mods: Sequence[str],
           opts: IngestOptions) -> None:
    by_mod = {s.modality: s for s in sources}
    bar = tqdm(total=plan.n, desc="ingest", unit="cell", disable=not opts.progress)
    for start, stop in _chunk_bounds(plan, opts.chunk_cells, opts.chunk_nnz):
        counts = {}
        for mod in all_mods:
            if mod in by_mod:
                counts[mod] = _chunk_matrix(by_mod[mod], plan.rows[mod][start:stop], plan.remap[mod],
                                            plan.n_var[mod])
            else:
                counts[mod] = sp.csr_matrix((stop - start, plan.n_var.get(mod, 0)), dtype=np.int32)
        obs = plan.obs.iloc[start:stop].reset_index(drop=True)
        obs.insert(0, "obs_id", _obs_ids(sources, plan.rows, plan.prefix, start, stop))
        writer.write(start, obs, counts)
        bar.update(stop - start)
    bar.close()


def _write_all(open_writer: Callable[[], StoreWriter], sources: Sequence[MatrixSource], plan: _Plan,
               all_mods: Sequence[str], opts: IngestOptions) -> None:
    """Write and commit every new cell; a writer that fails is aborted (its cells stay invisible)."""
    writer = open_writer()
    try:
        _write(writer, sources, plan, all_mods, opts)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def ingest(uri: str, specs: Sequence[SourceSpec | str], opts: IngestOptions | None = None) -> IngestReport:
    """Ingest ``specs`` into the store at ``uri`` (created, or appended to with ``opts.append``).

    Appends to one store run one at a time (a lease; another waits): each writes the rows after the
    store's committed cells."""
    opts = opts or IngestOptions()
    loc = parse_uri(uri)
    if opts.append and store_exists(loc):
        with lock(loc.uri, "ingest", wait_s=APPEND_WAIT_S):
            return _ingest(loc, specs, opts)
    return _ingest(loc, specs, opts)


def _ingest(loc: StoreURI, specs: Sequence[SourceSpec | str], opts: IngestOptions) -> IngestReport:
    specs = [s if isinstance(s, SourceSpec) else SourceSpec.parse(s) for s in specs]
    if not specs:
        raise InputError(loc, "inputs", "no input files given")
    store: Store | None = None
    if opts.append:
        store = open_store(loc, writable=True)
        backend = store.backend
    else:
        check_new_store(loc, option="--store", exists_hint="use --append to add cells")
        backend = backend_for(loc, opts.backend)
    report = IngestReport(uri=str(loc), backend=backend, n_new=0, n_total=0, modalities={}, zero_dropped={},
                          cells_dropped=0)
    with ExitStack() as stack:
        if store is not None:
            stack.callback(store.close)
        sources = open_sources(specs, stack, layer=opts.layer, modalities=opts.modalities)
        plan = _plan(sources, opts, store, report)
        for msg in report.warnings:
            log.warning(msg)
        n_new = plan.n
        if store is not None:
            all_mods = store.modalities
            for mod in all_mods:
                plan.n_var.setdefault(mod, len(store.var(mod)))
            target = loc
            # Other processes may meanwhile take leases, publish results or prepare a layout there.
            others = (LEASE_DIR, LAYOUT_NAME, store.results_uri.rstrip("/").rsplit("/", 1)[-1])
            with restored_on_failure(loc, untouched=others):
                _write_all(lambda: store.appender(n_new), sources, plan, all_mods, opts)
        else:
            all_mods = [s.modality for s in sources]
            info = StoreInfo(modalities=all_mods, kinds={m: modality_kind(m) for m in all_mods})
            vars_ = {s.modality: empty_var(s.var) for s in sources}
            target = staging(loc)
            try:
                _write_all(lambda: create_store(target, backend, info, vars_, n_new), sources, plan, all_mods, opts)
            except BaseException:
                remove_store(target)
                raise
    run_stats = opts.stats if opts.stats is not None else not opts.append
    if target != loc:  # a new local store: complete, statistics included, before it is in place
        try:
            if run_stats:
                with open_store(target, writable=True) as staged:
                    _stats(staged, opts)
        except BaseException:
            remove_store(target)
            raise
        target.path.rename(loc.path)
        run_stats = False
    report.n_new = n_new
    with open_store(loc, writable=True) as done:
        report.n_total = done.n_obs
        if run_stats:
            _stats(done, opts)
    return report


def _stats(store: Store, opts: IngestOptions) -> None:
    from .stats import compute_stats

    compute_stats(store, n_top_genes=opts.n_top_genes, progress=opts.progress)
