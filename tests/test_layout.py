"""The wire format of blocks and the pre-shuffled training layout (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import PLANTED_N, make_planted_stores, random_counts, write_h5ad

from scmm_atlas.data.blocks import CompactBlock, SparseBlock, compact_arrays
from scmm_atlas.data.layout import Layout, is_validation, layout_uri, read_info
from scmm_atlas.data.prepare import prepare_layout
from scmm_atlas.data.store_blocks import StoreBlockReader
from scmm_atlas.ingest.stats import compute_stats
from scmm_atlas.ingest.write import IngestOptions, ingest
from scmm_atlas.store import StoreError, open_store


def test_compact_arrays_round_trip_keeps_values_and_picks_compact_dtypes() -> None:
    rng = np.random.default_rng(0)
    small = sp.random(50, 300, density=0.2, format="csr", random_state=1, dtype=np.float64)
    small.data = rng.integers(1, 1000, small.nnz).astype(np.int32)
    big = sp.random(50, 70_000, density=0.001, format="csr", random_state=2, dtype=np.float64)
    big.data = rng.integers(1, 100_000, big.nnz).astype(np.int32)
    obs = {"cell": np.arange(50, dtype=np.int64), "batch": rng.integers(0, 3, 50).astype(np.int32),
           "has_A": rng.random(50) < 0.5, "library_A": rng.random(50).astype(np.float32)}
    arrays = compact_arrays(SparseBlock({"A": small.astype(np.int32), "B": big.astype(np.int32)}, obs))
    assert arrays["A/indices"].dtype == np.uint16 and arrays["A/data"].dtype == np.uint16
    assert arrays["B/indices"].dtype == np.int32 and arrays["B/data"].dtype == np.int32  # too wide for uint16
    block = CompactBlock(arrays, {"A": 300, "B": 70_000})
    assert len(block) == 50
    out = block.take(np.arange(50))
    for mod, mat in (("A", small), ("B", big)):
        assert out.counts[mod].dtype == np.float32 and out.counts[mod].shape == mat.shape
        np.testing.assert_array_equal(out.counts[mod].toarray(), mat.toarray())
    for key, values in obs.items():
        np.testing.assert_array_equal(out.obs[key], values)
    rows = np.array([7, 3, 3, 49, 0, 12])  # any order, repeats, rows without values (B is ~93 % empty rows)
    some = block.take(rows)
    for mod, mat in (("A", small), ("B", big)):
        np.testing.assert_array_equal(some.counts[mod].toarray(), mat[rows].toarray())
    np.testing.assert_array_equal(some.obs["library_A"], obs["library_A"][rows])
    assert block.take(np.array([], dtype=np.int64)).counts["A"].shape == (0, 300)


@pytest.fixture()
def stores(tmp_path: Path) -> dict[str, Path]:
    return make_planted_stores(tmp_path)


def _layout_rows(uri: Path, split: str = "train") -> dict[str, np.ndarray]:
    layout = Layout(layout_uri(open_store(uri).uri), split)
    return layout.read(0, layout.n_cells)


def test_layout_holds_every_cell_once_shuffled_with_its_own_rows(stores) -> None:
    for uri in stores.values():
        with open_store(uri) as store:
            info, what = prepare_layout(store, shard_cells=300, chunk_cells=128, val_fraction=0)
            assert "wrote 1,000 training + 0 held-out cells (4 shards)" in what and info.n_cells() == PLANTED_N
            expected = StoreBlockReader(store).read(0, PLANTED_N)
        rows = _layout_rows(uri)
        cells = rows["cell"]
        np.testing.assert_array_equal(np.sort(cells), np.arange(PLANTED_N))
        assert abs(np.corrcoef(cells, np.arange(PLANTED_N))[0, 1]) < 0.1  # not the store's order
        rna = sp.csr_matrix((rows["RNA/data"], rows["RNA/indices"], rows["RNA/indptr"]), shape=(PLANTED_N, 20))
        np.testing.assert_array_equal(rna.toarray(), expected.counts["RNA"][cells].toarray())
        np.testing.assert_array_equal(rows["batch"], cells % 3)
        np.testing.assert_array_equal(rows["has_ADT"], cells < PLANTED_N - 100)
        np.testing.assert_array_equal(rows["library_RNA"], expected.obs["library_RNA"][cells])


def test_both_backends_get_the_same_layout(stores) -> None:
    for uri in stores.values():
        with open_store(uri) as store:
            prepare_layout(store, seed=3, val_fraction=0.2)
    for split in ("train", "val"):
        a, b = (_layout_rows(stores[k], split) for k in ("soma", "zarr"))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_appended_cells_get_their_own_shards_and_old_ones_stay(stores, tmp_path: Path) -> None:
    uri = stores["zarr"]
    with open_store(uri) as store:
        first, _ = prepare_layout(store, shard_cells=400)
        held = is_validation(store.obs_id_hashes(), 0.1)
    assert 50 < held.sum() < 150
    before = {s: _layout_rows(uri, s) for s in ("train", "val")}
    more = random_counts(150, 20, 7)
    write_h5ad(tmp_path / "more.h5ad", more, obs_names=[f"new{i}" for i in range(150)], obs={"donor": ["b9"] * 150})
    ingest(str(uri), [f"RNA={tmp_path / 'more.h5ad'}"], IngestOptions(append=True, batch_key="donor", progress=False))
    with open_store(uri) as store:
        info, what = prepare_layout(store, shard_cells=400)
        assert "added" in what and "(2 shards)" in what
        assert info.batches == ["b0", "b1", "b2", "b9"]
        for split in ("train", "val"):
            assert info.splits[split][: len(first.splits[split])] == first.splits[split]
        assert prepare_layout(store)[1].startswith("layout up to date")
        held_now = is_validation(store.obs_id_hashes(), 0.1)
    np.testing.assert_array_equal(held_now[:PLANTED_N], held)  # old cells keep their assignment
    after = {s: _layout_rows(uri, s) for s in ("train", "val")}
    for split in ("train", "val"):
        n_old = len(before[split]["cell"])
        for key in ("cell", "batch", "RNA/data", "RNA/indices"):
            np.testing.assert_array_equal(after[split][key][: len(before[split][key])], before[split][key])
        new_cells = after[split]["cell"][n_old:]
        assert (new_cells >= PLANTED_N).all() and (after[split]["batch"][n_old:] == 3).all()
        np.testing.assert_array_equal(np.sort(after[split]["cell"]), np.flatnonzero(held_now == (split == "val")))


def test_a_new_feature_selection_rebuilds_the_layout_and_removes_the_old_shards(stores) -> None:
    uri = stores["zarr"]
    with open_store(uri) as store:
        old, _ = prepare_layout(store)
    with open_store(uri, writable=True) as store:
        compute_stats(store, n_top_genes=10)
    with open_store(uri) as store:
        new, what = prepare_layout(store)
    assert new.selection != old.selection and new.n_features["RNA"] == 10 and "wrote" in what
    names = {p.name for p in (uri / "train_layout" / "shards").iterdir() if p.is_dir()}
    live = {n for shards in new.splits.values() for n, _ in shards}
    assert names == live and not names & {n for shards in old.splits.values() for n, _ in shards}


def test_no_layout_reads_as_none_and_opening_one_says_what_to_run(stores) -> None:
    loc = layout_uri(open_store(stores["soma"]).uri)
    assert read_info(loc) is None
    with pytest.raises(StoreError, match="no training layout here: run `scmm-atlas prepare"):
        Layout(loc)
