"""Bad input: a clear one-line error naming the file and field, and the store unchanged (or absent)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import random_counts, tree_digest, write_h5ad

from scmm_atlas.cli import main
from scmm_atlas.store import open_store

Case = Callable[[Path], tuple[list[str], str, str]]  # tmp -> (inputs, file named, field named)


def _rna(tmp: Path, x=None, **kw) -> Path:
    return write_h5ad(tmp / "bad_rna.h5ad", random_counts(40, 30, 7) if x is None else x, **kw)


def _adt(tmp: Path, **kw) -> Path:
    return write_h5ad(tmp / "bad_adt.h5ad", random_counts(40, 5, 8), var_names=[f"p{j}" for j in range(5)], **kw)


def _with_value(value: float) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        x = random_counts(40, 30, 7)
        x.data[5] = value
        return _rna(tmp, x)

    return make


def missing_file(tmp):
    return [f"RNA={tmp / 'nope.h5ad'}", f"ADT={_adt(tmp)}"], "nope.h5ad", "path"


def corrupt_file(tmp):
    p = tmp / "bad_rna.h5ad"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"truncated" * 10)
    return [f"RNA={p}", f"ADT={_adt(tmp)}"], "bad_rna.h5ad", "format"


def text_as_h5ad(tmp):
    p = tmp / "bad_rna.h5ad"
    p.write_text("barcode,gene\nAAA,1\n")
    return [f"RNA={p}", f"ADT={_adt(tmp)}"], "bad_rna.h5ad", "format"


def h5mu_named_h5ad(tmp):
    p = tmp / "bad_rna.h5ad"
    with h5py.File(p, "w") as f:
        f.create_group("mod").create_group("rna")
    return [f"RNA={p}", f"ADT={_adt(tmp)}"], "bad_rna.h5ad", "format"


def h5ad_named_10x(tmp):
    p = tmp / "bad_matrix.h5"
    shutil.copy(_rna(tmp), p)
    return [str(p)], "bad_matrix.h5", "matrix"


def nan_counts(tmp):
    return [f"RNA={_with_value(np.nan)(tmp)}", f"ADT={_adt(tmp)}"], "bad_rna.h5ad", "X"


def inf_counts(tmp):
    return [f"RNA={_with_value(np.inf)(tmp)}", f"ADT={_adt(tmp)}"], "bad_rna.h5ad", "X"


def negative_counts(tmp):
    return [f"RNA={_with_value(-3)(tmp)}", f"ADT={_adt(tmp)}"], "bad_rna.h5ad", "X"


def fractional_counts(tmp):
    return [f"RNA={_with_value(0.37)(tmp)}", f"ADT={_adt(tmp)}"], "bad_rna.h5ad", "X"


def duplicate_barcodes(tmp):
    names = [f"c{i}" for i in range(40)]
    names[7] = "c3"
    return [f"RNA={_rna(tmp, obs_names=names)}", f"ADT={_adt(tmp)}"], "bad_rna.h5ad", "obs_names"


def duplicate_features(tmp):
    genes = [f"g{j}" for j in range(30)]
    genes[4] = "g2"
    return [f"RNA={_rna(tmp, var_names=genes)}", f"ADT={_adt(tmp)}"], "bad_rna.h5ad", "var_names"


def no_overlap(tmp):
    adt = _adt(tmp, obs_names=[f"other{i}" for i in range(40)])
    return [f"RNA={_rna(tmp)}", f"ADT={adt}"], "bad_rna.h5ad", "obs_names"


def empty_modality(tmp):
    p = write_h5ad(tmp / "bad_adt.h5ad", sp.csr_matrix((40, 0)))
    return [f"RNA={_rna(tmp)}", f"ADT={p}"], "bad_adt.h5ad", "X"


def all_zero_modality(tmp):
    p = write_h5ad(tmp / "bad_adt.h5ad", sp.csr_matrix((40, 5)), var_names=[f"p{j}" for j in range(5)])
    return [f"RNA={_rna(tmp)}", f"ADT={p}"], "bad_adt.h5ad", "X"


def csc_matrix(tmp):
    p = write_h5ad(tmp / "bad_rna.h5ad", sp.csc_matrix(random_counts(40, 30, 7)))
    return [f"RNA={p}", f"ADT={_adt(tmp)}"], "bad_rna.h5ad", "X"


def differing_features(tmp):
    genes = [f"gene_{j}" for j in range(30)]
    return [f"RNA={_rna(tmp, var_names=genes)}", f"ADT={_adt(tmp)}"], "bad_rna.h5ad", "var_names"


def repeated_entries_past_int32(tmp):
    """Each entry fits 32 bits; the two entries of one (cell, gene), summed when stored, do not."""
    x = sp.csr_matrix((np.array([2e9, 2e9, 5.0]), np.array([0, 0, 1]), np.array([0, 2, 3])), shape=(2, 30))
    return [f"RNA={_rna(tmp, x, obs_names=['a', 'b'])}"], "bad_rna.h5ad", "X"


def matrix_market(tmp):
    """Named in the docs of other tools: refused with what to do instead."""
    import scipy.io

    p = tmp / "matrix.mtx"
    scipy.io.mmwrite(p, random_counts(40, 30, 7))
    return [f"RNA={p}", f"ADT={_adt(tmp)}"], "matrix.mtx", "path"


def missing_batch_column(tmp):
    return [f"RNA={_rna(tmp)}", f"ADT={_adt(tmp)}", "--batch-key", "donor"], "bad_rna.h5ad", "obs/donor"


CASES = [missing_file, corrupt_file, text_as_h5ad, h5mu_named_h5ad, h5ad_named_10x, nan_counts, inf_counts,
         negative_counts, fractional_counts, duplicate_barcodes, duplicate_features, no_overlap, empty_modality,
         all_zero_modality, csc_matrix, missing_batch_column, repeated_entries_past_int32, matrix_market]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def _check_message(line: str, fname: str, field: str) -> None:
    """``error: WHERE: FIELD: problem`` with the file in WHERE and the field in FIELD."""
    where, field_part, problem = line.removeprefix("error: ").split(": ", 2)
    assert fname in where, line
    assert field in field_part, line
    assert problem, line


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input_new_store_not_created(case: Case, tmp_path: Path, capsys) -> None:
    inputs, fname, field = case(tmp_path)
    uri = tmp_path / "new.soma"
    assert main(["ingest", "--store", str(uri), "--no-progress", *inputs]) == 2
    _check_message(_error_line(capsys), fname, field)
    assert not uri.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new.soma")]  # no staging left behind


@pytest.fixture(params=["soma", "zarr"])
def existing_store(request, tmp_path: Path, pair) -> Path:
    rna, adt = pair
    uri = tmp_path / f"existing.{request.param}"
    assert main(["ingest", "--store", str(uri), "--no-progress", "--dataset", "a",
                 f"RNA={rna}", f"ADT={adt}"]) == 0
    rna.rename(tmp_path / "a_rna.h5ad")
    adt.rename(tmp_path / "a_adt.h5ad")
    return uri


APPEND_CASES = [c for c in CASES if c is not h5ad_named_10x] + [differing_features]


@pytest.mark.parametrize("case", APPEND_CASES, ids=lambda c: c.__name__)
def test_bad_append_leaves_store_byte_identical(case: Case, existing_store: Path, tmp_path: Path, capsys) -> None:
    before = tree_digest(existing_store)
    capsys.readouterr()
    inputs, fname, field = case(tmp_path)
    rc = main(["ingest", "--store", str(existing_store), "--append", "--no-progress", "--dataset", "b",
               "--prefix-barcodes", *inputs])
    assert rc == 2
    _check_message(_error_line(capsys), fname, field)
    assert tree_digest(existing_store) == before


def test_appended_duplicate_barcodes_refused(existing_store: Path, tmp_path: Path, capsys) -> None:
    before = tree_digest(existing_store)
    capsys.readouterr()
    rna = write_h5ad(tmp_path / "again_rna.h5ad", random_counts(60, 30, 3))
    adt = write_h5ad(tmp_path / "again_adt.h5ad", random_counts(60, 5, 4), var_names=[f"p{j}" for j in range(5)])
    assert main(["ingest", "--store", str(existing_store), "--append", "--no-progress",
                 f"RNA={rna}", f"ADT={adt}"]) == 2
    line = _error_line(capsys)
    _check_message(line, "again_rna.h5ad", "obs_names")
    assert "--prefix-barcodes" in line
    assert tree_digest(existing_store) == before


@pytest.mark.parametrize("what", ["empty_dir", "plain_files", "missing"])
def test_uri_that_is_not_a_store(what: str, tmp_path: Path, pair, capsys) -> None:
    uri = tmp_path / "not_a_store"
    if what != "missing":
        uri.mkdir()
    if what == "plain_files":
        (uri / "notes.txt").write_text("hello")
    before = tree_digest(uri) if uri.exists() else None
    rna, adt = pair
    assert main(["ingest", "--store", str(uri), "--append", "--no-progress", f"RNA={rna}", f"ADT={adt}"]) == 2
    _check_message(_error_line(capsys), "not_a_store", "uri")
    assert main(["info", "--store", str(uri)]) == 2
    _check_message(_error_line(capsys), "not_a_store", "uri")
    assert (tree_digest(uri) if uri.exists() else None) == before


def test_create_over_existing_path_refused(tmp_path: Path, pair, capsys) -> None:
    uri = tmp_path / "taken"
    uri.mkdir()
    (uri / "keep.txt").write_text("precious")
    rna, adt = pair
    assert main(["ingest", "--store", str(uri), "--no-progress", f"RNA={rna}", f"ADT={adt}"]) == 2
    line = _error_line(capsys)
    _check_message(line, "taken", "uri")
    assert "not a store" in line and "--append" not in line  # appending to it would fail too
    assert (uri / "keep.txt").read_text() == "precious"
    store = tmp_path / "store.zarr"
    assert main(["ingest", "--store", str(store), "--no-progress", "--no-stats", f"RNA={rna}", f"ADT={adt}"]) == 0
    assert main(["ingest", "--store", str(store), "--no-progress", f"RNA={rna}", f"ADT={adt}"]) == 2
    assert "a store already exists here: use --append" in _error_line(capsys)


def test_failed_statistics_leave_no_store_in_place(tmp_path: Path, pair, monkeypatch) -> None:
    """A new store is moved into place only when complete, statistics included: a failure there
    leaves nothing behind, and the same command then succeeds."""
    from scmm_atlas.ingest import stats
    from scmm_atlas.ingest.write import IngestOptions, ingest

    rna, adt = pair
    uri = tmp_path / "new.zarr"

    def broken(*args, **kwargs):
        raise RuntimeError("statistics failed")

    monkeypatch.setattr(stats, "compute_stats", broken)
    with pytest.raises(RuntimeError, match="statistics failed"):
        ingest(str(uri), [f"RNA={rna}", f"ADT={adt}"], IngestOptions(progress=False))
    assert not uri.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".new.zarr")]
    monkeypatch.undo()
    ingest(str(uri), [f"RNA={rna}", f"ADT={adt}"], IngestOptions(progress=False))
    with open_store(uri) as store:
        assert store.info.selection  # statistics recorded


def test_zero_count_cells_dropped_with_counted_warning(tmp_path: Path, caplog) -> None:
    from scmm_atlas.ingest.write import IngestOptions, ingest
    from scmm_atlas.store import open_store

    rna_x = random_counts(40, 30, 7).tolil()
    rna_x[[3, 9], :] = 0  # RNA empty for two cells: they keep their ADT
    adt_x = random_counts(40, 5, 8).tolil()
    adt_x[[9, 20], :] = 0  # cell 9 is empty in both: dropped entirely
    rna = write_h5ad(tmp_path / "rna.h5ad", rna_x.tocsr())
    adt = write_h5ad(tmp_path / "adt.h5ad", adt_x.tocsr(), var_names=[f"p{j}" for j in range(5)])
    uri = tmp_path / "z.zarr"
    with caplog.at_level("WARNING"):
        report = ingest(str(uri), [f"RNA={rna}", f"ADT={adt}"], IngestOptions(progress=False))
    assert report.zero_dropped == {"RNA": 2, "ADT": 2}
    assert report.cells_dropped == 1
    assert "2 cells with zero total counts dropped from RNA" in caplog.text
    with open_store(uri) as store:
        obs = store.obs()
        assert store.n_obs == 39 and "c9" not in obs.index
        assert not obs.loc["c3", "has_RNA"] and obs.loc["c3", "has_ADT"]
        for mod in ("RNA", "ADT"):
            present = obs[f"has_{mod}"].to_numpy()
            totals = np.asarray(store.read(mod, 0, store.n_obs).sum(axis=1)).ravel()
            assert (totals[present] > 0).all() and (totals[~present] == 0).all()


def test_gzipped_input_and_wording_say_what_to_do(tmp_path: Path, capsys) -> None:
    import gzip

    gz = tmp_path / "rna.h5ad"
    gz.write_bytes(gzip.compress(_rna(tmp_path).read_bytes()))
    adt = _adt(tmp_path)
    assert main(["ingest", "--store", str(tmp_path / "a.zarr"), "--no-progress", f"RNA={gz}", f"ADT={adt}"]) == 2
    line = _error_line(capsys)
    _check_message(line, "rna.h5ad", "format")
    assert "gzip-compressed: decompress it (gunzip)" in line
    inputs, _, _ = text_as_h5ad(tmp_path)
    assert main(["ingest", "--store", str(tmp_path / "b.zarr"), "--no-progress", *inputs]) == 2
    assert "so not an AnnData .h5ad file" in _error_line(capsys)


def test_layer_per_modality(tmp_path: Path, capsys) -> None:
    """RNA counts in a layer (X holds normalised values), protein counts in X: --layer RNA=counts."""
    import anndata as ad

    counts = random_counts(40, 30, 7)
    rna = ad.AnnData(np.log1p(counts.toarray()).astype(np.float32),
                     obs=pd.DataFrame(index=[f"c{i}" for i in range(40)]),
                     var=pd.DataFrame(index=[f"g{j}" for j in range(30)]), layers={"counts": counts.astype(np.float32)})
    rna.write_h5ad(tmp_path / "rna.h5ad")
    adt = _adt(tmp_path)
    inputs = [f"RNA={tmp_path / 'rna.h5ad'}", f"ADT={adt}"]
    assert main(["ingest", "--store", str(tmp_path / "x.zarr"), "--no-progress", *inputs]) == 2  # X is not counts
    assert "rna.h5ad: X: contains non-integer values" in _error_line(capsys)
    assert main(["ingest", "--store", str(tmp_path / "y.zarr"), "--no-progress", "--layer", "counts", *inputs]) == 2
    assert "bad_adt.h5ad: layers/counts: missing: this input has no layer 'counts'" in _error_line(capsys)
    assert main(["ingest", "--store", str(tmp_path / "z.zarr"), "--no-progress", "--layer", "RNA=counts",
                 "--layer", "ATAC=counts", *inputs]) == 2
    assert "--layer: no input modality ATAC" in _error_line(capsys)
    assert main(["ingest", "--store", str(tmp_path / "ok.zarr"), "--no-progress", "--layer", "RNA=counts",
                 *inputs]) == 0
    with open_store(tmp_path / "ok.zarr") as store:
        np.testing.assert_array_equal(store.read("RNA", 0, 40).toarray(), counts.toarray())
        np.testing.assert_array_equal(store.read("ADT", 0, 40).toarray(),
                                      ad.read_h5ad(adt).X.toarray())
