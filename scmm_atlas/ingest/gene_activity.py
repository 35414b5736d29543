"""``scmm-atlas gene-activity``: ATAC peaks summed per gene (body + 2 kb upstream of the TSS).

Gene activity is the usual baseline for comparing ATAC with RNA (pseudo-RNA from chromatin). It is
computed out of core: a sparse regions x genes overlap matrix is built once from the region names
and a gene table, then each chunk of cells' ATAC counts is multiplied by it and written to a new
store (modality ``GA``), so memory follows the chunk, never the number of cells. The new store is
made the way ingest makes one: built beside its final path and renamed into place when complete.
"""

from __future__ import annotations

import csv
import gzip
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from ..errors import InputError, StoreError
from ..store import backend_for, create_store, open_store, parse_uri
from ..store.base import Store, StoreInfo, StoreWriter, empty_var, modality_kind
from ..store.regions import parse_regions
from ..store.staging import check_new_store, remove_store, staging
from ..store.uri import StoreURI
from .input_files import INT32_MAX

GENE_COLUMNS = ("gene_name", "chrom", "start", "end", "strand")
GA = "GA"  # the modality written: gene activity
_INT = re.compile(r"^[+-]?\d+$")
_GTF_ATTR = re.compile(r'(\w+)\s+"([^"]*)"')


@dataclass
class GeneActivityReport:
    uri: str
    backend: str
    n_cells: int
    n_genes: int  # genes written (columns of GA)
    n_genes_missing: int  # requested genes that the table lacks
    n_regions: int  # features of the source modality
    n_regions_overlapping: int  # regions that fall in at least one gene's window
    seconds: float
    missing: list[str]  # the first few requested genes that the table lacks, for the message


# -- the gene table -----------------------------------------------------------------------------
def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _text_lines(path: Path) -> Iterator[str]:
    """Lines of a text file, gunzipped when it starts with gzip's magic bytes (whatever its name)."""
    with gzip.open(path, "rt") if _is_gzip(path) else open(path) as fh:
        yield from fh


def _first_data_line(path: Path) -> str:
    lines = _text_lines(path)
    try:
        return next((line for line in lines if line.strip() and not line.startswith("#")), "")
    finally:
        lines.close()


def _is_gtf(path: Path, first: str) -> bool:
    """A GTF by its name (``.gtf``, ``.gtf.gz``), or by its first data line (9 fields, ``gene_id "``)."""
    name = path.name.lower()
    if name.endswith((".gtf", ".gtf.gz")):
        return True
    fields = first.rstrip("\n").split("\t")
    return len(fields) == 9 and 'gene_id "' in fields[8]


def read_gene_table(path: str | Path) -> pd.DataFrame:
    """Genes as ``gene_name, chrom, start, end, strand`` (0-based start, exclusive end, as in BED).

    Reads (a) a TSV, gzipped or not, with the header ``gene_name chrom start end strand`` (the
    format of the shipped mm10 / hg19 tables) or (b) a GTF, gzipped or not: its ``gene`` rows, named
    by ``gene_name`` (else ``gene_id``), with GTF's 1-based inclusive start turned into 0-based. A
    name that occurs more than once keeps its first row (a table lists a symbol once; a GTF repeats a
    few on other contigs or the PAR), so each gene is one column. Anything wrong raises one
    :class:`InputError` naming the file, the field and the first bad line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(path, "path", "gene table not found")
    try:
        first = _first_data_line(path)
        if not first:
            raise InputError(path, "rows", "empty table: no genes")
        raw = _read_gtf(path) if _is_gtf(path, first) else _read_tsv(path)
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError, csv.Error) as exc:
        raise InputError(path, "format", f"not a readable TSV or GTF ({type(exc).__name__}: {exc})") from None
    genes = _checked(path, raw)
    return genes.drop_duplicates("gene_name", keep="first").reset_index(drop=True)


def _read_tsv(path: Path) -> pd.DataFrame:
    """Every column as text, with the file line of each row (for messages)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)  # more fields than the header
        try:
            table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE,
                                index_col=False, compression="gzip" if _is_gzip(path) else None).fillna("")
        except pd.errors.ParserWarning:
            raise InputError(path, "columns", "a row has more tab-separated fields than the header") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in GENE_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(path, missing[0], f"missing column (need a header {' '.join(GENE_COLUMNS)}; "
                         f"found {' '.join(map(str, table.columns[:8]))})")
    table = table[list(GENE_COLUMNS)].apply(lambda col: col.str.strip())
    table["line"] = np.arange(len(table)) + 2
    return table


