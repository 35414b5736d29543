"""Differential features of clusters and of sub-clusters inside labels, on data with planted markers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scmm_atlas.evaluate.markers import COLUMNS, markers


def _planted(seed: int = 0):
    """Types T (two sub-states, 150 cells each) and B (200 cells). Gene g3 marks B; inside T, protein
    P1 is high in one sub-state and P2 in the other; the embedding separates all three groups."""
    rng = np.random.default_rng(seed)
    state = np.repeat([0, 1, 2], [150, 150, 200])  # T/a, T/b, B
    labels = np.where(state < 2, "T", "B")
    centres = np.array([[0.0, 0, 0], [4, 0, 0], [30, 30, 0]])
    emb = centres[state] + rng.normal(0, 0.5, (len(state), 3))
    rna_rate = np.full((len(state), 8), 3.0)
    rna_rate[state == 2, 3] = 40
    adt_rate = np.full((len(state), 4), 20.0)
    adt_rate[state == 0, 1] = 300
    adt_rate[state == 1, 2] = 300
    rna = sp.csr_matrix(rng.poisson(rna_rate).astype(np.float32))
    adt = rng.poisson(adt_rate).astype(np.float32)
    return emb, labels, {"RNA": (rna, [f"g{i}" for i in range(8)]), "ADT": (adt, [f"P{i}" for i in range(4)])}


@pytest.mark.slow
def test_markers_find_the_planted_features():
    emb, labels, counts = _planted()
    table = markers(emb, counts, labels=labels, resolution=0.1, sub_resolution=0.1, top=3)
    assert list(table.columns) == COLUMNS
    clusters = table[(table.level == "cluster") & (table.modality == "RNA") & (table["rank"] == 1)]
    top = dict(zip(clusters.n_cells, clusters.feature, strict=True))
    assert top[200] == "g3"  # B's marker, up in B
    sub = table[(table.level == "subcluster") & (table.modality == "ADT") & (table["rank"] == 1)]
    assert sorted(sub.group.str.split("/").str[0]) == ["T", "T"]  # B has no sub-states at this resolution
    assert sorted(sub.feature) == ["P1", "P2"]  # each T sub-state's top protein is its own
    first = sub.iloc[0]
    assert first.log2fc > 2 and first.pval_adj < 1e-10 and first.frac_in >= first.frac_out


def test_markers_skip_small_labels_and_single_groups():
    emb, labels, counts = _planted()
    table = markers(emb, counts, labels=labels, resolution=0.1, sub_resolution=0.1, min_cells=350)
    assert (table.level == "cluster").all()  # no label has 350 cells
    alone = markers(emb[:150], {m: (x[:150], n) for m, (x, n) in counts.items()}, resolution=0.01)
    assert list(alone.columns) == COLUMNS and alone.empty  # one cluster: nothing to compare
