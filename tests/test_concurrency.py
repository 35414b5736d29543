"""Several writers on one store, in real processes: leases, the results index under a lock, layout
shards kept while a run reads them, and readers that only ever see complete versions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import make_planted_stores

from scmm_atlas.store import StoreError, open_store
from scmm_atlas.store.lease import LEASE_DIR, Lease, held
from scmm_atlas.store.results import index, open_results

pytestmark = pytest.mark.slow  # end-to-end: the full tier (make test), not the edit-test loop

HOLD = textwrap.dedent("""
    import sys, time
    from scmm_atlas.store.lease import Lease
    Lease(sys.argv[1], sys.argv[2], data={"who": "child"}).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_lease_is_exclusive_and_a_killed_holder_lets_go_at_once(tmp_path) -> None:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "entry-x"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        assert held(str(tmp_path), "entry-") == {"entry-x": {"who": "child"}}
        with pytest.raises(StoreError, match=f"held by process {child.pid}"):
            Lease(str(tmp_path), "entry-x", wait_s=0.3).acquire()
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert held(str(tmp_path)) == {}  # its process is gone: dead before its expiry
        with Lease(str(tmp_path), "entry-x", data={"who": "me"}):
            assert held(str(tmp_path)) == {"entry-x": {"who": "me"}}
            assert sorted(os.listdir(tmp_path / LEASE_DIR)) == ["entry-x.1.json"]  # the dead one's file removed
        assert held(str(tmp_path)) == {} and os.listdir(tmp_path / LEASE_DIR) == []
    finally:
        child.kill()


def test_a_lease_held_on_another_host_counts_until_it_expires(tmp_path) -> None:
    (tmp_path / LEASE_DIR).mkdir()
    record = {"host": "another-node", "pid": 1, "token": "t", "expires": time.time() + 1.5, "data": {}}
    (tmp_path / LEASE_DIR / "lock-results-index.0.json").write_text(json.dumps(record))
    assert list(held(str(tmp_path))) == ["lock-results-index"]
    with pytest.raises(StoreError, match="on another-node"):
        Lease(str(tmp_path), "lock-results-index", wait_s=0.2).acquire()
    t0 = time.monotonic()
    with Lease(str(tmp_path), "lock-results-index", wait_s=10):  # waits for the expiry, then takes over
        assert 0.5 < time.monotonic() - t0 < 5


# A holder whose work checks its lease every 0.1 s; told on stdout when it stops
WORKER = textwrap.dedent("""
    import sys, time
    from scmm_atlas.store import StoreError
    from scmm_atlas.store.lease import Lease
    lease = Lease(sys.argv[1], "entry-x", data={"who": "stalled"}, ttl=float(sys.argv[2])).acquire()
    print("held", flush=True)
    for _ in range(300):
        try:
            lease.check()
        except StoreError as exc:
            print(exc, flush=True)
            lease.release()
            sys.exit(3)
        time.sleep(0.1)
""")


def test_a_holder_stalled_past_its_ttl_learns_it_lost_the_lease_and_overwrites_nothing(tmp_path) -> None:
    """SIGSTOP past the TTL, another process takes the lease, SIGCONT: the stalled holder's next heartbeat
    must not write the lease again; its work stops with one error naming the lease."""
    ttl = 1.5
    child = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(ttl)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        child.send_signal(signal.SIGSTOP)
        time.sleep(ttl + 0.5)
        with Lease(str(tmp_path), "entry-x", data={"who": "taker"}, ttl=60, wait_s=5) as taker:
            child.send_signal(signal.SIGCONT)
            assert child.wait(timeout=30) == 3
            said = child.stdout.read().strip()
            assert said.count("\n") == 0 and "_leases/entry-x" in said and "lease lost (not renewed for" in said
            assert held(str(tmp_path)) == {"entry-x": {"who": "taker"}}  # neither rewritten nor removed
            assert os.listdir(tmp_path / LEASE_DIR) == ["entry-x.1.json"]
            taker.check()
    finally:
        child.kill()


def test_a_lease_whose_file_was_taken_away_is_lost_and_its_with_block_fails(tmp_path) -> None:
    with (pytest.raises(StoreError, match="lease lost \\(taken by another holder\\)"),
          Lease(str(tmp_path), "lock-results-index", ttl=0.6) as lease):
        (tmp_path / LEASE_DIR / "lock-results-index.0.json").unlink()  # e.g. removed by hand
        deadline = time.monotonic() + 10
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert os.listdir(tmp_path / LEASE_DIR) == []
    with Lease(str(tmp_path), "lock-results-index", ttl=0.6) as again:  # taken anew, renewed while held
        time.sleep(1.0)
        again.check()



