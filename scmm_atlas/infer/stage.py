"""The batch inference stage: the store's cell blocks over a pool of workers, results published.

Blocks of ``block_cells`` cells (aligned with the results' storage chunks, so that writers never
share a chunk) go to a pool of workers; each builds the model once, reads its blocks from the
store (the model's features, matched by name), computes embeddings and predictions, and writes
them into the results entry being written (a new one, or a published one extended with appended
cells). The driver then computes the pseudocell programs (and, given a genome FASTA, the JASPAR
motifs enriched in the ATAC programs' peaks: :mod:`.motifs`) and publishes the entry (one
metadata write). Memory is bounded by the block size, not the store.

Workers (``executor``): on a Ray cluster (a ``ray_address``, or ``RAY_ADDRESS`` as under ``ray job
submit``) a Ray Data actor pool; on one machine, threads of this process (torch and the stores'
codecs release the GIL). Starting actors costs ~5 s of process start, imports and Ray Data set-up
before the first block, more than the whole work on a store of 50,000 cells.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..data.ray_session import ensure_ray
from ..errors import StoreError
from ..faults import FaultPlan
from ..memory import keep_freed_buffers
from ..store import Store, open_store
from ..store.base import modality_kind
from ..store.regions import parse_regions
from ..store.results import ResultSpec, begin, extend, open_writer, publish
from ..store.results.spec import ResultRecord
from ..store.uri import aws_settings
from .motifs import annotate, check_genome, load_motifs
from .predict import check_pairs, default_pairs, infer_batch
from .programs import Programs, programs
from .trained import TrainedModel

log = logging.getLogger(__name__)
CHUNK_ROWS = 4096  # rows per results chunk (a block's rows start at a multiple of it)
EXECUTORS = ("auto", "ray", "local")


@dataclass(frozen=True)
class InferConfig:
    block_cells: int = 16384  # cells per actor call
    batch_size: int = 4096  # cells per forward pass inside a block
    actors: int = 0  # workers; 0: one per CPU, at most 4
    cpus_per_actor: float = 1.0
    torch_threads: int = 1
    executor: str = "auto"  # ray | local | auto: ray on a cluster (module doc), else local
    pairs: tuple[tuple[str, str], ...] | None = None  # None: predict.default_pairs (targets <= 1,000 features)
    library_size: float | None = 1e4  # predictions per this many counts; None: the model's library scale
    programs: bool = True
    programs_mode: str = "atlas"  # or "faithful"
    top_n: int = 50
    genome: str | None = None  # FASTA of the peaks' assembly: motif table of the ATAC programs (infer.motifs)
    motif_p: float = 1e-4  # p-value of a motif site's score (per position and strand)
    motif_background: int = 5  # GC-matched background peaks per program peak

    def __post_init__(self) -> None:
        for name in ("block_cells", "batch_size", "top_n", "motif_background"):
            if getattr(self, name) <= 0:
                raise ValueError(f"InferConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.motif_p < 1:
            raise ValueError(f"InferConfig.motif_p must be within (0, 1), got {self.motif_p}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"InferConfig.executor must be one of {EXECUTORS}, got {self.executor!r}")

    def uses_ray(self, ray_address: str | None) -> bool:
        if self.executor == "auto":
            return bool(ray_address or os.environ.get("RAY_ADDRESS"))
        return self.executor == "ray"


@dataclass
class InferResult:
    record: ResultRecord
    cells: int
    cells_per_s: float
    programs_s: float
    wall_s: float
    timings: dict[str, float] = field(default_factory=dict)


class FeatureMap:
    """The model's features in a store's columns: ``columns`` to read, ``positions`` in the model's order."""

    def __init__(self, store: Store, trained: TrainedModel) -> None:
        self.columns, self.positions, self.n_features = {}, {}, {}
        for mod, names in trained.features.items():
            if mod not in store.modalities:
                self.columns[mod], self.positions[mod] = np.zeros(0, np.int64), np.zeros(0, np.int64)
            else:
                lookup = pd.Index(store.var(mod).index).get_indexer(pd.Index(names))
                found = lookup >= 0
                if found.mean() < 0.5:
                    raise StoreError(store.uri, f"{mod}/var_id", f"only {found.sum()} of the model's {len(names)} "
                                     f"{mod} features are in this store: not the model's feature space")
                if not found.all():
                    log.warning("%s: %d of the model's %s features are not in the store: read as zeros",
                                store.uri, (~found).sum(), mod)
                self.columns[mod], self.positions[mod] = lookup[found], np.flatnonzero(found)
            self.n_features[mod] = len(names)


