"""``scmm-atlas bench chaos``: the pipeline under random SIGKILLs, and under S3 faults; counts.

Data: generated CITE-like inputs (``--cells``, default 600 cells x 40 genes + 6 proteins). Each
*run* gets its own store, workdir and MLflow database:

1. a clean run of ``scmm-atlas run`` (ingest -> stats -> train with 2 Ray Train workers -> infer
   on Ray actors; no report) gives the reference outputs and the run's length;
2. ``--runs N`` chaos runs: the same command, and one process is SIGKILLed: run ``i`` targets the
   kinds in turn (the driver, a Ray Train worker, a loader read actor, an inference actor; starting
   at ``SCMM_ATLAS_CHAOS_SEED`` mod 4), one of its processes drawn, at a moment after the first one
   appears drawn uniformly over the first 80 % of the span that kind lived in the clean run (a run in which
   no process of the kind lives then, having ended sooner than the clean run's, runs again with the moment
   drawn over half that span, at most twice). Then the
   command is rerun (at most twice) until it exits 0. A reader thread reads the published results
   throughout;
3. with ``--s3``, as many runs against a local moto S3 server behind
   :class:`~.s3faults.FaultyProxy` (errors and latency at ``S3_FAULT_RATE``), without kills.

A run *survives* when its final outputs equal the clean run's (store cells and counts exactly;
registered model weights and published embeddings and predictions within float tolerance; one
model version), every store entry is published (nothing half-written left visible), and the reader
never saw a partial or missing version. ``bytes_lost``: bytes of reference outputs missing or
different at the end, summed over runs (must be 0).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import format_table

CELLS, GENES, PROTEINS = 600, 40, 6
RUNS = 5
KINDS = ("driver", "train worker", "read actor", "inference actor")
REDRAWS = 2  # a run whose kind ended before its drawn moment runs again with a moment drawn earlier
S3_FAULT_RATE = 0.03  # each fault costs a client backoff (~0.5 s in botocore's standard mode)
S3_ENV = {"SCMM_ATLAS_S3_MAX_ATTEMPTS": "10", "SCMM_ATLAS_S3_READ_TIMEOUT": "0.3"}  # a held request: retried soon
RTOL, ATOL = 1e-4, 1e-5


def _inputs(folder: Path, cells: int) -> list[str]:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    names = pd.Index([f"c{i}" for i in range(cells)])
    types = np.array([f"t{i % 3}" for i in range(cells)])
    out = []
    for mod, width, prefix in (("RNA", GENES, "g"), ("ADT", PROTEINS, "p")):
        scale = rng.gamma(2.0, 2.0, size=(3, width))[np.arange(cells) % 3]
        x = sp.csr_matrix(rng.poisson(scale).astype(np.float32))
        obs = pd.DataFrame({"cell_type": types}, index=names) if mod == "RNA" else pd.DataFrame(index=names)
        path = folder / f"{mod.lower()}.h5ad"
        ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"{prefix}{j}" for j in range(width)])).write_h5ad(path)
        out.append(f"{mod}={path}")
    return out


def _config(folder: Path, store: str, inputs: list[str], workdir: str | None = None) -> Path:
    import yaml

    cfg = {"store": store, "workdir": workdir or str(folder / "work"),
           "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
           "ingest": {"inputs": inputs, "label_key": "cell_type"}, "stats": {"n_top_genes": GENES},
           "train": {"config": "atlas_cite", "num_workers": 2,
                     "overrides": ["train.epochs=4", "train.warmup_epochs=1", "train.batch_size=64",
                                   "train.patience=10", "distributed.val_fraction=0.2",
                                   "distributed.loader.block_cells=128", "distributed.checkpoint_every_steps=3",
                                   "model.modalities.RNA.hidden=32", "model.modalities.ADT.hidden=32"]},
           "infer": {"executor": "ray", "actors": 1}, "report": {"enabled": False}}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tree(pid: int) -> list[Any]:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def _kind(proc: Any, driver: int) -> str | None:
    if proc.pid == driver:
        return "driver"
    try:
        title = " ".join(proc.cmdline())
    except Exception:  # a process that just exited
        return None
    for marker, kind in (("RayTrainWorker", "train worker"), ("BlockFeeder", "read actor"),
                         ("BlockInfer", "inference actor")):
        if marker in title:
            return kind
    return None


def _end(proc: subprocess.Popen, seen: dict[int, Any]) -> None:
    """Wait for the driver, then kill whatever of its tree outlived it (a killed driver's local Ray)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=900)
    for p in list(seen.values()):
        with contextlib.suppress(Exception):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class Attempt:
    code: int
    killed: str | None = None  # the kind of process killed
    windows: dict[str, list[float]] = field(default_factory=dict)  # kind -> [first, last] seconds seen


def _pipeline(config: Path, log: Path, env: dict[str, str], kill: tuple[str, float] | None,
              rng: random.Random) -> Attempt:
    """Run the pipeline once; with ``kill`` = (kind, seconds), SIGKILL a process of that kind that
    many seconds after the first one appeared (nothing, if none lives then). Records when each kind
    of process was alive."""
    cmd = [sys.executable, "-m", "scmm_atlas.cli", "run", "--config", str(config), "--no-progress"]
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    seen: dict[int, Any] = {}
    killed, windows, t0 = None, {}, time.monotonic()
    while proc.poll() is None:
        now, present = time.monotonic() - t0, {}
        for p in _tree(proc.pid):
            seen[p.pid] = p
            if (kind := _kind(p, proc.pid)) is not None:
                present.setdefault(kind, []).append(p)
                windows.setdefault(kind, [now, now])[1] = now
        if kill is not None and killed is None and kill[0] in present and now >= windows[kill[0]][0] + kill[1]:
            with contextlib.suppress(Exception):
                rng.choice(present[kill[0]]).send_signal(signal.SIGKILL)
                killed = kill[0]
        time.sleep(0.05)
    _end(proc, seen)
    return Attempt(proc.returncode, killed, windows)


@dataclass
class Reader:
    """Reads the latest published results over and over; counts reads and what looked wrong."""

    store: str
    reads: int = 0
    problems: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Reader:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        from ..errors import StoreError
        from ..store import open_store, store_exists
        from ..store.results import open_results

        while not self._stop.wait(0.2):
            try:
                if not store_exists(self.store):
                    continue
                with open_store(self.store) as store:
                    res = open_results(store)
                    emb = res.embedding("joint")
                    pred = res.prediction("RNA", "ADT")
            except StoreError as exc:  # no store or nothing published yet; after a first read: a lost version
                if self.reads:
                    self.problems.append(f"published results missing: {exc}"[:300])
                continue
            except Exception as exc:  # any other failure of a reader is what is counted
                self.problems.append(f"read failed: {exc!r}"[:300])
                continue
            self.reads += 1
            n = res.record.n_cells
            for name, arr in (("embedding", emb), ("prediction", pred)):
                if arr.shape[0] != n or not np.isfinite(arr).all() or (np.abs(arr).sum(axis=1) == 0).any():
                    self.problems.append(f"{name} of {res.record.entry}: partial ({arr.shape}, n_cells {n})")


def snapshot(store_uri: str, tracking: str) -> dict[str, Any]:
    """What a run leaves: the store's cells and counts, the registered model, published results."""
    import mlflow

    from ..infer.trained import load_trained
    from ..store import open_store
    from ..store.results import _backend, index, open_results

    out: dict[str, Any] = {}
    with open_store(store_uri) as store:
        out["obs_id"] = store.obs(["obs_id"])["obs_id"].to_numpy().astype(str)
        for mod in store.modalities:
            out[f"counts/{mod}"] = store.read(mod, 0, store.n_obs).toarray()
        published = index(store)
        out["versions"] = [r.version for r in published]
        out["unpublished"] = sorted(set(_backend(store).list_entries(store)) - {r.entry for r in published})
        res = open_results(store)
        out["results/joint"] = res.embedding("joint")
        for source, target in res.spec.pairs:
            out[f"results/{target}_from_{source}"] = res.prediction(source, target)
    client = mlflow.MlflowClient(tracking)
    models = client.search_model_versions("name='scmm-atlas'")
    out["model_versions"] = len(models)
    trained = load_trained(f"models:/scmm-atlas/{max(int(m.version) for m in models)}", tracking=tracking)
    for name, tensor in trained.state.items():
        out[f"model/{name}"] = tensor.detach().cpu().numpy()
    return out


def compare(got: dict[str, Any], want: dict[str, Any]) -> tuple[int, list[str]]:
    """(bytes of ``want``'s arrays missing or different in ``got``, what differed)."""
    lost, issues = 0, []
    for key, ref in want.items():
        if not isinstance(ref, np.ndarray):
            if got.get(key) != ref:
                issues.append(f"{key}: {got.get(key)!r} != {ref!r}")
            continue
        arr = got.get(key)
        exact = key.startswith(("counts/", "obs_id"))
        same = (arr is not None and arr.shape == ref.shape
                and (np.array_equal(arr, ref) if exact else np.allclose(arr, ref, rtol=RTOL, atol=ATOL)))
        if not same:
            lost += ref.nbytes
            issues.append(f"{key} differs")
    if got.get("unpublished"):
        issues.append(f"unpublished entries left: {got['unpublished']}")
    return lost, issues


def _one(folder: Path, inputs: list[str], *, store: str, env: dict[str, str], kill: tuple[str, float] | None,
         rng: random.Random, workdir: str | None = None) -> dict[str, Any]:
    folder.mkdir(parents=True)
    config = _config(folder, store, inputs, workdir)
    log = folder / "log.txt"
    with Reader(store) as reader:
        t0 = time.perf_counter()
        first = last = _pipeline(config, log, env, kill, rng)
        wall = time.perf_counter() - t0
        reruns = 0
        while last.code != 0 and reruns < 2:
            reruns += 1
            last = _pipeline(config, log, env, None, rng)
    return {"code": last.code, "killed": first.killed, "windows": first.windows, "reruns": reruns, "wall_s": wall,
            "reads": reader.reads, "problems": reader.problems, "log": log,
            "tracking": f"sqlite:///{folder / 'mlflow.db'}"}


def _judge(got: dict[str, Any], store: str, want: dict[str, Any]) -> tuple[int, list[str]]:
    """Bytes lost and what went wrong in a run: its outputs against the clean run's, its reader's findings."""
    if got["code"] != 0:
        return sum(v.nbytes for v in want.values() if isinstance(v, np.ndarray)), ["did not finish", *got["problems"]]
    lost, issues = compare(snapshot(store, got["tracking"]), want)
    return lost, issues + got["problems"]


def _s3_runs(tmp: Path, inputs: list[str], want: dict[str, Any], runs: int, env: dict[str, str],
             totals: dict[str, int]) -> None:
    """``runs`` pipelines with the store and the workdir (stage records, checkpoints) on S3 behind
    :class:`~.s3faults.FaultyProxy`; the outputs, read from moto directly, must equal the clean run's."""
    import boto3

    from .s3faults import FaultyProxy, moto_server

    keys = {"AWS_ACCESS_KEY_ID": "chaos", "AWS_SECRET_ACCESS_KEY": "chaos", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*keys, "AWS_ENDPOINT_URL", *S3_ENV]}
    with moto_server() as moto:
        os.environ.update({**keys, **S3_ENV, "AWS_ENDPOINT_URL": moto})  # this process (reader, snapshot): moto
        try:
            for i in range(runs):
                bucket = f"chaos-{i}"
                boto3.client("s3", endpoint_url=moto).create_bucket(Bucket=bucket)
                with FaultyProxy(moto, rate=S3_FAULT_RATE, seed=i, hold_s=0.6) as proxy:
                    got = _one(Path(tmp, f"s3-{i}"), inputs, store=f"s3://{bucket}/atlas.zarr",
                               env={**env, **keys, **S3_ENV, "AWS_ENDPOINT_URL": proxy.url}, kill=None,
                               rng=random.Random(i), workdir=f"s3://{bucket}/work")
                lost, issues = _judge(got, f"s3://{bucket}/atlas.zarr", want)
                totals["s3_faults_injected"] += proxy.faults_injected
                totals["s3_ops_completed"] += proxy.ops_completed
                totals["bytes_lost"] += lost
                print(f"  S3 run {i + 1}: {proxy.faults_injected} faults injected, {proxy.ops_completed} requests "
                      f"completed, {got['reruns']} rerun(s), {got['wall_s']:.0f} s; "
                      f"{'outputs equal' if not issues else 'FAILED: ' + '; '.join(issues)[:500]}", flush=True)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def run(args: argparse.Namespace) -> list[dict]:
    runs = args.runs or RUNS
    cells = args.cells or CELLS
    seed0 = int(os.environ.get("SCMM_ATLAS_CHAOS_SEED", 0))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SCMM_ATLAS_RAY_DASHBOARD": "0"}
    totals = {"kills_injected": 0, "kills_survived": 0, "bytes_lost": 0, "s3_faults_injected": 0,
              "s3_ops_completed": 0}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="scmm-chaos-") as tmp:
        inputs = _inputs(Path(tmp), cells)
        clean = _one(Path(tmp, "clean"), inputs, store=str(Path(tmp, "clean", "atlas.zarr")), env=env,
                     kill=None, rng=random.Random(seed0))
        if clean["code"] != 0:
            raise RuntimeError(f"the clean run failed: see\n{clean['log'].read_text()[-3000:]}")
        want = snapshot(str(Path(tmp, "clean", "atlas.zarr")), clean["tracking"])
        windows = clean["windows"]
        print(f"clean run: {clean['wall_s']:.0f} s, {cells:,} cells; alive (s): "
              + ", ".join(f"{k} {a:.0f}-{b:.0f}" for k, (a, b) in sorted(windows.items())), flush=True)
        for i in range(runs):
            rng = random.Random(seed0 * 1000 + i + 1)
            kind = KINDS[(seed0 + i) % len(KINDS)]  # every kind in turn, at a moment drawn while it lives
            first, last = windows.get(kind, [0.0, 0.0])
            for attempt in range(REDRAWS + 1):  # a run faster than the clean one can end the kind before the moment
                folder = Path(tmp, f"kill{i}" + (f"-{attempt}" if attempt else ""))
                store = str(folder / "atlas.zarr")
                moment = rng.uniform(0, 0.8 * (last - first)) / 2**attempt
                got = _one(folder, inputs, store=store, env=env, kill=(kind, moment), rng=rng)
                if got["killed"] is not None or kind not in windows:
                    break
                print(f"  run {i + 1}: no {kind} alive {moment:.0f} s after the first one; drawn again, earlier",
                      flush=True)
            lost, issues = _judge(got, store, want)
            injected = got["killed"] is not None
            totals["kills_injected"] += injected
            totals["kills_survived"] += injected and not issues
            totals["bytes_lost"] += lost
            print(f"  run {i + 1}: killed {got['killed'] or f'nothing (no {kind} alive at the drawn moment)'}; "
                  f"{got['reruns']} rerun(s); "
                  f"{got['reads']} reads; {'survived' if not issues else 'FAILED: ' + '; '.join(issues)[:500]}",
                  flush=True)
        if args.s3:
            _s3_runs(Path(tmp), inputs, want, runs, env, totals)
    row = {"system": "scmm-atlas", **totals}
    print()
    print(format_table([row], ["system", *totals]))
    print(f"\nkills survived: {totals['kills_survived']} of {totals['kills_injected']}; bytes lost: "
          f"{totals['bytes_lost']:,} (must be 0)")
    return [row]