def test_an_entry_whose_lease_was_lost_is_not_published(tmp_path) -> None:
    """An inference that lost its entry's lease (a publish meanwhile may have removed the entry) must not
    publish it: one error naming the lease, the index as it was."""
    from scmm_atlas.store.results import ENTRY_LEASE, ResultSpec, begin, publish

    uri = str(make_planted_stores(tmp_path, n=120, backends=("zarr",))["zarr"])
    with open_store(uri) as store:
        writer = begin(store, ResultSpec(version="1", model_uri="m", latent_dim=2, modalities=["RNA"], pairs=[],
                                         target_features={}, library_size=None))
        full = np.ones((store.n_obs, 2), dtype=np.float32)
        writer.write_cells(0, full, {"RNA": full}, {})
        writer.lease.release()  # held again with a short TTL, then taken away
        writer.lease = Lease(uri, ENTRY_LEASE + writer.spec.entry, ttl=0.6).acquire()
        (tmp_path / "cells.zarr" / LEASE_DIR / f"{ENTRY_LEASE}{writer.spec.entry}.0.json").unlink()
        deadline = time.monotonic() + 10
        while writer.lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(StoreError, match=f"{LEASE_DIR}/{ENTRY_LEASE}{writer.spec.entry}: lease lost"):
            publish(store, writer)
        writer.close()
        assert index(store) == []


PUBLISHER = textwrap.dedent("""
    import random, sys, time
    import numpy as np
    from scmm_atlas.store import open_store
    from scmm_atlas.store.results import ResultSpec, begin, publish
    uri, who, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(who)
    with open_store(uri) as store:
        for r in range(rounds):
            spec = ResultSpec(version=f"p{who}", model_uri="m", latent_dim=2, modalities=["RNA"], pairs=[],
                              target_features={}, library_size=None)
            writer = begin(store, spec)
            value = np.float32(100 * (who + 1) + r + 1)  # which writer and round, in every cell
            time.sleep(rng.uniform(0, 0.3))  # interleave with the others' publishes
            full = np.full((store.n_obs, 2), value, dtype=np.float32)
            writer.write_cells(0, full, {"RNA": full}, {})
            time.sleep(rng.uniform(0, 0.3))
            publish(store, writer)
    print("done", flush=True)
""")


@pytest.mark.parametrize("backend", ["zarr", "soma"])
def test_concurrent_publishers_lose_nothing_and_readers_see_complete_versions(tmp_path, backend, monkeypatch) -> None:
    """Three processes publish four rounds each of their own version while this one reads the latest
    throughout: every version ends published with its last round, no writer's entry was removed
    under it, and every read returned one writer's complete round (no zeros, no mixture)."""
    uri = str(make_planted_stores(tmp_path, n=300, backends=(backend,))[backend])
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, uri, str(who), "4"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for who in range(3)]
    seen, problems, stop = [], [], threading.Event()

    def read_throughout() -> None:
        with open_store(uri) as store:
            while not stop.is_set():
                try:
                    reader = open_results(store)
                    emb = reader.embedding("joint")
                except StoreError:  # nothing published yet
                    continue
                except Exception as exc:  # any failure of a reader is what this test looks for
                    problems.append(repr(exc)[:500])
                    continue
                if emb.shape != (300, 2) or not np.all(emb == emb[0, 0]) or emb[0, 0] == 0:
                    problems.append((reader.record.entry, np.unique(emb)[:5]))
                seen.append(float(emb[0, 0]))

    reader = threading.Thread(target=read_throughout)
    reader.start()
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        stop.set()
        reader.join()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.strip() == "done", err[-2000:]
    assert not problems, problems
    assert len(seen) > 0
    with open_store(uri) as store:
        assert sorted(e.version for e in index(store)) == ["p0", "p1", "p2"]
        for who in range(3):
            assert open_results(store, f"p{who}").embedding("joint")[0, 0] == 100 * (who + 1) + 4