def _read_gtf(path: Path) -> pd.DataFrame:
    """The ``gene`` rows of a GTF, streamed line by line (a whole-genome GTF holds millions of lines)."""
    rows = []
    for number, line in enumerate(_text_lines(path), start=1):
        if line.startswith("#") or "\tgene\t" not in line:
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 9 or fields[2] != "gene":
            continue
        attrs = dict(_GTF_ATTR.findall(fields[8]))
        name = attrs.get("gene_name") or attrs.get("gene_id")
        if not name:
            raise InputError(path, "attributes", f"line {number}: a gene row without gene_name or gene_id")
        start = str(int(fields[3]) - 1) if _INT.match(fields[3]) else fields[3]  # 1-based inclusive -> 0-based
        rows.append((name, fields[0], start, fields[4], fields[6], number))
    if not rows:
        raise InputError(path, "feature", "no 'gene' rows: the GTF needs gene records (feature column 'gene')")
    return pd.DataFrame(rows, columns=[*GENE_COLUMNS, "line"])


def _checked(path: Path, raw: pd.DataFrame) -> pd.DataFrame:
    """Typed columns, or an InputError for the first bad value."""
    if raw.empty:
        raise InputError(path, "rows", "empty table: no genes")
    for col in ("gene_name", "chrom"):
        bad = raw[col].str.strip() == ""
        if bad.any():
            raise InputError(path, col, f"line {raw['line'][bad].iloc[0]}: empty value")
    for col in ("start", "end"):
        bad = ~raw[col].str.match(_INT)
        if bad.any():
            raise InputError(path, col, f"line {raw['line'][bad].iloc[0]}: {raw[col][bad].iloc[0]!r} "
                             "is not an integer coordinate")
    start, end = raw["start"].astype(np.int64).to_numpy(), raw["end"].astype(np.int64).to_numpy()
    checks = (("start", start < 0, "negative start"), ("end", end <= start, "end <= start"),
              ("strand", ~raw["strand"].isin(["+", "-"]).to_numpy(), "strand is not + or -"))
    for col, bad, problem in checks:
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(path, col, f"line {raw['line'].iloc[i]} ({raw['gene_name'].iloc[i]!r}): {problem} "
                             f"(start {raw['start'].iloc[i]}, end {raw['end'].iloc[i]}, "
                             f"strand {raw['strand'].iloc[i]!r})")
    return pd.DataFrame({"gene_name": raw["gene_name"].to_numpy(object), "chrom": raw["chrom"].to_numpy(object),
                         "start": start, "end": end, "strand": raw["strand"].to_numpy(object)})


# -- windows and overlaps ------------------------------------------------------------------------
def gene_windows(genes: pd.DataFrame, *, upstream: int = 2000) -> pd.DataFrame:
    """Each gene's window: its body plus ``upstream`` bp before its TSS, which is ``start`` on the +
    strand and ``end`` on the - strand; clipped at 0. Same columns as the gene table."""
    if upstream < 0:
        raise InputError("upstream", "--upstream", f"must be >= 0, got {upstream}")
    plus = genes["strand"].to_numpy() == "+"
    out = genes.copy()
    out["start"] = np.where(plus, np.maximum(genes["start"].to_numpy(np.int64) - upstream, 0), genes["start"])
    out["end"] = np.where(plus, genes["end"], genes["end"].to_numpy(np.int64) + upstream)
    return out


