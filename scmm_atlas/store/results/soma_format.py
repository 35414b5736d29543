"""Results on a TileDB-SOMA store: entries are collections under the experiment's ``results``.

An entry holds DenseNDArrays ``X_scmm`` (joint), ``X_scmm_<MOD>``, ``pred_<T>_from_<S>`` and the
``programs`` and ``traversals`` DataFrames. Publishing links them where plain readers look: every measurement's
``obsm`` gets ``scmm_v<version>`` (joint) and ``scmm_v<version>_<MOD>``, and the target
measurement's ``X`` gets ``scmm_v<version>_from_<S>`` (so ``tiledbsoma.io.to_anndata(exp, "ADT",
X_layer_name="scmm_v3_from_RNA")`` returns predicted proteins). The index is the JSON metadata
``scmm_results`` of ``results``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import tiledbsoma as soma

from ...errors import StoreError
from ..base import Store
from ..soma_backend import context
from ..uri import filesystem
from .spec import INDEX_KEY, JOINT, ResultSpec, ResultsReader, ResultsWriter, pair_name, sorted_rows

if TYPE_CHECKING:  # annotations only
    from .spec import ResultRecord

SPEC_KEY = "scmm_result_spec"
T = TypeVar("T")
_READ_TRIES = 10


def array_name(key: str) -> str:
    return "X_scmm" if key == JOINT else f"X_scmm_{key}"


def obsm_name(version: str, key: str) -> str:
    return f"scmm_v{version}" if key == JOINT else f"scmm_v{version}_{key}"


def layer_name(version: str, source: str) -> str:
    return f"scmm_v{version}_from_{source}"


def _open(store: Store, mode: str = "r") -> soma.Experiment:
    return soma.Experiment.open(store.uri.uri, mode, context=context())


def create_entry(store: Store, spec: ResultSpec) -> SomaResultsWriter:
    n, rows = max(spec.n_obs, 1), spec.chunk_rows
    with _open(store, "w") as exp, exp["results"].add_new_collection(spec.entry) as g:
        g.metadata[SPEC_KEY] = json.dumps(spec.to_json())
        arrays = {array_name(k): spec.width(k) for k in [JOINT, *spec.modalities]}
        arrays.update({f"pred_{pair_name(s, t)}": len(spec.target_features[t]) for s, t in spec.pairs})
        for name, width in arrays.items():
            tiles = {"tiledb": {"create": {"dims": {"soma_dim_0": {"tile": rows}, "soma_dim_1": {"tile": width}}}}}
            g.add_new_dense_ndarray(name, type=pa.float32(), shape=(n, width), platform_config=tiles).close()
        uri = g.uri
    return SomaResultsWriter(store, spec, uri)


def open_entry(store: Store, entry: str) -> SomaResultsWriter:
    with _open(store) as exp:
        if entry not in exp["results"]:
            raise StoreError(store.uri, f"results/{entry}", "no such results entry")
        spec = ResultSpec.from_json(json.loads(exp["results"][entry].metadata[SPEC_KEY]))
        uri = exp["results"][entry].uri
    return SomaResultsWriter(store, spec, uri)


def extend_entry(store: Store, entry: str, old: int, n: int) -> SomaResultsWriter:
    """Grow a published entry's arrays to ``n`` rows (TileDB's current domain; nothing is rewritten)."""
    writer = open_entry(store, entry)
    spec = writer.spec
    with soma.Collection.open(writer.uri, "w", context=context()) as g:
        for name in [array_name(k) for k in [JOINT, *spec.modalities]] + [f"pred_{pair_name(*p)}" for p in spec.pairs]:
            if g[name].shape[0] < n:
                g[name].resize((n, g[name].shape[1]))
        spec.n_obs, spec.row_start = max(n, spec.n_obs), old
        g.metadata[SPEC_KEY] = json.dumps(spec.to_json())
    return writer


def _settled(read: Callable[..., T]) -> Callable[..., T]:
    """Retry a read of group metadata that met a fragment another process is still writing (on a
    local filesystem TileDB lists a group's new fragment file before its bytes are there)."""

    @functools.wraps(read)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        for attempt in range(_READ_TRIES):
            try:
                return read(*args, **kwargs)
            except soma.SOMAError as exc:
                if "exceeds file size" not in str(exc) or attempt == _READ_TRIES - 1:
                    raise
                time.sleep(0.02 * (attempt + 1))
        raise AssertionError("unreachable")

    return wrapper


@_settled
def read_index(store: Store) -> dict[str, Any]:
    with _open(store) as exp:
        raw = exp["results"].metadata.get(INDEX_KEY)
    return json.loads(raw) if raw else {}


def write_index(store: Store, index: Mapping[str, Any]) -> None:
    with _open(store, "w") as exp:
        exp["results"].metadata[INDEX_KEY] = json.dumps(index)


@_settled
def list_entries(store: Store) -> list[str]:
    with _open(store) as exp:
        return sorted(exp["results"].keys())


def remove_entry(store: Store, entry: str) -> None:
    """Drop the entry, and its links in obsm / X where they still point at it."""
    with _open(store, "w") as exp:
        uri = exp["results"][entry].uri
        for mod in exp.ms:
            meas = exp.ms[mod]
            for coll_name in ("obsm", "X"):
                if coll_name not in meas:
                    continue
                coll = meas[coll_name]
                for key in [k for k in coll if coll[k].uri.startswith(uri.rstrip("/") + "/")]:
                    del coll[key]
        del exp["results"][entry]
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


class SomaResultsWriter(ResultsWriter):
    def __init__(self, store: Store, spec: ResultSpec, uri: str) -> None:
        super().__init__(store, spec)
        self.uri = uri  # the entry's collection (resolved once, not per block)

    def _array(self, g: soma.Collection, name: str, start: int, values: np.ndarray) -> None:
        g[name].write((slice(start, start + len(values) - 1), slice(None)),
                      pa.Tensor.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))

    def write_cells(self, start: int, joint: np.ndarray, per_modality: Mapping[str, np.ndarray],
                    predictions: Mapping[tuple[str, str], np.ndarray]) -> None:
        self.check_block(start, len(joint))
        with soma.Collection.open(self.uri, "w", context=context()) as g:
            self._array(g, array_name(JOINT), start, joint)
            for m, emb in per_modality.items():
                self._array(g, array_name(m), start, emb)
            for pair, values in predictions.items():
                self._array(g, f"pred_{pair_name(*pair)}", start, values)

    def write_table(self, name: str, table: pd.DataFrame) -> None:
        df = table.reset_index(drop=True)
        arrow = pa.Table.from_pandas(df, preserve_index=False)
        arrow = arrow.append_column("soma_joinid", pa.array(np.arange(len(df), dtype=np.int64)))
        schema = pa.schema([f if f.type != pa.string() else pa.field(f.name, pa.large_string())
                            for f in arrow.schema])
        with soma.Collection.open(self.uri, "w", context=context()) as g, g.add_new_dataframe(
                name, schema=schema, index_column_names=["soma_joinid"], domain=[(0, max(len(df), 1) - 1)]) as out:
            out.write(arrow.cast(schema))

    def _link(self) -> None:
        """Point obsm / X at this entry's arrays. Keys linked to another entry (an earlier attempt of
        this version) are dropped first, in a write of their own: TileDB-SOMA refuses to set a key
        deleted in the same open."""
        spec = self.spec
        with _open(self.store, "w") as exp:
            g = exp["results"][spec.entry]
            links = []
            for mod in exp.ms:
                if "obsm" not in exp.ms[mod]:
                    exp.ms[mod].add_new_collection("obsm")
                links += [(("ms", mod, "obsm"), obsm_name(spec.version, key), g[array_name(key)].uri)
                          for key in [JOINT, *spec.modalities]]
            links += [(("ms", t, "X"), layer_name(spec.version, s), g[f"pred_{pair_name(s, t)}"].uri)
                      for s, t in spec.pairs]
            todo = []
            for path, key, uri in links:
                coll = _member(exp, path)
                if key in coll and coll[key].uri == uri:
                    continue  # already linked (an extended entry): no gap for readers
                if key in coll:
                    del coll[key]
                todo.append((path, key, uri))
        if todo:
            with _open(self.store, "w") as exp:
                for path, key, uri in todo:
                    _member(exp, path).set(key, soma.DenseNDArray.open(uri, context=context()), use_relative_uri=False)


