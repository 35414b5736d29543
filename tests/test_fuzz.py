"""Hostile input files: seeded corruptions of small valid inputs, ingested by the real command line.

Every case must end in success, or in exit 2 with one ``error:`` line and no traceback, leaving an
existing store byte-identical and creating no new store. Imports cost seconds per process, so the
cases run in one child process that calls ``cli.main`` per case (a child that dies, e.g. of a
segfault in h5py or TileDB, is reported with the case it was running); a few cases also run as a
process each, so that whatever a library prints to the real stderr is checked too.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import random_counts, tree_digest, write_h5ad

SEED = 18
MIN_CASES = 200
BACKENDS = ("soma", "zarr")
N_CELLS, N_GENES, N_PROTEINS = 40, 30, 5

Edit = Callable[[h5py.File], None]


# --- valid inputs -------------------------------------------------------------------------------------

def _valid_inputs(folder: Path) -> dict[str, Path]:
    """An RNA and an ADT .h5ad (obs column ``donor``) and a 10x .h5 holding both modalities."""
    rna, adt = random_counts(N_CELLS, N_GENES, 1), random_counts(N_CELLS, N_PROTEINS, 2)
    out = {"rna": write_h5ad(folder / "rna.h5ad", rna, obs={"donor": ["d1", "d2"] * (N_CELLS // 2)}),
           "adt": write_h5ad(folder / "adt.h5ad", adt, var_names=[f"p{j}" for j in range(N_PROTEINS)]),
           "tenx": folder / "tenx.h5"}
    csc = sp.hstack([rna, adt]).T.tocsc()  # 10x: features x cells, in CSC
    ids = [f"g{j}" for j in range(N_GENES)] + [f"p{j}" for j in range(N_PROTEINS)]
    types = ["Gene Expression"] * N_GENES + ["Antibody Capture"] * N_PROTEINS
    with h5py.File(out["tenx"], "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = csc.data.astype(np.int32), csc.indices, csc.indptr
        g["shape"] = np.array(csc.shape, dtype=np.int32)
        g["barcodes"] = np.array([f"c{i}" for i in range(N_CELLS)], dtype="S8")
        feats = g.create_group("features")
        feats["id"], feats["name"] = np.array(ids, dtype="S8"), np.array(ids, dtype="S8")
        feats["feature_type"] = np.array(types, dtype="S20")
    return out


# --- structural edits (h5py on a copy) ---------------------------------------------------------------

def _replace(key: str, make: Callable[[np.ndarray], np.ndarray]) -> Edit:
    """Replace dataset ``key`` by ``make(old values)``, keeping its attributes."""
    def edit(f: h5py.File) -> None:
        old = f[key][()]
        attrs = dict(f[key].attrs)
        del f[key]
        new = make(old)
        f.create_dataset(key, data=new, dtype=h5py.string_dtype() if new.dtype.kind in "OU" else None)
        f[key].attrs.update(attrs)
    return edit


def _set_at(i: int, value) -> Callable[[np.ndarray], np.ndarray]:
    def make(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[i] = value
        return a
    return make


def _attr(key: str, name: str, value=None) -> Edit:
    """Set attribute ``name`` of ``key`` (delete it when ``value`` is None)."""
    def edit(f: h5py.File) -> None:
        if value is None:
            del f[key].attrs[name]
        else:
            f[key].attrs[name] = value
    return edit


def _swap(key: str, make: Callable[[h5py.File], None]) -> Edit:
    """Delete ``key`` and build something else there."""
    def edit(f: h5py.File) -> None:
        del f[key]
        make(f)
    return edit


def _names(n: int, fmt: Callable[[int], object], dtype=None) -> Callable[[np.ndarray], np.ndarray]:
    return lambda _old: np.array([fmt(i) for i in range(n)], dtype=dtype)


def _non_utf8(_i: int) -> bytes:
    return b"\xff\xfe" + bytes([0x80 + _i % 64])


def _dup_name(names: np.ndarray) -> np.ndarray:
    return _set_at(3, names[1])(names)


def _dense(values: np.ndarray) -> Edit:
    return _swap("X", lambda f: f.create_dataset("X", data=values))


def _group(key: str) -> Edit:
    return _swap(key, lambda f: f.create_group(key))


def _obs_donor_codes(make: Callable[[np.ndarray], np.ndarray]) -> Edit:
    return _replace("obs/donor/codes", make)


H5AD_EDITS: dict[str, tuple[Edit, list[str]]] = {
    # counts of the wrong kind
    "data_bytes": (_replace("X/data", lambda a: np.array([b"x"] * len(a))), []),
    "data_vlen_str": (_replace("X/data", lambda a: a.astype(str).astype(object)), []),
    "data_complex": (_replace("X/data", lambda a: a.astype(np.complex64)), []),
    "data_bool": (_replace("X/data", lambda a: a.astype(bool)), []),
    "data_nan": (_replace("X/data", _set_at(0, np.nan)), []),
    "data_inf": (_replace("X/data", _set_at(-1, -np.inf)), []),
    "data_negative": (_replace("X/data", _set_at(2, -1)), []),
    "data_fraction": (_replace("X/data", _set_at(2, 2.5)), []),
    "data_past_int32": (_replace("X/data", _set_at(4, 3e9)), []),
    "data_uint64_huge": (_replace("X/data", lambda a: _set_at(1, 2**63)(a.astype(np.uint64))), []),
    "data_int64_huge": (_replace("X/data", lambda a: _set_at(1, 2**40)(a.astype(np.int64))), []),
    "data_float16": (_replace("X/data", lambda a: a.astype(np.float16)), []),
    "data_2d": (_replace("X/data", lambda a: a.reshape(-1, 1)), []),
    "data_short": (_replace("X/data", lambda a: a[:-5]), []),
    "data_empty": (_replace("X/data", lambda a: a[:0]), []),
    "data_compound": (_replace("X/data", lambda a: np.array([(v, v) for v in a], dtype=[("a", "f4"), ("b", "f4")])),
                      []),
    # sparse structure
    "indices_out_of_range": (_replace("X/indices", _set_at(3, 10_000)), []),
    "indices_negative": (_replace("X/indices", _set_at(3, -1)), []),
    "indices_float": (_replace("X/indices", lambda a: a.astype(np.float64) + 0.5), []),
    "indices_short": (_replace("X/indices", lambda a: a[:-7]), []),
    "indices_bytes": (_replace("X/indices", lambda a: a.astype("S4")), []),
    "indptr_decreasing": (_replace("X/indptr", lambda a: _set_at(5, a[5] + 50)(a)), []),
    "indptr_short": (_replace("X/indptr", lambda a: a[:-3]), []),
    "indptr_long": (_replace("X/indptr", lambda a: np.concatenate([a, a[-1:]])), []),
    "indptr_past_end": (_replace("X/indptr", lambda a: _set_at(-1, a[-1] + 100)(a)), []),
    "indptr_negative": (_replace("X/indptr", _set_at(0, -5)), []),
    "indptr_huge": (_replace("X/indptr", lambda a: _set_at(-1, 2**62)(a.astype(np.int64))), []),
    "indptr_float": (_replace("X/indptr", lambda a: a.astype(np.float64) + 0.5), []),
    "indptr_2d": (_replace("X/indptr", lambda a: np.stack([a, a])), []),
    # shape and encoding attributes
    "shape_huge": (_attr("X", "shape", [2**40, N_GENES]), []),
    "shape_negative": (_attr("X", "shape", [-N_CELLS, N_GENES]), []),
    "shape_three_dims": (_attr("X", "shape", [N_CELLS, N_GENES, 1]), []),
    "shape_text": (_attr("X", "shape", "forty by thirty"), []),
    "shape_float": (_attr("X", "shape", [40.5, 30.0]), []),
    "shape_missing": (_attr("X", "shape"), []),
    "shape_too_few_columns": (_attr("X", "shape", [N_CELLS, 10]), []),
    "encoding_missing": (_attr("X", "encoding-type"), []),
    "encoding_garbage": (_attr("X", "encoding-type", "csr_matrix\x01"), []),
    "encoding_number": (_attr("X", "encoding-type", 7), []),
    "encoding_array": (_attr("X", "encoding-type", [1, 2]), []),
    # X replaced
    "x_dense_bytes": (_dense(np.full((N_CELLS, N_GENES), b"7")), []),
    "x_dense_1d": (_dense(np.ones(N_CELLS)), []),
    "x_dense_3d": (_dense(np.ones((N_CELLS, N_GENES, 2))), []),
    "x_dense_nan": (_dense(np.full((N_CELLS, N_GENES), np.nan)), []),
    "x_dense_valid": (_dense(np.ones((N_CELLS, N_GENES), dtype=np.int16)), []),
    "x_dense_wrong_shape": (_dense(np.ones((N_CELLS + 3, N_GENES), dtype=np.int16)), []),
    "x_scalar": (_swap("X", lambda f: f.create_dataset("X", data=3)), []),
    "x_empty_group": (_group("X"), []),
    "x_soft_link_loop": (_swap("X", lambda f: f.__setitem__("X", h5py.SoftLink("/X"))), []),
    "x_dangling_link": (_swap("X", lambda f: f.__setitem__("X", h5py.SoftLink("/nowhere"))), []),
    "x_external_link": (_swap("X", lambda f: f.__setitem__("X", h5py.ExternalLink("/nonexistent.h5", "/X"))), []),
    # obs names
    "obs_index_attr_missing": (_attr("obs", "_index"), []),
    "obs_index_attr_dangling": (_attr("obs", "_index", "nope"), []),
    "obs_index_attr_number": (_attr("obs", "_index", 5), []),
    "obs_names_non_utf8": (_replace("obs/_index", _names(N_CELLS, _non_utf8, "S3")), []),
    "obs_names_all_empty": (_replace("obs/_index", _names(N_CELLS, lambda i: "", object)), []),
    "obs_names_one_empty": (_replace("obs/_index", _set_at(7, "")), []),
    "obs_names_duplicated": (_replace("obs/_index", _dup_name), []),
    "obs_names_very_long": (_replace("obs/_index", _names(N_CELLS, lambda i: f"{i}" + "x" * 100_000, object)), []),
    "obs_names_newline": (_replace("obs/_index", _names(N_CELLS, lambda i: f"cell\n{i}", object)), []),
    "obs_names_control": (_replace("obs/_index", _names(N_CELLS, lambda i: f"c\x07\x1b[31m{i}", object)), []),
    "obs_names_integers": (_replace("obs/_index", _names(N_CELLS, int)), []),
    "obs_names_floats_nan": (_replace("obs/_index", _names(N_CELLS, lambda i: np.nan if i == 3 else float(i))), []),
    "obs_names_2d": (_replace("obs/_index", lambda a: np.stack([a, a], axis=1)), []),
    "obs_names_short": (_replace("obs/_index", lambda a: a[:-4]), []),
    "obs_is_dataset": (_swap("obs", lambda f: f.create_dataset("obs", data=np.arange(N_CELLS))), []),
    "obs_missing": (_swap("obs", lambda f: None), []),
    # var names
    "var_names_non_utf8": (_replace("var/_index", _names(N_GENES, _non_utf8, "S3")), []),
    "var_names_duplicated": (_replace("var/_index", _dup_name), []),
    "var_names_all_empty": (_replace("var/_index", _names(N_GENES, lambda i: "", object)), []),
    "var_names_very_long": (_replace("var/_index", _names(N_GENES, lambda i: f"g{i}" + "y" * 50_000, object)), []),
    "var_names_short": (_replace("var/_index", lambda a: a[:-2]), []),
    "var_names_scalar": (_replace("var/_index", lambda a: np.array(b"g")), []),
    "var_missing": (_swap("var", lambda f: None), []),
    # the obs column read by --batch-key
    "batch_codes_out_of_range": (_obs_donor_codes(_set_at(2, 99)), ["--batch-key", "donor"]),
    "batch_codes_negative_two": (_obs_donor_codes(_set_at(2, -2)), ["--batch-key", "donor"]),
    "batch_codes_short": (_obs_donor_codes(lambda a: a[:-6]), ["--batch-key", "donor"]),
    "batch_codes_float": (_obs_donor_codes(lambda a: a.astype(float) + 0.5), ["--batch-key", "donor"]),
    "batch_no_encoding": (_attr("obs/donor", "encoding-type"), ["--batch-key", "donor"]),
    "batch_unknown_encoding": (_attr("obs/donor", "encoding-type", "hyperbolic"), ["--batch-key", "donor"]),
    "batch_categories_non_utf8": (_replace("obs/donor/categories", _names(2, _non_utf8, "S3")),
                                  ["--batch-key", "donor"]),
    "batch_categories_missing": (_swap("obs/donor/categories", lambda f: None), ["--batch-key", "donor"]),
    "batch_numeric_nan": (_swap("obs/donor", lambda f: f.create_dataset("obs/donor", data=np.full(N_CELLS, np.nan))),
                          ["--batch-key", "donor"]),
    "batch_short_array": (_swap("obs/donor", lambda f: f.create_dataset("obs/donor", data=np.arange(3))),
                          ["--batch-key", "donor"]),
    # a counts layer of the wrong kind
    "layer_wrong_shape": (lambda f: f["layers"].create_dataset("counts", data=np.ones((3, 3))), ["--layer", "counts"]),
    "layer_scalar": (lambda f: f["layers"].create_dataset("counts", data=1), ["--layer", "counts"]),
    "layers_is_dataset": (_swap("layers", lambda f: f.create_dataset("layers", data=1)), ["--layer", "counts"]),
}

TENX_EDITS: dict[str, tuple[Edit, list[str]]] = {
    "shape_one_value": (_replace("matrix/shape", lambda a: a[:1]), []),
    "shape_three_values": (_replace("matrix/shape", lambda a: np.append(a, 1)), []),
    "shape_text": (_replace("matrix/shape", lambda a: a.astype("S8")), []),
    "shape_negative": (_replace("matrix/shape", lambda a: -a), []),
    "shape_huge": (_replace("matrix/shape", lambda a: _set_at(1, 2**40)(a.astype(np.int64))), []),
    "shape_2d": (_replace("matrix/shape", lambda a: a.reshape(1, 2)), []),
    "features_id_missing": (_swap("matrix/features/id", lambda f: None), []),
    "features_is_dataset": (_swap("matrix/features", lambda f: f.create_dataset("matrix/features", data=1)), []),
    "feature_type_short": (_replace("matrix/features/feature_type", lambda a: a[:-3]), []),
    "feature_type_non_utf8": (_replace("matrix/features/feature_type", _names(N_GENES + N_PROTEINS, _non_utf8, "S3")),
                              []),
    "feature_type_numbers": (_replace("matrix/features/feature_type", lambda a: np.arange(len(a))), []),
    "feature_names_short": (_replace("matrix/features/name", lambda a: a[:-1]), []),
    "feature_ids_duplicated": (_replace("matrix/features/id", _dup_name), []),
    "barcodes_non_utf8": (_replace("matrix/barcodes", _names(N_CELLS, _non_utf8, "S3")), []),
    "barcodes_duplicated": (_replace("matrix/barcodes", _dup_name), []),
    "barcodes_2d": (_replace("matrix/barcodes", lambda a: a.reshape(2, -1)), []),
    "indptr_past_end": (_replace("matrix/indptr", lambda a: _set_at(-1, a[-1] + 100)(a)), []),
    "indptr_short": (_replace("matrix/indptr", lambda a: a[:-2]), []),
    "indices_out_of_range": (_replace("matrix/indices", _set_at(3, 10_000)), []),
    "data_fraction": (_replace("matrix/data", lambda a: a.astype(np.float32) + 0.25), []),
    "data_strings": (_replace("matrix/data", lambda a: a.astype(str).astype(object)), []),
    "matrix_is_dataset": (_swap("matrix", lambda f: f.create_dataset("matrix", data=np.ones((3, 3)))), []),
}


# --- byte-level corruptions ---------------------------------------------------------------------------

def _flip_bits(data: bytes, rng: np.random.Generator, lo: int, hi: int) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        pos = int(rng.integers(lo, max(lo + 1, hi)))
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _byte_variants(data: bytes, rng: np.random.Generator, per_region: int) -> dict[str, bytes]:
    """Bit flips in the superblock, the object headers, anywhere and the end (data); truncations."""
    n = len(data)
    regions = {"superblock": (0, 96), "headers": (96, 4096), "anywhere": (0, n), "tail": (n * 2 // 3, n)}
    out = {f"flip_{name}_{k}": _flip_bits(data, rng, lo, hi)
           for name, (lo, hi) in regions.items() for k in range(per_region)}
    for k in range(per_region):
        out[f"truncate_{k}"] = data[: int(rng.integers(0, n))]
    return out


FIXED: dict[str, Callable[[Path, bytes, np.random.Generator], None]] = {
    "empty_file": lambda p, _d, _r: p.write_bytes(b""),
    "directory": lambda p, _d, _r: p.mkdir(),
    "gzip_of_garbage": lambda p, _d, r: p.write_bytes(gzip.compress(r.bytes(2048))),
    "gzip_of_valid": lambda p, d, _r: p.write_bytes(gzip.compress(d)),
    "random_bytes": lambda p, _d, r: p.write_bytes(r.bytes(4096)),
    "hdf5_magic_then_garbage": lambda p, _d, r: p.write_bytes(b"\x89HDF\r\n\x1a\n" + r.bytes(4096)),
    "text": lambda p, _d, _r: p.write_text("barcode,gene\nAAA,1\n"),
    "zeros": lambda p, d, _r: p.write_bytes(bytes(len(d))),
    "symlink_loop": lambda p, _d, _r: p.symlink_to(p),
}


def _make_cases(folder: Path) -> tuple[list[dict], dict[str, Path]]:
    """Every case as {name, inputs, args}, and the valid inputs; all files are written under ``folder``."""
    rng = np.random.default_rng(SEED)
    folder.mkdir()
    valid = _valid_inputs(folder)
    cases: list[dict] = []

    def add(name: str, kind: str, write: Callable[[Path], list[str]], args: list[str] | None = None) -> None:
        case_dir = folder / f"case{len(cases):03d}"
        case_dir.mkdir()
        cases.append({"name": f"{kind}:{name}", "inputs": write(case_dir), "args": args or []})

    def inputs(kind: str, bad: Path) -> list[str]:
        if kind == "tenx":
            return [str(bad)]
        if kind == "adt":
            return [f"RNA={valid['rna']}", f"ADT={bad}"]
        return [f"RNA={bad}", f"ADT={valid['adt']}"]

    def write_bytes(kind: str, content: bytes) -> Callable[[Path], list[str]]:
        def write(case_dir: Path) -> list[str]:
            bad = case_dir / valid[kind].name
            bad.write_bytes(content)
            return inputs(kind, bad)
        return write

    def write_edit(kind: str, edit: Edit) -> Callable[[Path], list[str]]:
        def write(case_dir: Path) -> list[str]:
            bad = shutil.copy(valid[kind], case_dir / valid[kind].name)
            with h5py.File(bad, "r+") as f:
                edit(f)
            return inputs(kind, Path(bad))
        return write

    def write_fixed(kind: str, make: Callable[[Path, bytes, np.random.Generator], None]) -> Callable[[Path], list[str]]:
        def write(case_dir: Path) -> list[str]:
            bad = case_dir / valid[kind].name
            make(bad, valid[kind].read_bytes(), rng)
            return inputs(kind, bad)
        return write

    for kind, per_region in (("rna", 10), ("tenx", 6), ("adt", 3)):
        for name, content in _byte_variants(valid[kind].read_bytes(), rng, per_region).items():
            add(name, kind, write_bytes(kind, content))
    for kind in ("rna", "tenx"):
        for name, make in FIXED.items():
            add(name, kind, write_fixed(kind, make))
    for kind, edits in (("rna", H5AD_EDITS), ("adt", {k: v for k, v in H5AD_EDITS.items() if k.startswith("var")}),
                        ("tenx", TENX_EDITS)):
        for name, (edit, args) in edits.items():
            add(name, kind, write_edit(kind, edit), args)
    return cases, valid


# --- the child process ------------------------------------------------------------------------------

class _CurrentStderr:
    """Logging's stream: whatever ``sys.stderr`` is now (each case captures its own)."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _run_one(argv: list[str]) -> tuple[int | None, str, str]:
    """``cli.main(argv)`` -> (exit code or None if it raised, stderr, traceback)."""
    from scmm_atlas.cli import main

    err = io.StringIO()
    crash = ""
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # any uncaught exception is what this test looks for
            rc, crash = None, traceback.format_exc()
    return rc, err.getvalue(), crash


