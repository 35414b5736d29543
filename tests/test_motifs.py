"""Motif annotation of ATAC programs: scanning, thresholds, GC-matched background and enrichment on a
synthetic genome (random sequence written as FASTA), and the table through ``infer --genome`` and
``query programs --motifs``."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from scmm_atlas.errors import InputError
from scmm_atlas.infer.motifs import (
    COLUMNS,
    MotifSet,
    annotate,
    enrichment,
    gc_content,
    load_motifs,
    matched_background,
    peak_sequences,
    scan,
    score_threshold,
)
from scmm_atlas.store.regions import parse_regions

pytestmark = pytest.mark.slow  # end-to-end: the full tier (make test), not the edit-test loop

PLANTED = "MA0138.3"  # REST: a 20 bp high-information site that no other JASPAR motif's threshold takes
CHROM = 300_000
N_BLOCK = (100_000, 101_000)  # chr1: N only


@pytest.fixture(scope="module")
def motifs():
    return load_motifs()


def _write_fasta(path: Path, chroms: dict[str, np.ndarray]) -> Path:
    with path.open("w") as f:
        for name, codes in chroms.items():
            seq = "".join(np.array(list("ACGTN"))[codes])
            f.write(f">{name}\n" + "\n".join(seq[i : i + 60] for i in range(0, len(seq), 60)) + "\n")
    return path


@pytest.fixture(scope="module")
def genome(tmp_path_factory, motifs) -> dict:
    """chr1: uniform bases, an N block; chr2: 10 kb blocks of GC 0.35 and 0.65 in turn. Peaks: 500 bp
    every kb. Two FASTAs of the same sequence: ``plain``, and ``planted`` with the REST consensus
    in the middle of 40 chr1 peaks (alternately on either strand)."""
    tmp, rng = tmp_path_factory.mktemp("genome"), np.random.default_rng(7)
    chr1 = rng.integers(0, 4, CHROM)
    chr1[N_BLOCK[0] : N_BLOCK[1]] = 4
    gc_rich = (np.arange(CHROM) // 10_000) % 2 == 1
    p_gc = np.where(gc_rich, 0.65, 0.35)[:, None] * np.array([0, 0.5, 0.5, 0]) + np.where(
        gc_rich, 0.35, 0.65)[:, None] * np.array([0.5, 0, 0, 0.5])
    chr2 = (rng.random(CHROM)[:, None] > np.cumsum(p_gc, 1)).sum(1)
    peaks = [f"chr{c}:{s}-{s + 500}" for c in (1, 2) for s in range(0, CHROM, 1000)]
    plain = _write_fasta(tmp / "plain.fa", {"chr1": chr1, "chr2": chr2})
    w = motifs.weights[motifs.ids.index(PLANTED)]
    site = w.argmax(1)
    on_chr1 = [p for p in peaks[:300] if not N_BLOCK[0] <= int(p.split(":")[1].split("-")[0]) < N_BLOCK[1]]
    chosen = [on_chr1[i] for i in rng.choice(len(on_chr1), 40, replace=False)]
    planted = chr1.copy()
    for i, p in enumerate(chosen):
        start = int(p.split(":")[1].split("-")[0]) + 240
        planted[start : start + len(site)] = site if i % 2 else 3 - site[::-1]  # the reverse complement
    return {"plain": plain, "planted": _write_fasta(tmp / "planted.fa", {"chr1": planted, "chr2": chr2}),
            "peaks": peaks, "chosen": chosen, "gc_rich": [p for p in peaks[300:] if gc_rich[int(p[5:].split("-")[0])]]}


def _programs(groups: dict[tuple[int, str], list[str]], modality: str = "ATAC") -> pd.DataFrame:
    return pd.concat([pd.DataFrame({"dim": dim, "direction": d, "modality": modality, "feature": feats,
                                    "rank": np.arange(1, len(feats) + 1)}) for (dim, d), feats in groups.items()],
                     ignore_index=True)


def _brute_force_best(seq: str, weights: np.ndarray) -> float:
    """The best score of ``weights`` on either strand over the windows of ``seq`` without an N."""
    codes = ["ACGT".find(b) for b in seq]
    best = -np.inf
    for w in (weights, weights[::-1, ::-1]):
        for i in range(len(codes) - len(w) + 1):
            window = codes[i : i + len(w)]
            if min(window) >= 0:
                best = max(best, sum(w[j, b] for j, b in enumerate(window)))
    return best


def test_scan_matches_brute_force_on_both_strands_and_skips_n(motifs) -> None:
    rng = np.random.default_rng(0)
    picks = [motifs.ids.index(PLANTED), *rng.choice(len(motifs.ids), 6, replace=False)]
    sub = MotifSet(tuple(motifs.ids[i] for i in picks), tuple(motifs.names[i] for i in picks),
                   tuple(motifs.weights[i] for i in picks), motifs.thresholds[picks], motifs.release, 1e-4)
    site = "".join("ACGT"[b] for b in sub.weights[0].argmax(1))
    rc = site[::-1].translate(str.maketrans("ACGT", "TGCA"))
    seqs = ["".join(rng.choice(list("ACGTN"), n, p=[0.24, 0.24, 0.24, 0.24, 0.04])) for n in (3, 25, 60, 200, 501)]
    seqs += [f"AC{site}GT", f"A{rc}", f"{site[:10]}N{site[11:]}", site[:-1], f"{site.lower()}"]
    hits = scan(seqs, sub)
    # the table sums are integers: the hits are those of the exact scores against the thresholds
    want = np.array([[_brute_force_best(s.upper(), w) >= t for w, t in zip(sub.weights, sub.thresholds, strict=True)]
                     for s in seqs])
    np.testing.assert_array_equal(hits, want)
    assert hits[5:7, 0].all() and not hits[7:9, 0].any() and hits[9, 0]  # either strand; an N or a cut site: none
    np.testing.assert_array_equal(scan(seqs, sub, threads=1, chunk=1), hits)  # pieces and threads do not matter


def test_threshold_is_the_exact_tail(motifs) -> None:
    """Enumerating every site of a short motif: the threshold is the least score whose tail is <= p."""
    w = next(w for w in motifs.weights if len(w) == 6)
    scores = np.array([w[np.arange(6), k].sum() for k in itertools.product(range(4), repeat=6)])
    for p in (1e-2, 1e-3, 3e-4):
        t = score_threshold(w, p)
        assert (scores >= t).mean() <= p < (scores >= t - 1).mean()
    assert score_threshold(w, 1e-9) > scores.max()  # nothing reaches a p below 4**-6


def test_planted_motif_ranks_first_and_is_significant(genome, motifs, caplog) -> None:
    others = [p for p in genome["peaks"][:300] if p not in genome["chosen"]]
    programs = _programs({(0, "up"): genome["chosen"], (0, "down"): others[:40]})
    with caplog.at_level(logging.WARNING):
        table = annotate(programs, genome["peaks"], genome["planted"], motifs=motifs, rng=np.random.default_rng(1))
    assert list(table.columns) == COLUMNS and set(table["release"]) == {"JASPAR2026"}
    assert len(table) == 2 * len(motifs.ids) and len(motifs.ids) == 1019
    up = table[(table.dim == 0) & (table.direction == "up")].set_index("rank").sort_index()
    top = up.loc[1]
    assert top.motif_id == PLANTED and top.motif_name == "REST" and top.fg_hits == top.fg_n == 40
    assert top.q < 1e-10 and top.odds_ratio > 50
    assert up["p"].is_monotonic_increasing and (up["q"] >= up["p"]).all()
    down = table[(table.dim == 0) & (table.direction == "down")]
    assert down.loc[down.motif_id == PLANTED, "q"].iloc[0] > 0.05  # not in the other direction's peaks
    # the N block's peak is in the pool: left out, and counted
    assert "have no sequence and are left out" in caplog.text and "without A/C/G/T" in caplog.text
    # the test is Fisher's exact, one-sided
    for r in up.head(3).itertuples():
        ref = stats.fisher_exact([[r.fg_hits, r.fg_n - r.fg_hits], [r.bg_hits, r.bg_n - r.bg_hits]],
                                 alternative="greater")
        assert r.p == pytest.approx(ref.pvalue, rel=1e-6)


def test_no_planting_no_motif(genome, motifs) -> None:
    """The same peaks in the unplanted genome, and random peaks: nothing at q < 0.05."""
    rng = np.random.default_rng(2)
    peaks = genome["peaks"]
    groups = {(0, "up"): genome["chosen"]}
    groups.update({(d, "down"): [peaks[i] for i in rng.choice(len(peaks), 40, replace=False)] for d in range(3)})
    table = annotate(_programs(groups), peaks, genome["plain"], motifs=motifs, rng=np.random.default_rng(3))
    assert table.groupby(["dim", "direction"]).ngroups == 4
    assert table["q"].min() > 0.05, table.nsmallest(3, "q")
    assert (table.loc[table.direction == "up", "fg_n"] == 40).all()


def test_background_matches_gc_of_a_gc_rich_program(genome, motifs, caplog) -> None:
    peaks = genome["peaks"]
    seqs = peak_sequences(genome["plain"], parse_regions(peaks))
    gc = gc_content(seqs)
    fg = np.array([peaks.index(p) for p in genome["gc_rich"][:40]])
    pool = np.setdiff1d(np.flatnonzero(~np.isnan(gc)), fg)
    bg = pool[matched_background(gc[fg], gc[pool], 2, np.random.default_rng(0))]  # 110 GC-rich peaks to take from
    assert len(bg) == 80 and len(set(bg)) == 80 and not set(bg) & set(fg)
    assert gc[fg].mean() > gc[pool].mean() + 0.05  # a GC-rich program: an unmatched pool would differ
    assert abs(gc[bg].mean() - gc[fg].mean()) < 0.005 and stats.ks_2samp(gc[fg], gc[bg]).pvalue > 0.5
    # so a GC-rich program finds no motif against it, where the unmatched pool finds GC-rich ones
    program = _programs({(0, "up"): [peaks[i] for i in fg]})
    matched = annotate(program, peaks, genome["plain"], motifs=motifs, background=2)
    assert matched["q"].min() > 0.05 and matched["bg_n"].iloc[0] == 80
    hits = scan([seqs[i] for i in [*fg, *pool]], motifs)
    unmatched = enrichment(hits[: len(fg)], hits[len(fg) :], motifs)
    assert (unmatched["q"] < 0.05).sum() > 5
    # more background peaks than the pool has of that GC: taken further away, and said
    with caplog.at_level(logging.WARNING):
        annotate(program, peaks, genome["plain"], motifs=motifs, background=10)
    assert "dim 0 up: background GC" in caplog.text


def test_bad_inputs_are_one_line_errors(genome, tmp_path, motifs) -> None:
    peaks = genome["peaks"]
    programs = _programs({(0, "up"): peaks[:5]})
    (tmp_path / "notes.txt").write_text("not a genome\n")
    cases = [
        (dict(genome=tmp_path / "mm10.fa"), ["mm10.fa", "genome", "no such file"]),
        (dict(genome=tmp_path / "notes.txt"), ["notes.txt", "genome", "not a readable FASTA"]),
        (dict(features=["Gene1", *peaks]), ["model", "ATAC features", "'Gene1' is not a genomic region"]),
        (dict(features=[p[3:] for p in peaks], programs=_programs({(0, "up"): [p[3:] for p in peaks[:5]]})),
         ["plain.fa", "chromosomes", "(1, 2, ...)", "(it has chr1, chr2"]),
    ]
    for change, words in cases:
        args = {"programs": programs, "features": peaks, "genome": genome["plain"], **change}
        with pytest.raises(InputError) as err:
            annotate(args["programs"], args["features"], args["genome"], motifs=motifs)
        assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


@pytest.fixture(scope="module")
def atac_store(tmp_path_factory, genome) -> dict:
    """A Zarr store of RNA and ATAC (the genome's peaks), a model folder for its selected features, and
    version 3 of its results, inferred with the planted genome by the command line."""
    from conftest import random_counts, write_h5ad, write_model_folder

    from scmm_atlas.cli import main
    from scmm_atlas.ingest.write import IngestOptions, ingest

    tmp = tmp_path_factory.mktemp("atac")
    n, uri = 200, str(tmp / "cells.zarr")
    write_h5ad(tmp / "rna.h5ad", random_counts(n, 20, 1), obs={"donor": [f"b{i % 3}" for i in range(n)]})
    write_h5ad(tmp / "atac.h5ad", random_counts(n, len(genome["peaks"]), 2, density=0.1), var_names=genome["peaks"])
    ingest(uri, [f"RNA={tmp / 'rna.h5ad'}", f"ATAC={tmp / 'atac.h5ad'}"], IngestOptions(batch_key="donor",
                                                                                       progress=False))
    model = str(write_model_folder(uri, tmp / "model"))
    assert main(["infer", "--store", uri, "--model", model, "--version", "3", "--top-n", "30",
                 "--genome", str(genome["planted"]), "--no-progress"]) == 0
    return {"uri": uri, "model": model}


def test_infer_stores_the_motif_table_and_query_reads_it(atac_store, genome, motifs, tmp_path, capsys) -> None:
    from scmm_atlas.cli import main
    from scmm_atlas.infer.trained import load_trained
    from scmm_atlas.store import open_store
    from scmm_atlas.store.results import index, open_results

    uri, model = atac_store["uri"], atac_store["model"]
    # a genome that is not there fails before any cell is inferred, and publishes nothing
    assert main(["infer", "--store", uri, "--model", model, "--version", "5", "--genome", str(tmp_path / "mm10.fa"),
                 "--no-progress"]) == 2
    assert "mm10.fa: genome: no such file" in capsys.readouterr().err
    with open_store(uri) as store:
        assert [r.version for r in index(store)] == ["3"]
        reader = open_results(store)
        stored, programs = reader.table("motifs"), reader.programs()
    # what the stage stored is the annotation of the programs it stored (seeded: reproducible)
    want = annotate(programs, load_trained(model).features["ATAC"], genome["planted"], motifs=motifs,
                    rng=np.random.default_rng(0))
    pd.testing.assert_frame_equal(stored, want)
    assert len(stored) and set(map(tuple, stored[["dim", "direction"]].drop_duplicates().to_numpy())) == set(map(
        tuple, programs.loc[programs.modality == "ATAC", ["dim", "direction"]].drop_duplicates().to_numpy()))

    assert main(["query", "programs", "--store", uri, "--motifs", "--dim", "1", "--direction", "down",
                 "--out", str(tmp_path / "m.csv")]) == 0
    got = pd.read_csv(tmp_path / "m.csv", index_col=0)
    part = stored[(stored.dim == 1) & (stored.direction == "down")].reset_index(drop=True)
    assert len(got) == len(motifs.ids) and list(got["motif_id"]) == list(part["motif_id"])
    np.testing.assert_allclose(got["q"], part["q"])
    assert main(["query", "programs", "--store", uri, "--motifs", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "motif_name" in out and "JASPAR2026" in out and f"{len(stored):,} rows in all" in out

    assert main(["infer", "--store", uri, "--model", model, "--version", "4", "--top-n", "5", "--no-progress"]) == 0
    assert "motifs" not in capsys.readouterr().out
    assert main(["query", "programs", "--store", uri, "--motifs"]) == 2
    err = capsys.readouterr().err
    assert "version 4 has no motif table" in err and "--genome FASTA" in err and err.count("\n") == 1
    assert main(["query", "programs", "--store", uri, "--motifs", "--version", "3", "--dim", "0"]) == 0


def test_report_shows_the_top_motifs(atac_store, genome, tmp_path) -> None:
    from scmm_atlas.evaluate.page import motifs_html
    from scmm_atlas.evaluate.report import report

    table = annotate(_programs({(0, "up"): genome["chosen"], (1, "down"): genome["peaks"][300:340]}),
                     genome["peaks"], genome["planted"], rng=np.random.default_rng(1))
    page = motifs_html(table)
    assert "REST (MA0138.3, 40/40" in page and "1 of 2 program directions" in page and "JASPAR2026" in page
    assert page.count("<tr>") == 2  # the header and dim 0 up: nothing significant in the other
    done = report(atac_store["uri"], tmp_path / "rep", version="3", max_cells=200)
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "motifs of the ATAC programs" in html and (tmp_path / "rep" / "motifs.csv").exists()
    assert len(pd.read_csv(tmp_path / "rep" / "motifs.csv")) > 0 and done["html"].endswith("index.html")