def _member(exp: soma.Experiment, path: tuple[str, ...]) -> soma.Collection:
    node = exp
    for name in path:
        node = node[name]
    return node


@_settled
def open_reader(store: Store, record: ResultRecord) -> SomaReader:
    with _open(store) as exp:
        results = exp["results"]
        if record.entry not in results:
            raise StoreError(store.uri, f"results/{record.entry}", "a published entry is missing")
        g = results[record.entry]
        spec = ResultSpec.from_json(json.loads(g.metadata[SPEC_KEY]))
        uri = g.uri
    return SomaReader(store, record, spec, uri)


class SomaReader(ResultsReader):
    def __init__(self, store: Store, record: Mapping[str, Any], spec: ResultSpec, uri: str) -> None:
        super().__init__(store, record, spec)
        self.uri = uri

    def _rows(self, name: str, rows: np.ndarray | None) -> np.ndarray:
        with soma.DenseNDArray.open(f"{self.uri}/{name}", context=context()) as arr:
            n = self.n_obs
            if rows is None:
                return arr.read((slice(0, n - 1), slice(None))).to_numpy()
            picked = sorted_rows(rows, n)
            if not len(picked):
                return np.zeros((0, arr.shape[1]), dtype=np.float32)
            block = arr.read((slice(int(picked[0]), int(picked[-1])), slice(None))).to_numpy()
            return block[picked - picked[0]]

    def embedding(self, key: str = JOINT, rows: np.ndarray | None = None) -> np.ndarray:
        self.check_key(key)
        return self._rows(array_name(key), rows)

    def prediction(self, source: str, target: str, rows: np.ndarray | None = None) -> np.ndarray:
        self.check_pair(source, target)
        return self._rows(f"pred_{pair_name(source, target)}", rows)

    def table(self, name: str) -> pd.DataFrame:
        with soma.Collection.open(self.uri, context=context()) as g:
            if name not in g:
                return pd.DataFrame()
            df = g[name].read().concat().to_pandas()
        return df.sort_values("soma_joinid").drop(columns="soma_joinid").reset_index(drop=True)
