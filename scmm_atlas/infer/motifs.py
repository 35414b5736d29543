"""Motif annotation of ATAC programs: which JASPAR motifs are enriched in each program's peaks.

A program direction's top ATAC features (the ``programs`` table) are peaks named by their
coordinates; their sequences come from the genome FASTA the user gives, and each JASPAR motif is
called present in a peak when its best site on either strand passes a score threshold. Enrichment
is the one-sided Fisher's exact test of "motif present" in the program's peaks against background
peaks of matched GC content (GC alone explains much of the motif content of open chromatin, so an
unmatched background would mostly find GC-rich motifs), with Benjamini-Hochberg q-values across
the motifs of each program direction::

    scmm-atlas infer --store atlas.zarr --model models:/atlas@champion --genome mm10.fa
    scmm-atlas query programs --store atlas.zarr --motifs --dim 3 --direction up
    scmm-atlas report --store atlas.zarr          # top motifs per program direction on the page

The FASTA must be of the assembly the peaks were called on, with the same chromosome names
(``chr1`` vs ``1``); pyfaidx indexes it on first use (``mm10.fa.fai`` beside it, or in the user
cache when its folder is read-only); soft-masked (lower-case) bases count as bases.

- Motifs: pyjaspar's bundled database (release ``JASPAR2026``), collection CORE, vertebrates,
  latest version of each matrix (1,019). Log-odds against a uniform base background with the
  JASPAR pseudocount (sqrt(sites) x background, as ``Bio.motifs.jaspar``), rounded to 1/100 bit
  so that scores are integers: the score threshold of p-value ``p_value`` (default 1e-4 per
  site and strand) comes from the exact score distribution, and sums in the scan are exact.
- Scan: the motifs grouped by length, both strands, as lookup tables of 5-mers: a window's score
  is the sum of ~L/5 table rows (numpy ``take``, threads), not 4 L multiply-adds of a convolution
  over one-hot bases; windows over N (or past a peak's end) never count. Every distinct peak is
  scanned once (the programs' peaks and one background pool) and reused by every direction.
- Background: a pool of ``pool`` (5,000) peaks drawn at random from the modality's features;
  for each direction, ``background`` (5) pool peaks per program peak, each the nearest in GC
  content (ties at random), none of them the direction's own peaks; a background whose mean GC
  still differs by more than 0.02 is reported. Peaks without sequence (chromosome not in the
  FASTA, or no A/C/G/T) are left out, with a warning that counts them.
- Cost, measured on 2 shared CPU cores: 40 program directions x 50 peaks and the pool, peaks of
  500 bp, 1,019 motifs: ~13 s of CPU, nearly all the scan; loading JASPAR ~3 s, once per process.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ..errors import InputError
from ..store.regions import parse_regions

if TYPE_CHECKING:
    import pyfaidx

log = logging.getLogger(__name__)
COLUMNS = ["dim", "direction", "modality", "motif_id", "motif_name", "fg_hits", "fg_n", "bg_hits", "bg_n",
           "odds_ratio", "p", "q", "rank", "release"]
DTYPES = {"dim": "int32", "direction": str, "modality": str, "motif_id": str, "motif_name": str, "fg_hits": "int32",
          "fg_n": "int32", "bg_hits": "int32", "bg_n": "int32", "odds_ratio": "float64", "p": "float64",
          "q": "float64", "rank": "int32", "release": str}
SCALE = 100  # log-odds in 1/100 bit: integer scores (exact distribution, exact float32 sums)
K = 5  # bases per lookup of the scan (tables of 4**K rows)
GC_WARN = 0.02  # a program's background further than this in mean GC content is reported
NEVER = -1e5  # the score of a motif position over a non-base: no window over an N or past the end counts
UNIFORM = np.full(4, 0.25)  # A, C, G, T
_CODES = np.full(256, 4, dtype=np.int64)  # byte -> 0..3 for A, C, G, T (either case), 4 for anything else
for _i, _base in enumerate("ACGT"):
    _CODES[ord(_base)] = _CODES[ord(_base.lower())] = _i


@dataclass(frozen=True)
class MotifSet:
    """Integer log-odds matrices ([length, 4], A C G T) and per-motif score thresholds."""

    ids: tuple[str, ...]
    names: tuple[str, ...]
    weights: tuple[np.ndarray, ...]
    thresholds: np.ndarray
    release: str
    p_value: float


def log_odds(counts: np.ndarray, background: np.ndarray = UNIFORM) -> np.ndarray:
    """[length, 4] integer log-odds (1/100 bit) of a [4, length] count matrix, with the JASPAR
    pseudocount sqrt(sites) x background, so that a base never seen in few sites is not impossible."""
    counts = np.asarray(counts, dtype=np.float64)
    pseudo = np.sqrt(counts.sum(0).mean()) * background[:, None]
    freqs = (counts + pseudo) / (counts + pseudo).sum(0)
    return np.rint(SCALE * np.log2(freqs / background[:, None])).astype(np.int64).T


def score_threshold(weights: np.ndarray, p_value: float, background: np.ndarray = UNIFORM) -> int:
    """The smallest integer score that a random site (bases drawn from ``background``) reaches with
    probability at most ``p_value``, from the exact distribution of the integer scores."""
    dist, low = np.ones(1), 0
    for column in weights:
        shift = column - column.min()
        grown = np.zeros(len(dist) + shift.max())
        for s, prob in zip(shift, background, strict=True):
            grown[s : s + len(dist)] += prob * dist
        dist, low = grown, low + column.min()
    tail = np.cumsum(dist[::-1])[::-1]  # tail[i] = P(score >= low + i), non-increasing
    return int(low + np.argmax(tail <= p_value)) if tail[-1] <= p_value else int(low + len(dist))


def _extra(module: str) -> Any:
    """``module`` of the ``motifs`` extra, or a one-line error saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(module, "import", "motif annotation needs the motifs extra: "
                         "pip install 'scmm-atlas[motifs]'") from None