def _ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, index) for every index in ``[lo[i], hi[i])``, all i, without a Python loop."""
    counts = np.maximum(hi - lo, 0)
    owner = np.repeat(np.arange(len(lo)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return owner, np.repeat(lo, counts) + np.arange(counts.sum()) - first


def _chrom_pairs(rs: np.ndarray, re_: np.ndarray, ws: np.ndarray, we: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(region, window) pairs that overlap on one chromosome, both inputs sorted by start.

    ``[s, e)`` and ``[ws, we)`` overlap iff ``s < we`` and ``ws < e``. Split by which starts first
    so that each half is one searchsorted range, exact whatever the interval lengths:
    the window starts inside the region (``s <= ws < e``) or the region starts inside the window
    (``ws < s < we``)."""
    lo, hi = np.searchsorted(ws, rs, "left"), np.searchsorted(ws, re_, "left")
    r_a, w_a = _ranges(lo, hi)
    lo, hi = np.searchsorted(rs, ws, "right"), np.searchsorted(rs, we, "left")
    w_b, r_b = _ranges(lo, hi)
    return np.concatenate([r_a, r_b]), np.concatenate([w_a, w_b])


def overlap_matrix(regions: pd.DataFrame, windows: pd.DataFrame) -> sp.csr_matrix:
    """0/1 CSR, regions x windows: 1 where a region overlaps a window (half-open, BED intervals).

    Per chromosome, with sorted starts and searchsorted: work and memory follow the number of
    overlapping pairs, never regions x genes. Regions on chromosomes the windows lack overlap nothing."""
    rows, cols = [], []
    r_chrom, w_chrom = regions["chrom"].to_numpy(object), windows["chrom"].to_numpy(object)
    for chrom in np.intersect1d(pd.unique(r_chrom), pd.unique(w_chrom)):
        r_idx, w_idx = np.flatnonzero(r_chrom == chrom), np.flatnonzero(w_chrom == chrom)
        r_idx = r_idx[np.argsort(regions["start"].to_numpy()[r_idx], kind="stable")]
        w_idx = w_idx[np.argsort(windows["start"].to_numpy()[w_idx], kind="stable")]
        r, w = _chrom_pairs(*(regions[c].to_numpy(np.int64)[r_idx] for c in ("start", "end")),
                            *(windows[c].to_numpy(np.int64)[w_idx] for c in ("start", "end")))
        rows.append(r_idx[r])
        cols.append(w_idx[w])
    r = np.concatenate(rows) if rows else np.empty(0, np.int64)
    c = np.concatenate(cols) if cols else np.empty(0, np.int64)
    return sp.csr_matrix((np.ones(len(r), np.int64), (r, c)), shape=(len(regions), len(windows)))


# -- the store -----------------------------------------------------------------------------------
def _select_genes(genes: pd.DataFrame, wanted: Sequence[str] | None) -> tuple[pd.DataFrame, list[str]]:
    """The table restricted to ``wanted`` in that order (all genes if None), and the names it lacks."""
    if wanted is None:
        return genes, []
    wanted = list(dict.fromkeys(str(g) for g in wanted))
    index = pd.Index(genes["gene_name"]).get_indexer(wanted)
    missing = [g for g, i in zip(wanted, index, strict=True) if i < 0]
    return genes.iloc[index[index >= 0]].reset_index(drop=True), missing


def _ga_var(windows: pd.DataFrame, overlap: sp.csr_matrix) -> pd.DataFrame:
    """GA's var: the window's coordinates and how many regions fall in it, beside the statistics."""
    features = pd.DataFrame({"chrom": windows["chrom"].to_numpy(), "strand": windows["strand"].to_numpy()},
                            index=pd.Index(windows["gene_name"].to_numpy(), name="var_id"))
    var = empty_var(features)  # extra columns as text; the integer ones replaced below
    var.insert(2, "start", windows["start"].to_numpy(np.int64))
    var.insert(3, "end", windows["end"].to_numpy(np.int64))
    var.insert(5, "n_regions", np.asarray(overlap.sum(axis=0)).ravel().astype(np.int64))
    return var


def _chunk(source: Store, mod: str, overlap: sp.csr_matrix, start: int, stop: int) -> tuple[pd.DataFrame,
                                                                                           sp.csr_matrix]:
    """obs and GA counts of cells ``[start, stop)``: ATAC counts times the overlap matrix."""
    obs = source.obs_slice(start, stop, ["obs_id", "dataset", "batch", "cell_type", f"has_{mod}"])
    counts = sp.csr_matrix(source.read(mod, start, stop).astype(np.int64) @ overlap)
    counts.sum_duplicates()
    counts.eliminate_zeros()
    if counts.nnz and counts.data.max() > INT32_MAX:
        raise StoreError(source.uri, f"{mod} counts", "a gene's activity exceeds the int32 counts of a store")
    total = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
    # As ingest does: a cell with no counts in a modality does not have it (no zero library sizes).
    has = obs.pop(f"has_{mod}").to_numpy(bool) & (total > 0)
    obs[f"has_{GA}"] = has
    obs[f"total_counts_{GA}"] = total
    obs[f"n_features_{GA}"] = np.diff(counts.indptr).astype(np.int64)
    return obs, sp.csr_matrix(counts, dtype=np.int32)