def block_edges(lo: int, hi: int, chunk: int, size: int) -> np.ndarray:
    """Cut rows ``lo .. hi`` into pieces of about ``size`` rows whose inner edges are multiples of
    ``chunk``, so that no two pieces share a storage chunk (``lo`` itself may be unaligned: the
    first new row of an extended entry)."""
    step = max(chunk, size // chunk * chunk)
    return np.array([lo, *range((lo // step + 1) * step, hi, step), hi], dtype=np.int64)


@dataclass(frozen=True)
class BlockWork:
    """What every block worker needs: the entry it writes and the model that computes the rows."""

    store: Store
    entry: str
    trained: TrainedModel
    features: FeatureMap
    cfg: InferConfig
    faults: FaultPlan = field(default_factory=FaultPlan)  # tests only (scmm_atlas.faults)

    def worker_kwargs(self) -> dict[str, Any]:
        """:class:`BlockInfer`'s arguments (an actor's are pickled: the store goes as its URI)."""
        return {"store_uri": self.store.uri.uri, "entry": self.entry, "trained": self.trained,
                "features": self.features, "config": self.cfg, "faults": self.faults}


class BlockInfer:
    """A Ray Data actor: the model built once; each call reads, infers and writes whole blocks."""

    def __init__(self, store_uri: str, entry: str, trained: TrainedModel, features: FeatureMap,
                 config: InferConfig, faults: FaultPlan | None = None) -> None:
        torch.set_num_threads(config.torch_threads)
        keep_freed_buffers()
        self.model, self.trained, self.features, self.cfg = trained.build(), trained, features, config
        self.store = open_store(store_uri)
        self.writer = open_writer(self.store, entry)
        self.codes = {b: i for i, b in enumerate(trained.batches)}
        self.pairs = list(self.writer.spec.pairs)
        self.faults = faults or FaultPlan()  # tests: a block that raises leaves the entry unpublished

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for index, start, stop in zip(batch["block"], batch["start"], batch["stop"], strict=True):
            if int(index) == self.faults.infer_block:
                raise RuntimeError(f"injected inference fault at block {index}")
            began = time.monotonic()
            self._block(int(start), int(stop))
            time.sleep(max(0.0, self.faults.infer_block_s - (time.monotonic() - began)))
        return {"cells": batch["stop"] - batch["start"]}

    def _block(self, start: int, stop: int) -> None:
        store, mods = self.store, list(self.trained.features)
        obs = store.obs_slice(start, stop, ["batch", *(f"has_{m}" for m in mods if m in store.modalities)])
        n = stop - start
        x, mask = {}, {}
        for m in mods:
            x[m], nonzero = self._counts(m, start, stop)
            has = obs[f"has_{m}"].to_numpy(bool) if f"has_{m}" in obs else np.zeros(n, bool)
            mask[m] = torch.from_numpy(has & nonzero)  # an all-zero row carries no information
        codes = torch.as_tensor(obs["batch"].map(self.codes).fillna(0).to_numpy(np.int64))  # unknown: batch 0
        # each minibatch is written as soon as it is made, its rows chunk-aligned
        edges = block_edges(start, stop, self.writer.spec.chunk_rows, self.cfg.batch_size)
        for lo, hi in zip(edges[:-1] - start, edges[1:] - start, strict=True):
            out = infer_batch(self.model, {m: _torch_csr(v[lo:hi]) for m, v in x.items()},
                              mask={m: v[lo:hi] for m, v in mask.items()},
                              batch=codes[lo:hi] if self.model.config.n_batches else None,
                              pairs=self.pairs, library_size=self.cfg.library_size)
            self.writer.write_cells(start + lo, out.joint, out.per_modality, out.predictions)

    def _counts(self, mod: str, start: int, stop: int) -> tuple[sp.csr_matrix, np.ndarray]:
        """float32 CSR counts in the model's feature order, and which rows have any count."""
        cols, pos, width = self.features.columns[mod], self.features.positions[mod], self.features.n_features[mod]
        if not len(cols):
            return sp.csr_matrix((stop - start, width), dtype=np.float32), np.zeros(stop - start, bool)
        mat = sp.csr_matrix(self.store.read(mod, start, stop, cols), dtype=np.float32)
        if len(pos) != width:  # some features missing: the found ones to their places in the model's order
            mat = sp.csr_matrix((mat.data, pos[mat.indices], mat.indptr), shape=(stop - start, width))
        mat.sort_indices()
        return mat, np.diff(mat.indptr) > 0


def _torch_csr(mat: sp.csr_matrix) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(mat.indptr.astype(np.int64)),
                                       torch.from_numpy(mat.indices.astype(np.int64)), torch.from_numpy(mat.data),
                                       size=mat.shape, check_invariants=False)  # scipy's CSR, indices sorted


def infer(store_uri: str, trained: TrainedModel, *, config: InferConfig | None = None, ray_address: str | None = None,
          progress: bool = True, extend_record: ResultRecord | None = None) -> InferResult:
    """Run the stage on ``store_uri`` with ``trained``; publish and return the index record.

    ``extend_record`` (a published record of ``trained``'s version) computes only the cells
    appended since it was published, adds them to its entry and republishes it: its rows and
    programs are kept as they are."""
    cfg = config or InferConfig()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with open_store(store_uri) as store:
        features = FeatureMap(store, trained)
        motif_mods = _motif_modalities(store, trained, cfg) if extend_record is None else []
        if extend_record is None:
            widths = {m: len(f) for m, f in trained.features.items()}
            asked = list(cfg.pairs) if cfg.pairs is not None else default_pairs(list(trained.features), widths)
            pairs = check_pairs(asked, list(trained.features))
            spec = ResultSpec(version=trained.version, model_uri=trained.uri, latent_dim=trained.config.latent_dim,
                              joint_dim=trained.config.embedding_dim,
                              modalities=list(trained.features), pairs=pairs,
                              target_features={t: list(trained.features[t]) for _, t in pairs},
                              library_size=cfg.library_size, chunk_rows=math.gcd(cfg.block_cells, CHUNK_ROWS))
            writer = begin(store, spec)
        else:
            if extend_record.version != trained.version:
                raise StoreError(store.uri, "version", f"cannot extend version {extend_record.version} with "
                                 f"model version {trained.version}")
            writer = extend(store, extend_record)
            spec = writer.spec
            cfg = replace(cfg, library_size=spec.library_size)  # the entry's own setting, whatever was asked
        try:
            edges = block_edges(spec.row_start, store.n_obs, spec.chunk_rows, cfg.block_cells)
            blocks = [{"block": i, "start": int(a), "stop": int(b)}
                      for i, (a, b) in enumerate(itertools.pairwise(edges)) if b > a]
            t_cells = time.perf_counter()
            run_blocks = _run_blocks if cfg.uses_ray(ray_address) else _run_local
            work = BlockWork(store, spec.entry, trained, features, cfg, FaultPlan.from_env())
            done = run_blocks(work, blocks, ray_address, progress) if blocks else 0
            cells_s = time.perf_counter() - t_cells
            t_prog = time.perf_counter()
            if cfg.programs and extend_record is None:
                found = programs(trained.build(), trained.features, mode=cfg.programs_mode, top_n=cfg.top_n)
                writer.write_table("programs", found.table.assign(model_version=trained.version))
                writer.write_table("traversals", found.traversals)
                if motif_mods:
                    t_motifs = time.perf_counter()
                    writer.write_table("motifs", _motifs(found, trained, motif_mods, cfg))
                    timings["motifs_s"] = time.perf_counter() - t_motifs
            programs_s = time.perf_counter() - t_prog
            record = publish(store, writer)
        finally:  # a failed attempt lets go of its entry: the next publish removes it
            writer.close()
    return InferResult(record=record, cells=done, cells_per_s=done / max(cells_s, 1e-9), programs_s=programs_s,
                       wall_s=time.perf_counter() - t0, timings=timings)


def _motif_modalities(store: Store, trained: TrainedModel, cfg: InferConfig) -> list[str]:
    """The model's ATAC modalities whose programs get a motif table (none without ``cfg.genome``).
    The genome and the peak names are checked here, before the cells: a bad path fails in seconds."""
    if not (cfg.genome and cfg.programs):
        return []
    mods = [m for m in trained.features
            if (store.kind(m) if m in store.modalities else modality_kind(m)) == "atac"]
    if not mods:
        log.warning("genome %s given, but model %s has no ATAC modality: no motif table", cfg.genome, trained.uri)
    for m in mods:
        check_genome(cfg.genome, parse_regions(trained.features[m], where=trained.uri, field=f"{m} features"))
    if mods:
        load_motifs(cfg.motif_p)  # cached for the end; without the motifs extra, fails now
    return mods


def _motifs(found: Programs, trained: TrainedModel, mods: list[str], cfg: InferConfig) -> pd.DataFrame:
    """The motif table of the ATAC programs in ``found`` (seeded: reruns give the same background)."""
    motifs = load_motifs(cfg.motif_p)
    return pd.concat([annotate(found.table, trained.features[m], str(cfg.genome), modality=m, motifs=motifs,
                               background=cfg.motif_background, rng=np.random.default_rng(0), where=trained.uri)
                      for m in mods], ignore_index=True)


def _run_blocks(work: BlockWork, blocks: list[dict[str, int]], ray_address: str | None, progress: bool) -> int:
    """Hand ``blocks`` to a pool of :class:`BlockInfer` actors; returns the cells they wrote."""
    import ray

    ensure_ray(ray_address, object_store_bytes=1 << 29)
    actors = _workers(work.cfg, ray.cluster_resources().get("CPU", 1))
    with warnings.catch_warnings():  # ray_remote_args_fn: deprecated in 2.60, the only way to set max_restarts
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = _pool(ray, blocks, work, actors)
    ds.context.enable_progress_bars = False
    done = 0
    with _progress(sum(b["stop"] - b["start"] for b in blocks), progress) as bar:
        for row in ds.iter_rows():
            done += int(row["cells"])
            bar.update(int(row["cells"]))
    return done


def _workers(cfg: InferConfig, cpus: float) -> int:
    """``cfg.actors``, or one worker per ``cpus_per_actor`` of the CPUs, at most 4."""
    return cfg.actors or max(1, min(4, int(cpus // cfg.cpus_per_actor)))


def _run_local(work: BlockWork, blocks: list[dict[str, int]], ray_address: str | None, progress: bool) -> int:
    """The blocks on threads of this process, each with its own :class:`BlockInfer`; the first
    failure stops the rest (the entry stays unpublished, as with actors)."""
    del ray_address
    n_workers = min(_workers(work.cfg, os.cpu_count() or 1), len(blocks))
    threads = torch.get_num_threads()
    idle: queue.SimpleQueue[BlockInfer] = queue.SimpleQueue()
    for _ in range(n_workers):
        idle.put(BlockInfer(**work.worker_kwargs()))

    def run(block: dict[str, int]) -> int:
        worker = idle.get()
        try:
            return int(worker({k: np.array([v]) for k, v in block.items()})["cells"].sum())
        finally:
            idle.put(worker)

    done = 0
    try:
        with ThreadPoolExecutor(n_workers) as pool, _progress(sum(b["stop"] - b["start"] for b in blocks),
                                                              progress) as bar:
            futures = [pool.submit(run, b) for b in blocks]
            try:
                for future in futures:
                    cells = future.result()
                    done += cells
                    bar.update(cells)
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    finally:
        torch.set_num_threads(threads)  # the workers set this process's torch threads
    return done


def _pool(ray: Any, blocks: list[dict[str, int]], work: BlockWork, actors: int) -> Any:
    return ray.data.from_items(blocks, override_num_blocks=len(blocks)).map_batches(
        BlockInfer, fn_constructor_kwargs=work.worker_kwargs(), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(blocks))), num_cpus=work.cfg.cpus_per_actor,
        ray_remote_args_fn=_actor_restarts, runtime_env={"env_vars": aws_settings()} if work.store.uri.is_s3 else None)


def _actor_restarts() -> dict[str, int]:
    """An actor lost with its host is restarted on a host that is left and redoes the block it held:
    a block is written whole into chunks of its own, so a block written twice is written the same. Its
    block is retried without a count: until Ray declares the lost host dead (health checks, ~15-30 s),
    each retry meets a refused connection at once, and a count of them ran out before the restart (a
    job failed so; Ray's own chaos tests retry so, ray#59209). The restarts are counted; an error raised
    by the block itself is not retried (the entry stays unpublished; rerun to retry)."""
    return {"max_restarts": 3, "max_task_retries": -1}


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="cells", desc="infer", disable=not enabled, unit_scale=True)