def _left_behind(uri: Path) -> list[str]:
    """The new store, or its staging folder, if either is at ``uri``."""
    return sorted(p.name for p in uri.parent.iterdir() if p.name.startswith((uri.name, f".{uri.name}")))


def _drive(spec_file: Path, out_file: Path) -> None:
    """Run every case of ``spec_file`` into a new store and appended to an existing one."""
    spec = json.loads(spec_file.read_text())
    work = Path(spec["work"])
    logging.basicConfig(stream=_CurrentStderr(), level=logging.WARNING, format="%(levelname)s: %(message)s")
    with out_file.open("a") as out:
        for i, case in enumerate(spec["cases"]):
            for mode in ("new", "append"):
                backend = BACKENDS[(i + (mode == "append")) % 2]
                out.write(json.dumps({"start": case["name"], "mode": mode}) + "\n")
                out.flush()
                if mode == "new":
                    uri = work / f"new{i}.{backend}"
                    argv = ["ingest", "--store", str(uri), "--backend", backend, "--no-stats"]
                else:
                    uri = work / f"existing.{backend}"
                    before = tree_digest(uri)
                    argv = ["ingest", "--store", str(uri), "--append", "--dataset", f"f{i}", "--prefix-barcodes"]
                rc, err, crash = _run_one([*argv, "--no-progress", *case["args"], *case["inputs"]])
                result = {"name": case["name"], "mode": mode, "backend": backend, "rc": rc, "stderr": err,
                          "crash": crash}
                if mode == "new":
                    result["left"] = _left_behind(uri)
                    shutil.rmtree(uri, ignore_errors=True)
                elif rc == 0:  # a harmless corruption: back to the store every case starts from
                    shutil.rmtree(uri)
                    shutil.copytree(work / f"pristine.{backend}", uri)
                else:
                    result["changed"] = sorted(k for k, v in tree_digest(uri).items() ^ before.items())
                out.write(json.dumps(result) + "\n")
                out.flush()