@functools.lru_cache(maxsize=4)
def load_motifs(p_value: float = 1e-4, *, release: str | None = None, collection: str = "CORE",
                tax_group: str = "vertebrates") -> MotifSet:
    """The latest version of each JASPAR matrix of ``collection`` / ``tax_group`` (pyjaspar's bundled
    ``release``, default its newest), with thresholds at ``p_value``; cached per process."""
    jaspardb = _extra("pyjaspar").jaspardb
    db = jaspardb(release=release) if release else jaspardb()
    motifs = db.fetch_motifs(collection=collection, tax_group=[tax_group], all_versions=False)
    weights = tuple(log_odds(np.array([m.counts[b] for b in "ACGT"])) for m in motifs)
    return MotifSet(ids=tuple(m.matrix_id for m in motifs), names=tuple(m.name for m in motifs), weights=weights,
                    thresholds=np.array([score_threshold(w, p_value) for w in weights], dtype=np.int64),
                    release=str(db.release), p_value=p_value)


def open_genome(path: str | Path) -> pyfaidx.Fasta:
    """The FASTA at ``path`` through pyfaidx (indexed on first use), or a one-line :class:`InputError`."""
    pyfaidx = _extra("pyfaidx")
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "genome", "no such file (a FASTA of the peaks' genome, e.g. mm10.fa)")
    index = Path(f"{path}.fai")
    if not index.exists() and not os.access(path.parent, os.W_OK):  # a read-only reference folder
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scmm-atlas"
        cache.mkdir(parents=True, exist_ok=True)
        index = cache / f"{path.name}.{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}.fai"
    try:
        return pyfaidx.Fasta(str(path), indexname=str(index), as_raw=True, sequence_always_upper=True)
    except (OSError, ValueError, UnicodeDecodeError, pyfaidx.FastaIndexingError) as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(str(path), "genome", f"not a readable FASTA (plain or bgzip): {problem}") from None