def test_a_layout_rebuild_keeps_the_shards_a_running_training_reads(tmp_path) -> None:
    from scmm_atlas.data.layout import Layout, layout_uri, open_root
    from scmm_atlas.data.prepare import pin, prepare_layout

    uri = str(make_planted_stores(tmp_path, n=400, backends=("zarr",))["zarr"])
    with open_store(uri) as store:
        info, _ = prepare_layout(store, val_fraction=0.1, shard_cells=100)
        run = pin(store, info)  # what `scmm-atlas train` holds while it runs
        before = Layout(layout_uri(store.uri), "train", info.splits["train"]).read(0, info.n_cells("train"))
    cli = [sys.executable, "-m", "scmm_atlas.cli", "prepare", "--store", uri, "--val-fraction", "0.3", "--no-progress"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shards = set(open_root(layout_uri(store.uri), mode="r")["shards"].group_keys())
    old = {name for split in info.splits.values() for name, _ in split}
    assert old <= shards and len(shards) > len(old)  # the new layout committed beside the pinned one
    again = Layout(layout_uri(store.uri), "train", info.splits["train"]).read(0, info.n_cells("train"))
    for key, arr in before.items():
        np.testing.assert_array_equal(again[key], arr)
    run.release()
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "up to date" in done.stdout, done.stderr
    left = set(open_root(layout_uri(store.uri), mode="r")["shards"].group_keys())
    assert not (left & old) and left == shards - old  # no run reads them any more: removed


@pytest.mark.parametrize("backend", ["zarr", "soma"])
def test_an_append_while_training_and_inference_read_changes_nothing_they_see(tmp_path, backend) -> None:
    """`ingest --append` in another process while this one reads what training reads (the pinned
    layout), what inference reads (store rows up to the count it started with) and the published
    results: every read succeeds and returns what it returned before the append."""
    from conftest import random_counts, write_h5ad

    from scmm_atlas.data.layout import Layout, layout_uri
    from scmm_atlas.data.prepare import prepare_layout
    from scmm_atlas.store.results import ResultSpec, begin, publish

    uri = str(make_planted_stores(tmp_path, n=400, backends=(backend,))[backend])
    with open_store(uri) as store:
        info, _ = prepare_layout(store, shard_cells=100)
        writer = begin(store, ResultSpec(version="1", model_uri="m", latent_dim=2, modalities=["RNA"], pairs=[],
                                         target_features={}, library_size=None))
        full = np.arange(800, dtype=np.float32).reshape(400, 2) + 1
        writer.write_cells(0, full, {"RNA": full}, {})
        publish(store, writer)
    n_new = 3000
    new = tmp_path / "new"
    new.mkdir()
    names = [f"n{i}" for i in range(n_new)]
    write_h5ad(new / "rna.h5ad", random_counts(n_new, 20, 7), obs_names=names, obs={"donor": ["b9"] * n_new})
    write_h5ad(new / "adt.h5ad", random_counts(n_new, 4, 8), obs_names=names, var_names=[f"p{j}" for j in range(4)])

    def read_all() -> list[np.ndarray]:
        with open_store(uri) as store:
            layout = Layout(layout_uri(store.uri), "train", info.splits["train"]).read(0, info.n_cells("train"))
            rows = [store.read(mod, 0, 400).toarray() for mod in ("RNA", "ADT")]
            emb = open_results(store).embedding("joint")
        return [layout["RNA/data"], layout["cell"], *rows, emb[:400]]

    before, problems, reads, stop = read_all(), [], [0], threading.Event()

    def read_throughout() -> None:
        while not stop.is_set():
            try:
                got = read_all()
            except Exception as exc:  # any failure of a reader is what this test looks for
                problems.append(repr(exc)[:500])
                continue
            reads[0] += 1
            problems.extend(i for i, (a, b) in enumerate(zip(got, before, strict=True)) if not np.array_equal(a, b))

    thread = threading.Thread(target=read_throughout)
    thread.start()
    try:
        cmd = ["ingest", "--store", uri, f"RNA={new / 'rna.h5ad'}", f"ADT={new / 'adt.h5ad'}", "--append",
               "--batch-key", "donor", "--no-progress"]
        done = subprocess.run([sys.executable, "-m", "scmm_atlas.cli", *cmd], capture_output=True, text=True,
                              timeout=300)
        time.sleep(0.5)  # reads after the append too
    finally:
        stop.set()
        thread.join()
    assert done.returncode == 0, done.stderr
    assert not problems and reads[0] >= 2, (problems, reads)
    with open_store(uri) as store:
        assert store.n_obs == 400 + n_new


def test_three_infer_commands_at_once_publish_every_version(tmp_path) -> None:
    """`scmm-atlas infer` three times at once on one store (versions 1, 2 and 1 again, on worker
    threads): both versions end published with the embeddings a run alone gives, and the store
    holds no other entry (the superseded attempt of version 1 is removed: no retention here)."""
    from conftest import write_model_folder

    uri = str(make_planted_stores(tmp_path, n=600, backends=("zarr",))["zarr"])
    models = {v: write_model_folder(uri, tmp_path / f"model{v}", seed=int(v)) for v in ("1", "2")}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"SCMM_ATLAS_RESULTS_RETAIN_S": "0"}
    procs = [subprocess.Popen([sys.executable, "-m", "scmm_atlas.cli", "infer", "--store", uri, "--model",
                               str(models[v]), "--version", v, "--top-n", "3", "--no-progress"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in ("1", "2", "1")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    import zarr

    from scmm_atlas.infer.stage import InferConfig, infer
    from scmm_atlas.infer.trained import load_trained

    (tmp_path / "alone").mkdir()
    alone = str(make_planted_stores(tmp_path / "alone", n=600, backends=("zarr",))["zarr"])
    with open_store(uri) as store:
        published = index(store)
        assert sorted(r.version for r in published) == ["1", "2"]
        assert sorted(zarr.open_group(f"{uri}/results", mode="r").group_keys()) == sorted(r.entry for r in published)
        for v in ("1", "2"):
            infer(alone, load_trained(str(models[v]), version=v), config=InferConfig(top_n=3, executor="local"),
                  progress=False)
            with open_store(alone) as ref:
                np.testing.assert_array_equal(open_results(store, v).embedding("joint"),
                                              open_results(ref, v).embedding("joint"))
