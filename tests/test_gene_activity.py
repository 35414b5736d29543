"""ATAC gene activity: the gene table, strand-aware windows, half-open overlaps, the out-of-core pass
into a new store (both backends, plain readers), the CLI, and the real SNARE peaks against mm10."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import random_counts, write_h5ad

from scmm_atlas.cli import main
from scmm_atlas.errors import InputError, StoreError
from scmm_atlas.ingest.gene_activity import gene_activity, gene_windows, overlap_matrix, read_gene_table
from scmm_atlas.ingest.write import IngestOptions, ingest
from scmm_atlas.store import open_store
from scmm_atlas.store.regions import parse_regions

# GP: + strand, TSS at 10,000, window [8,000, 20,000). GM: - strand, TSS at 60,000 (its end), window
# [50,000, 62,000). GZ on chr2, GC near the chromosome start (window clipped at 0).
GENES_TSV = """gene_name\tchrom\tstart\tend\tstrand
GP\tchr1\t10000\t20000\t+
GM\tchr1\t50000\t60000\t-
GZ\tchr2\t100000\t101000\t+
GC\tchr2\t500\t1500\t+
"""
# Each region and the genes it must count for, worked out by hand from the windows above.
REGIONS = {
    "chr1:12000-12500": {"GP"},  # inside GP's body
    "chr1:8500-8600": {"GP"},  # 1.5 kb upstream of GP's TSS
    "chr1:7400-7500": set(),  # 2.5 kb upstream of GP's TSS
    "chr1:21400-21600": set(),  # 1.5 kb downstream of GP's end
    "chr1:55000-55200": {"GM"},  # inside GM's body
    "chr1:61400-61600": {"GM"},  # 1.5 kb upstream of GM's TSS (above its end: - strand)
    "chr1:62400-62600": set(),  # 2.5 kb upstream of GM's TSS
    "chr1:48400-48600": set(),  # 1.5 kb downstream of GM (below its start)
    "chr1:7900-8000": set(),  # ends where GP's window starts: half-open, no overlap
    "chr1_7999_8001": {"GP"},  # one base inside GP's window (another spelling of a region)
    "chr1:20000-20100": set(),  # starts at GP's end
    "chr1:19999-20001": {"GP"},  # one base of GP's body
    "chr1:62000-62100": set(),  # starts where GM's window ends
    "chr1:49900-50000": set(),  # ends at GM's start (downstream side of a - gene)
    "chr1:19000-51000": {"GP", "GM"},  # spans the end of one and the start of the other
    "chr3:12000-12500": set(),  # a chromosome the table does not have
    "chr2:100500-100600": {"GZ"},
    "chr2:0-10": {"GC"},  # GC's window is clipped at 0
}
GENE_ORDER = ["GP", "GM", "GZ", "GC"]


def _expected(genes: list[str]) -> np.ndarray:
    """The hand-made overlap table above as a dense regions x genes 0/1 array."""
    return np.array([[g in hit for g in genes] for hit in REGIONS.values()], dtype=np.int64)


@pytest.fixture()
def genes_tsv(tmp_path: Path) -> Path:
    path = tmp_path / "genes.tsv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(GENES_TSV)
    return path


def test_windows_are_strand_aware_and_clipped(genes_tsv: Path) -> None:
    genes = read_gene_table(genes_tsv)
    assert list(genes["gene_name"]) == GENE_ORDER
    win = gene_windows(genes).set_index("gene_name")
    assert tuple(win.loc["GP", ["start", "end"]]) == (8000, 20000)
    assert tuple(win.loc["GM", ["start", "end"]]) == (50000, 62000)
    assert tuple(win.loc["GC", ["start", "end"]]) == (0, 1500)
    assert tuple(gene_windows(genes, upstream=0).set_index("gene_name").loc["GM", ["start", "end"]]) == (50000, 60000)
    assert list(genes["start"]) == [10000, 50000, 100000, 500]  # the table itself is not changed


def test_overlaps_by_hand(genes_tsv: Path) -> None:
    regions = parse_regions(list(REGIONS))
    mat = overlap_matrix(regions, gene_windows(read_gene_table(genes_tsv)))
    assert sp.issparse(mat) and mat.shape == (len(REGIONS), 4)
    np.testing.assert_array_equal(mat.toarray(), _expected(GENE_ORDER))


def test_overlaps_match_a_dense_pass_on_random_intervals() -> None:
    rng = np.random.default_rng(3)
    n_r, n_w = 400, 120
    regions = pd.DataFrame({"chrom": rng.choice(["chr1", "chr2", "chrX", "chrUn"], n_r),
                            "start": rng.integers(0, 50_000, n_r)})
    regions["end"] = regions["start"] + rng.integers(1, 2_000, n_r)
    windows = pd.DataFrame({"chrom": rng.choice(["chr1", "chr2", "chrX", "chrM"], n_w),
                            "start": rng.integers(0, 50_000, n_w)})
    windows["end"] = windows["start"] + rng.choice([1, 50, 500, 20_000], n_w)  # very different lengths
    same = regions["chrom"].to_numpy()[:, None] == windows["chrom"].to_numpy()[None, :]
    dense = same & (regions["start"].to_numpy()[:, None] < windows["end"].to_numpy()[None, :]) \
        & (windows["start"].to_numpy()[None, :] < regions["end"].to_numpy()[:, None])
    mat = overlap_matrix(regions, windows)
    assert dense.sum() > 50
    np.testing.assert_array_equal(mat.toarray(), dense.astype(np.int64))


GTF = """#!genome-build test
#!comment a line # with a hash
chr1\tTEST\tgene\t101\t200\t.\t+\t.\tgene_id "G1.1"; gene_type "protein_coding"; gene_name "Alpha";
chr1\tTEST\ttranscript\t101\t200\t.\t+\t.\tgene_id "G1.1"; transcript_id "T1"; gene_name "Alpha";
chr1\tTEST\texon\t101\t150\t.\t+\t.\tgene_id "G1.1"; transcript_id "T1"; gene_name "Alpha";
chr2\tTEST\tgene\t1\t1\t.\t-\t.\tgene_id "G2.1"; gene_type "lncRNA";
chrY\tTEST\tgene\t5001\t6000\t.\t+\t.\tgene_id "G3.1"; gene_name "Alpha";
chrX\tTEST\tgene\t301\t400\t.\t-\t.\tgene_id "G4.1"; gene_name "Beta";
"""


@pytest.mark.parametrize("name", ["genes.gtf", "genes.gtf.gz", "annotation.txt"])
def test_gtf_is_read_zero_based(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(GTF)
    else:
        path.write_text(GTF)  # a GTF without its suffix is recognised by its lines
    genes = read_gene_table(path)
    assert list(genes.columns) == ["gene_name", "chrom", "start", "end", "strand"]
    # gene rows only; the name falls back to gene_id; a repeated name keeps its first row
    assert list(genes["gene_name"]) == ["Alpha", "G2.1", "Beta"]
    assert genes.iloc[0].tolist() == ["Alpha", "chr1", 100, 200, "+"]
    assert genes.iloc[1].tolist() == ["G2.1", "chr2", 0, 1, "-"]  # one base: [0, 1)
    assert genes.iloc[2].tolist() == ["Beta", "chrX", 300, 400, "-"]


HEADER = "gene_name\tchrom\tstart\tend\tstrand\n"
BAD_TABLES = [  # (id, text, field, problem)
    ("no-strand-column", "gene_name\tchrom\tstart\tend\nA\tchr1\t1\t5\n", "strand", "missing column"),
    ("strand-dot", HEADER + "A\tchr1\t1\t5\t+\nB\tchr1\t1\t5\t.\n", "strand", "line 3 ('B')"),
    ("empty-interval", HEADER + "A\tchr1\t10\t10\t+\n", "end", "end <= start"),
    ("float-start", HEADER + "A\tchr1\t1.5e3\t5000\t+\n", "start", "not an integer"),
    ("word-end", HEADER + "A\tchr1\t1\tbig\t+\n", "end", "not an integer"),
    ("extra-field", HEADER + "A\tchr1\t1\t5\t+\textra\n", "columns", "more tab-separated fields"),
    ("short-row", HEADER + "A\tchr1\t1\t5\n", "strand", "line 2 ('A'): strand is not + or -"),
    ("header-only", HEADER, "rows", "empty table"),
    ("empty-file", "", "rows", "empty table"),
]


@pytest.mark.parametrize(("text", "field", "problem"), [b[1:] for b in BAD_TABLES], ids=[b[0] for b in BAD_TABLES])
def test_bad_tables_give_one_line(tmp_path: Path, text: str, field: str, problem: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        read_gene_table(path)
    msg = str(err.value)
    assert err.value.field == field and str(path) in msg and problem in msg and "\n" not in msg


def test_bad_gtf_start_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.gtf"
    path.write_text('chr1\tT\tgene\t0\t10\t.\t+\t.\tgene_id "X";\n')  # GTF is 1-based: 0 is no position
    with pytest.raises(InputError, match=r"start: line 1 .*negative start"):
        read_gene_table(path)
    path.write_text('chr1\tT\texon\t1\t10\t.\t+\t.\tgene_id "X";\n')
    with pytest.raises(InputError, match="feature: no 'gene' rows"):
        read_gene_table(path)


def _mosaic_store(tmp: Path, backend: str) -> tuple[Path, np.ndarray]:
    """RNA for 9 cells, ATAC (the hand-made regions) for the first 7: c7 and c8 lack ATAC, and c6's
    only ATAC counts are in regions outside every window. Returns the store and the ATAC counts."""
    rng = np.random.default_rng(5)
    n_atac, n_reg = 7, len(REGIONS)
    atac = rng.integers(0, 4, (n_atac, n_reg)) * (rng.random((n_atac, n_reg)) < 0.6)
    atac[:, 0] += 1  # every cell with ATAC has counts
    outside = [i for i, hit in enumerate(REGIONS.values()) if not hit]
    atac[6] = 0
    atac[6, outside[:3]] = [2, 1, 5]
    names = [f"c{i}" for i in range(9)]
    write_h5ad(tmp / "rna.h5ad", random_counts(9, 6, 1), obs_names=names,
               obs={"kind": ["a", "b", "c"] * 3})
    write_h5ad(tmp / "atac.h5ad", sp.csr_matrix(atac), obs_names=names[:n_atac], var_names=list(REGIONS))
    uri = tmp / f"src.{backend}"
    ingest(str(uri), [f"RNA={tmp / 'rna.h5ad'}", f"ATAC={tmp / 'atac.h5ad'}"],
           IngestOptions(label_key="kind", n_top_genes=3, progress=False))
    return uri, atac


def _read_plain(out: Path, backend: str) -> tuple[sp.csr_matrix, list[str], list[str], pd.DataFrame]:
    """GA counts, obs_id and var_id as plain anndata / tiledbsoma see them (no project code)."""
    if backend == "zarr":
        plain = ad.read_zarr(out / "mod" / "GA")
        return sp.csr_matrix(plain.X), list(plain.obs_names), list(plain.var_names), plain.var
    import tiledbsoma

    with tiledbsoma.Experiment.open(str(out)) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "obs_id"]).concat().to_pandas().sort_values("soma_joinid")
        var = exp.ms["GA"].var.read().concat().to_pandas().sort_values("soma_joinid")
        tbl = exp.ms["GA"].X["counts"].read().tables().concat()
    mat = sp.csr_matrix((tbl["soma_data"].to_numpy(), (tbl["soma_dim_0"].to_numpy(), tbl["soma_dim_1"].to_numpy())),
                        shape=(len(obs), len(var)))
    return mat, list(obs["obs_id"]), list(var["var_id"]), var.set_index("var_id")


@pytest.mark.parametrize("backend", ["soma", "zarr"])
def test_end_to_end_on_a_mosaic_store(tmp_path: Path, genes_tsv: Path, backend: str) -> None:
    src, atac = _mosaic_store(tmp_path, backend)
    out = tmp_path / f"ga.{backend}"
    report = gene_activity(str(src), genes_tsv, str(out), genes=["GM", "NOPE", "GP", "GC"], chunk_cells=2,
                           progress=False)
    wanted = ["GM", "GP", "GC"]
    assert (report.n_cells, report.n_genes, report.n_genes_missing, report.n_regions) == (9, 3, 1, len(REGIONS))
    assert report.n_regions_overlapping == sum(bool(hit & set(wanted)) for hit in REGIONS.values())
    with open_store(src) as source:
        src_obs = source.obs()
    rows = pd.Index(src_obs.index).get_indexer([f"c{i}" for i in range(7)])  # ATAC's cells in the store
    expected = np.zeros((9, 3), dtype=np.int64)
    expected[rows] = atac @ _expected(wanted)
    mat, obs_ids, var_ids, var = _read_plain(out, backend)
    assert obs_ids == list(src_obs.index) and var_ids == wanted
    np.testing.assert_array_equal(mat.toarray(), expected)
    assert var.loc["GM", "chrom"] == "chr1" and int(var.loc["GM", "end"]) == 62000
    assert int(var.loc["GP", "start"]) == 8000 and var.loc["GM", "strand"] == "-"
    with open_store(out) as store:
        assert store.modalities == ["GA"] and store.n_obs == 9 and store.info.stats_n_obs == 9
        np.testing.assert_array_equal(store.read("GA", 0, 9).toarray(), expected)
        obs = store.obs()
        assert list(obs.index) == list(src_obs.index)
        assert list(obs["cell_type"]) == list(src_obs["cell_type"])
        np.testing.assert_array_equal(obs["total_counts_GA"], expected.sum(axis=1))
        np.testing.assert_array_equal(obs["n_features_GA"], (expected > 0).sum(axis=1))
        # c7, c8 lack ATAC; c6 has ATAC but nothing in a window: neither "has" GA (no zero libraries)
        assert list(obs.index[~obs["has_GA"]]) == ["c6", "c7", "c8"]
        np.testing.assert_array_equal(store.var("GA")["total_counts"], expected.sum(axis=0))
        assert "GA" in store.summary()
    with pytest.raises(StoreError, match="already exists"):
        gene_activity(str(src), genes_tsv, str(out), progress=False)


def test_cli_summary_and_bad_table(tmp_path: Path, genes_tsv: Path, capsys) -> None:
    src, _ = _mosaic_store(tmp_path, "zarr")
    out = tmp_path / "ga.zarr"
    bad = tmp_path / "bad.tsv"
    bad.write_text("gene_name\tchrom\tstart\tend\tstrand\nA\tchr1\t1\t5\t*\n")
    assert main(["gene-activity", "--store", str(src), "--genes", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "strand" in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".ga.zarr*"))  # nothing left behind
    ensembl = tmp_path / "ensembl.tsv"  # chromosomes named 1, 2 ... against peaks on chr1, chr2 ...
    ensembl.write_text(re.sub(r"\tchr(\d)", r"\t\1", GENES_TSV))
    assert main(["gene-activity", "--store", str(src), "--genes", str(ensembl), "--out", str(out)]) == 2
    assert "no ATAC region overlaps a gene window" in capsys.readouterr().err
    assert main(["gene-activity", "--store", str(src), "--genes", str(genes_tsv), "--out", str(out),
                 "--no-progress", "--upstream", "0"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "9 cells x 4 genes" in line and str(out) in line
    with open_store(out) as store:  # --upstream 0: GP's 1.5 kb upstream region no longer counts
        assert int(store.var("GA").loc["GP", "start"]) == 10000


def test_snare_peaks_cover_its_rna_genes(data_dir: Path) -> None:
    genes = read_gene_table(data_dir / "annotations" / "mm10_genes.tsv.gz")
    assert len(genes) == genes["gene_name"].nunique() > 40_000
    rna = ad.read_h5ad(data_dir / "mouse_cortex_snare" / "rna.h5ad", backed="r").var_names
    peaks = ad.read_h5ad(data_dir / "mouse_cortex_snare" / "atac.h5ad", backed="r").var_names
    windows = gene_windows(genes[genes["gene_name"].isin(rna)].reset_index(drop=True))
    assert len(windows) == len(rna) == 1677
    mat = overlap_matrix(parse_regions(list(peaks)), windows)
    covered = int((np.diff(mat.tocsc().indptr) > 0).sum())
    assert 1600 <= covered <= len(rna)