def check_genome(genome: str | Path, regions: pd.DataFrame) -> pyfaidx.Fasta:
    """The open FASTA, once it is known to hold some of the regions' chromosomes (else a one-line
    :class:`InputError`: a genome of another assembly, or ``1`` where the peaks say ``chr1``)."""
    fasta = open_genome(genome)
    known = set(fasta.keys())
    if len(regions) and not regions["chrom"].isin(known).any():
        wanted = ", ".join(sorted(set(regions["chrom"]))[:3])
        raise InputError(str(genome), "chromosomes", f"none of the peaks' chromosomes ({wanted}, ...) is in the "
                         f"FASTA (it has {', '.join(sorted(known)[:3]) or 'none'}, ...): another assembly or naming?")
    return fasta


def peak_sequences(genome: str | Path, regions: pd.DataFrame) -> list[str]:
    """Each region's sequence ("" where unavailable: chromosome not in the FASTA, or no A/C/G/T)."""
    fasta = check_genome(genome, regions)
    present = regions["chrom"].isin(set(fasta.keys())).to_numpy()
    seqs = [str(fasta[c][int(s) : int(e)]) if ok else "" for c, s, e, ok in
            zip(regions["chrom"], regions["start"], regions["end"], present, strict=True)]
    seqs = [s if any(b in s for b in "ACGT") else "" for s in seqs]
    missing = int((~present).sum())
    if seqs.count(""):
        log.warning("%s: %d of %d peaks have no sequence and are left out (%d on chromosomes not in the FASTA, "
                    "%d without A/C/G/T)", genome, seqs.count(""), len(seqs), missing, seqs.count("") - missing)
    return seqs


def gc_content(seqs: Sequence[str]) -> np.ndarray:
    """G + C over A + C + G + T of each sequence (NaN for one without any)."""
    out = np.full(len(seqs), np.nan)
    for i, s in enumerate(seqs):
        counts = np.bincount(_CODES[np.frombuffer(s.encode(), dtype=np.uint8)], minlength=5)
        if counts[:4].sum():
            out[i] = (counts[1] + counts[2]) / counts[:4].sum()
    return out


def _codes(seqs: Sequence[str], pad: int) -> np.ndarray:
    """[n, longest + pad] base codes: 0..3 for A C G T, 4 for N and past each sequence's end."""
    codes = np.full((len(seqs), max(len(s) for s in seqs) + pad), 4, dtype=np.int64)
    for i, s in enumerate(seqs):
        codes[i, : len(s)] = _CODES[np.frombuffer(s.encode(), dtype=np.uint8)]
    return codes


@dataclass(frozen=True)
class _Group:
    """The motifs of one length as lookup tables: a window's scores (every motif, both strands)
    are the sum of ``blocks`` rows of ``table``, row ``b * 4**K + kmer`` for the K-mer at offset
    ``b * K``; the last row, :data:`NEVER` everywhere, stands in for a window over a non-base."""

    motifs: np.ndarray
    length: int
    blocks: int
    table: np.ndarray