# --- checks ---------------------------------------------------------------------------------------

def _problems(result: dict) -> list[str]:
    """What is wrong with one case's outcome (empty: success, or a clean one-line refusal)."""
    out = []
    lines = result["stderr"].strip().splitlines()
    if result["crash"] or "Traceback" in result["stderr"]:
        out.append("uncaught exception:\n" + (result["crash"] or result["stderr"]))
    elif result["rc"] not in (0, 2):
        out.append(f"exit code {result['rc']}")
    elif result["rc"] == 2:
        errors = [line for line in lines if line.startswith("error:")]
        if len(errors) != 1 or lines[-1] != errors[0]:
            out.append(f"not one closing error line: {lines}")
        if result.get("left"):
            out.append(f"left behind {result['left']}")
        if result.get("changed"):
            out.append(f"store changed: {result['changed']}")
    return out


def _existing_stores(work: Path, valid: dict[str, Path]) -> None:
    from scmm_atlas.ingest.write import IngestOptions, ingest

    for backend in BACKENDS:
        ingest(str(work / f"pristine.{backend}"), [f"RNA={valid['rna']}", f"ADT={valid['adt']}"],
               IngestOptions(backend=backend, dataset="base", progress=False))
        shutil.copytree(work / f"pristine.{backend}", work / f"existing.{backend}")