def _write_cells(writer: StoreWriter, source: Store, mod: str, overlap: sp.csr_matrix, chunk_cells: int,
                 progress: bool) -> None:
    """Write and commit every cell; a writer that fails is aborted."""
    try:
        with tqdm(total=source.n_obs, desc="gene activity", unit="cell", disable=not progress) as bar:
            for start in range(0, source.n_obs, chunk_cells):
                stop = min(start + chunk_cells, source.n_obs)
                obs, counts = _chunk(source, mod, overlap, start, stop)
                writer.write(start, obs, {GA: counts})
                bar.update(stop - start)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def _build(target: StoreURI, backend: str, source: Store, mod: str, windows: pd.DataFrame,
           overlap: sp.csr_matrix, chunk_cells: int, progress: bool) -> None:
    """The whole new store at ``target``, statistics included; removed again if anything fails."""
    from .stats import compute_stats

    info = StoreInfo(modalities=[GA], kinds={GA: modality_kind(GA)})
    try:
        writer = create_store(target, backend, info, {GA: _ga_var(windows, overlap)}, source.n_obs)
        _write_cells(writer, source, mod, overlap, chunk_cells, progress)
        with open_store(target, writable=True) as staged:
            compute_stats(staged, progress=progress)
    except BaseException:
        remove_store(target)
        raise


def gene_activity(store_uri: str, genes_path: str | Path, out_uri: str, *, modality: str = "ATAC",
                  upstream: int = 2000, genes: Sequence[str] | None = None, chunk_cells: int = 20_000,
                  backend: str | None = None, progress: bool = True) -> GeneActivityReport:
    """Write a new store at ``out_uri`` whose one modality, ``GA``, counts each cell's ``modality``
    reads in each gene's window (see :func:`gene_windows`); its obs are the source's cells, same ids,
    same order. ``genes`` restricts the columns to those names, in that order (missing ones are
    reported, not fatal unless none is left)."""
    t0 = time.perf_counter()
    loc = parse_uri(out_uri)
    check_new_store(loc, option="--out", exists_hint="choose another --out path")
    backend = backend_for(loc, backend)
    if chunk_cells < 1:
        raise InputError("chunk_cells", "--chunk-cells", f"must be >= 1, got {chunk_cells}")
    table, missing = _select_genes(read_gene_table(genes_path), genes)
    if table.empty:
        raise InputError(genes_path, "gene_name", f"none of the {len(missing)} requested genes is in the table")
    windows = gene_windows(table, upstream=upstream)
    with open_store(store_uri) as source:
        if source.n_obs == 0:
            raise StoreError(source.uri, "obs", "the store has no cells")
        names = source.feature_names(modality)
        regions = parse_regions(names, where=str(source.uri), field=f"{modality} var_id")
        overlap = overlap_matrix(regions, windows)
        n_hit = int((np.diff(overlap.indptr) > 0).sum())
        if n_hit == 0:
            raise InputError(genes_path, "chrom", f"no {modality} region overlaps a gene window: chromosome names "
                             f"differ? regions use {regions['chrom'].iloc[0]!r}, the table "
                             f"{table['chrom'].iloc[0]!r}")
        target = staging(loc)
        _build(target, backend, source, modality, windows, overlap, chunk_cells, progress)
        n_cells = source.n_obs
    if target != loc:
        target.path.rename(loc.path)
    return GeneActivityReport(uri=str(loc), backend=backend, n_cells=n_cells, n_genes=len(windows),
                              n_genes_missing=len(missing), n_regions=len(regions), n_regions_overlapping=n_hit,
                              seconds=time.perf_counter() - t0, missing=missing[:10])