def _groups(motifs: MotifSet) -> list[_Group]:
    """The lookup tables of the motifs, one :class:`_Group` per motif length."""
    lengths = np.array([len(w) for w in motifs.weights])
    kmers = np.array(np.meshgrid(*[np.arange(4)] * K, indexing="ij")).reshape(K, -1).T  # [4**K, K]
    groups = []
    for length in np.unique(lengths):
        idx = np.flatnonzero(lengths == length)
        blocks = -(-int(length) // K)
        cols = np.zeros((blocks * K, 4, 2 * len(idx)))  # [motif position (zero-padded), base, motif x strand]
        for j, i in enumerate(idx):  # reverse complement: positions reversed, A C G T to T G C A
            cols[:length, :, j], cols[:length, :, len(idx) + j] = motifs.weights[i], motifs.weights[i][::-1, ::-1]
        table = np.concatenate([sum(cols[b * K + t, kmers[:, t]] for t in range(K)) for b in range(blocks)]
                               + [np.full((1, 2 * len(idx)), NEVER)])
        groups.append(_Group(idx, int(length), blocks, table.astype(np.float32)))
    return groups


def _best(kmers: np.ndarray, bad: np.ndarray, width: int, g: _Group) -> np.ndarray:
    """[sequences, motifs] best scores, either strand, of the windows starting at ``0 .. width - 1``
    (``bad``: cumulative counts of non-bases, so that a window holds none when its two ends are equal)."""
    n = len(kmers)
    clean = bad[:, g.length : g.length + width] == bad[:, :width]
    score = np.take(g.table, np.where(clean, kmers[:, :width], len(g.table) - 1), axis=0)
    for b in range(1, g.blocks):
        score += np.take(g.table, kmers[:, b * K : b * K + width] + b * 4**K, axis=0)
    return score.reshape(n, width * 2, -1).max(1)


def scan(seqs: Sequence[str], motifs: MotifSet, *, threads: int | None = None, chunk: int = 1 << 20) -> np.ndarray:
    """[sequences, motifs] bool: the motif has a site on either strand scoring at least its threshold.

    A window's scores are sums of table rows picked by its K-mers: ~L/K additions per window and
    motif instead of the 4 L multiply-adds of a convolution over one-hot bases (10x faster on CPUs).
    Integer scores below 2**24: float32 sums are exact. Work goes in pieces of about ``chunk``
    scores (cache-sized) over ``threads`` threads (default: torch's), numpy releasing the GIL."""
    hits = np.zeros((len(seqs), len(motifs.ids)), dtype=bool)
    if not len(seqs):
        return hits
    groups = _groups(motifs)
    pad = K * max(g.blocks for g in groups)
    order = np.argsort([len(s) for s in seqs], kind="stable")

    def part(rows: np.ndarray) -> None:
        codes = _codes([seqs[i] for i in rows], pad)
        kmers = np.zeros((len(rows), codes.shape[1] - K + 1), dtype=np.int64)
        for t in range(K):  # non-bases read as A: the windows over them never count
            kmers = kmers * 4 + np.minimum(codes[:, t : t + kmers.shape[1]], 3)
        bad = np.concatenate([np.zeros((len(rows), 1), np.int64), np.cumsum(codes == 4, axis=1)], axis=1)
        for g in groups:
            step = max(1, chunk // (codes.shape[1] * len(g.table[0])))
            for lo in range(0, len(rows), step):
                best = _best(kmers[lo : lo + step], bad[lo : lo + step], codes.shape[1] - pad, g)
                hits[np.ix_(rows[lo : lo + step], g.motifs)] = best >= motifs.thresholds[g.motifs] - 0.5

    with ThreadPoolExecutor(threads or torch.get_num_threads()) as pool:
        list(pool.map(part, np.array_split(order, -(-len(order) // 64))))  # similar lengths: little padding
    return hits


def matched_background(fg_gc: np.ndarray, pool_gc: np.ndarray, per_peak: int, rng: np.random.Generator
                       ) -> np.ndarray:
    """Indices into the pool: for each foreground peak (in random order) the ``per_peak`` unused pool
    peaks nearest in GC content, ties broken at random; fewer when the pool runs out."""
    shuffle = rng.permutation(len(pool_gc))  # a random order among equal distances
    gc = pool_gc[shuffle]
    free = np.ones(len(gc), dtype=bool)
    chosen = []
    for g in fg_gc[rng.permutation(len(fg_gc))]:
        dist = np.where(free, np.abs(gc - g), np.inf)
        take = np.argsort(dist, kind="stable")[: min(per_peak, int(free.sum()))]
        free[take] = False
        chosen.append(take)
    return shuffle[np.concatenate(chosen)] if chosen else np.zeros(0, np.int64)


def enrichment(fg_hits: np.ndarray, bg_hits: np.ndarray, motifs: MotifSet) -> pd.DataFrame:
    """Per motif: one-sided Fisher's exact test (the hypergeometric upper tail) of presence in the
    foreground [peaks, motifs] against the background; BH q-values across the motifs; ranks by p
    (then odds ratio). The odds ratio adds 1/2 to each cell (Haldane), so that it stays finite."""
    fg_n, bg_n = len(fg_hits), len(bg_hits)
    a, c = fg_hits.sum(0), bg_hits.sum(0)
    p = stats.hypergeom.sf(a - 1, fg_n + bg_n, a + c, fg_n) if fg_n else np.ones(len(a))
    odds = (a + 0.5) * (bg_n - c + 0.5) / ((fg_n - a + 0.5) * (c + 0.5))
    table = pd.DataFrame({"motif_id": motifs.ids, "motif_name": motifs.names, "fg_hits": a, "fg_n": fg_n,
                          "bg_hits": c, "bg_n": bg_n, "odds_ratio": odds, "p": np.clip(p, 0.0, 1.0)})
    table["q"] = stats.false_discovery_control(table["p"].to_numpy())
    table = table.sort_values(["p", "odds_ratio", "motif_id"], ascending=[True, False, True], ignore_index=True)
    return table.assign(rank=np.arange(1, len(table) + 1))


def annotate(programs: pd.DataFrame, features: Sequence[str], genome: str | Path, *, modality: str = "ATAC",
             motifs: MotifSet | None = None, background: int = 5, pool: int = 5000,
             rng: np.random.Generator | None = None, where: str = "model") -> pd.DataFrame:
    """The motif table (:data:`COLUMNS`) of every program direction of ``modality``.

    ``features``: the modality's features in the model (peaks named ``chr:start-end``; ``where``
    names the model in errors); the background of a direction comes from them, less its own peaks.
    ``rng`` draws the background pool and the GC-matched peaks (default: seeded, reproducible)."""
    motifs = motifs or load_motifs()
    rng = rng or np.random.default_rng(0)
    rows = programs[programs["modality"] == modality]
    names = pd.Index([str(f) for f in features])
    regions = parse_regions(list(names), where=where, field=f"{modality} features")
    if rows.empty:
        return pd.DataFrame(columns=COLUMNS).astype(DTYPES)
    peaks = names.get_indexer(rows["feature"].astype(str))
    if (peaks < 0).any():
        raise ValueError(f"programs name {modality} features that are not among the {len(names)} given")
    drawn = rng.choice(len(names), size=min(pool, len(names)), replace=False)
    scanned = np.union1d(peaks, drawn)
    seqs = peak_sequences(genome, regions.iloc[scanned])
    ok = np.array([bool(s) for s in seqs])
    hits = np.zeros((len(scanned), len(motifs.ids)), dtype=bool)
    hits[ok] = scan([s for s in seqs if s], motifs)
    gc = gc_content(seqs)
    pool_rows = np.flatnonzero(np.isin(scanned, drawn) & ok)
    parts = []
    for (dim, direction), group in rows.groupby(["dim", "direction"], sort=True):
        own = np.searchsorted(scanned, names.get_indexer(group["feature"].astype(str)))
        fg = own[ok[own]]
        candidates = pool_rows[~np.isin(pool_rows, own)]
        bg = candidates[matched_background(gc[fg], gc[candidates], background, rng)]
        if len(fg) and len(bg) and abs(gc[bg].mean() - gc[fg].mean()) > GC_WARN:
            log.warning("dim %s %s: background GC %.3f against %.3f in the program's peaks: too few pool peaks of "
                        "its GC content (a larger pool, or fewer background peaks per peak)", dim, direction,
                        gc[bg].mean(), gc[fg].mean())
        parts.append(enrichment(hits[fg], hits[bg], motifs).assign(dim=dim, direction=direction))
    table = pd.concat(parts, ignore_index=True).assign(modality=modality, release=motifs.release)
    return table[COLUMNS].astype(DTYPES)