@pytest.mark.slow
def test_hostile_files_end_in_success_or_one_error_line(tmp_path: Path, record_property) -> None:
    cases, valid = _make_cases(tmp_path / "inputs")
    _existing_stores(tmp_path, valid)
    spec, out = tmp_path / "cases.json", tmp_path / "results.jsonl"
    spec.write_text(json.dumps({"work": str(tmp_path), "cases": cases}))
    child = subprocess.run([sys.executable, __file__, str(spec), str(out)], capture_output=True, text=True,
                           timeout=600)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    results = [r for r in records if "rc" in r]
    if child.returncode != 0:  # died mid-case (a segfault, say): that case is the last one started
        last = records[-1]
        pytest.fail(f"the child died ({child.returncode}) in {last.get('start')} ({last.get('mode')}): "
                    f"{child.stderr[-3000:]}")
    failures = {f"{r['name']} ({r['mode']}, {r['backend']})": p for r in results if (p := _problems(r))}
    n_ok = sum(r["rc"] == 0 for r in results)
    record_property("fuzz_cases", len(cases))
    print(f"\nfuzz: {len(cases)} hostile inputs, {len(results)} ingests ({n_ok} succeeded, "
          f"{len(results) - n_ok} refused), {len(failures)} bad outcomes")
    assert not failures, "\n\n".join(f"{k}: {v[0][:3000]}" for k, v in failures.items())
    assert len(cases) >= MIN_CASES and len(results) == 2 * len(cases)


# tenx:flip_anywhere_5 and rna:indices_out_of_range crashed the interpreter (a segfault in scipy) before
# column indices were checked.
SUBPROCESS_CASES = ("rna:truncate_0", "tenx:flip_headers_0", "tenx:flip_anywhere_5", "rna:indices_out_of_range")


@pytest.mark.slow
def test_hostile_files_in_a_process_each(tmp_path: Path) -> None:
    """A few cases as real ``scmm-atlas ingest`` processes: a crash in C code, or text a library
    prints straight to the process's stderr, would show here."""
    cases = {c["name"]: c for c in _make_cases(tmp_path / "inputs")[0]}
    for name in SUBPROCESS_CASES:
        case = cases[name]
        uri = tmp_path / f"{name.replace(':', '_')}.zarr"
        proc = subprocess.run([sys.executable, "-m", "scmm_atlas.cli", "ingest", "--store", str(uri), "--no-progress",
                               *case["args"], *case["inputs"]], capture_output=True, text=True, timeout=120)
        result = {"name": name, "mode": "new", "rc": proc.returncode, "stderr": proc.stderr, "crash": "",
                  "left": _left_behind(uri)}
        assert not _problems(result), (name, proc.stderr)


if __name__ == "__main__":
    _drive(Path(sys.argv[1]), Path(sys.argv[2]))
