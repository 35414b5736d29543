"""Typed run configs: the shipped ``configs/*.yaml`` plus ``key=value`` overrides (dotted keys).

Example: ``load_config("atlas_cite", ["train.lr=3e-4", "model.latent_dim=30"])``; a path to a user's own
YAML file works wherever a shipped name does. A key that the file does not have is an error, so a typo
never silently does nothing. The shipped run configs (``configs/``) and pipeline configs (``pipelines/``)
sit at the top of a checkout and travel in the wheel (:func:`shipped_folder`), so an installed package
finds them wherever it runs, not only from a checkout.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from .data.loader import LoaderConfig
from .errors import InputError
from .model import MMVAEConfig, ModalitySpec
from .model.training import FitConfig

SHIPPED = ("configs", "pipelines")  # run configs; pipeline configs (beside the Ray Job entry points)


def shipped_folder(kind: str = "configs") -> Path | Traversable:
    """Where the shipped ``configs`` or ``pipelines`` are: the top-level folders of a checkout (also what
    ``ray job submit --working-dir .`` uploads, whose ``scmm_atlas`` shadows an installed one), else those
    of the installed wheel (``configs/`` inside the package, the ``pipelines`` package beside it)."""
    if kind not in SHIPPED:
        raise ValueError(f"kind must be one of {SHIPPED}, not {kind!r}")
    root = Path(__file__).resolve().parents[1]
    if kind == "configs" and not (root / "pyproject.toml").is_file():
        return resources.files(__package__) / "configs"
    return root / kind


def find_config(path: str | os.PathLike[str], kind: str = "configs") -> Path | Traversable | None:
    """A user's file if ``path`` is one, else the shipped config of that name (``.yaml`` optional)
    in ``kind`` (``configs`` or ``pipelines``): a user's file always wins, so a local copy can shadow a
    shipped one."""
    if Path(path).is_file():
        return Path(path)
    folder = shipped_folder(kind)
    name = os.fspath(path)
    for candidate in (name, f"{name}.yaml"):
        if "/" not in candidate and (folder / candidate).is_file():
            return folder / candidate
    return None


def shipped_configs(kind: str = "configs") -> list[Path | Traversable]:
    """The YAML files shipped in ``kind`` (tests check every one)."""
    return sorted((f for f in shipped_folder(kind).iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)


def config_names(kind: str = "configs") -> list[str]:
    """The names a shipped config is asked for by (what error messages list)."""
    return [f.name.removesuffix(".yaml") for f in shipped_configs(kind)]


@dataclass
class ModelSection:
    faithful: bool = False
    latent_dim: int = 20
    norm: str = "layernorm"
    dropout: float = 0.1
    learn_prior: bool = True
    batch_covariate: bool = True
    joint: str = "moe"  # moe | poe | mopoe
    embedding: str = "mean"  # mean | concat
    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)

    def build(self, n_features: Mapping[str, int], n_batches: int = 0) -> MMVAEConfig:
        """The model config for the modalities present in the data (their feature counts)."""
        mods = {}
        for name, n in n_features.items():
            spec = dict(self.modalities.get(name, {}))
            mods[name] = ModalitySpec(n_features=int(n), **spec)
        return MMVAEConfig(modalities=mods, latent_dim=self.latent_dim, faithful=self.faithful, norm=self.norm,
                           dropout=self.dropout, learn_prior=self.learn_prior, joint=self.joint,
                           embedding=self.embedding,
                           n_batches=n_batches if self.batch_covariate and n_batches > 1 else 0)


@dataclass
class LoaderSection:
    """``distributed.loader``: what a run may set of each worker's :class:`~.data.loader.LoaderConfig`
    (unset: its default; ``seed`` unset follows ``train.seed``). The minibatch size, its accumulation
    and dropping the last partial one follow from ``train`` and DDP, so they are not settable here."""

    block_cells: int | None = None
    buffer_blocks: int | None = None
    read_ahead: int | None = None
    prefetch_blocks: int | None = None
    prefetch_batches: int | None = None
    readers: int | None = None
    read_cpus: float | None = None
    mode: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        self.build()  # the loader's own checks, when the config is read rather than when a worker starts

    def settings(self) -> dict[str, Any]:
        """The keys this run sets."""
        return {k: v for k, v in vars(self).items() if v is not None}

    def build(self, **fixed: Any) -> LoaderConfig:
        """The worker's loader config: ``fixed`` values first, then what this run sets, over the defaults;
        ``seed`` in ``fixed`` is only the fallback for a run that sets none."""
        seed = {"seed": fixed.pop("seed")} if "seed" in fixed else {}
        return LoaderConfig(**{**seed, **self.settings(), **fixed})


@dataclass
class DistributedSection:
    """How ``scmm-atlas train`` runs: Ray Train workers, precision, checkpoints, tracking."""

    num_workers: int | list[int] = 1  # DDP workers (one per GPU on clusters); [min, max]: elastic
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 0  # intra-op threads per worker (0: the worker's CPUs, at least 1)
    bf16: bool = True  # autocast to bfloat16 on GPU (ignored on CPU)
    grad_accum: int = 1  # micro-batches per optimizer step
    checkpoint_every_steps: int = 0  # extra checkpoints inside an epoch (0: only at epoch ends)
    max_failures: int = 1  # worker-group restarts from the last checkpoint (a lost host is one)
    worker_wait_s: float = 600.0  # how long a run waits for its workers (elastic: the minimum) before it fails
    resize_interval_s: float = 60.0  # how often an elastic run below its maximum looks for room to grow
    val_fraction: float = 0.1  # cells held out by a stable hash of their id
    storage_path: str = "runs/ray"  # Ray Train checkpoints (local folder or s3://)
    experiment: str = "scmm-atlas"  # MLflow experiment
    model_name: str = "scmm-atlas"  # MLflow registered model
    max_steps_per_epoch: int = 0  # cap the optimizer steps of an epoch (0: the whole epoch)
    loader: LoaderSection = field(default_factory=LoaderSection)

    def __post_init__(self) -> None:
        n = self.num_workers
        if isinstance(n, (list, tuple)):
            ints = all(isinstance(v, int) and not isinstance(v, bool) for v in n)
            if len(n) != 2 or not ints or not 1 <= n[0] <= n[1]:
                raise ValueError(f"distributed.num_workers must be N or [min, max] with 1 <= min <= max, got {n}")
            self.num_workers = list(n) if n[0] != n[1] else n[0]
        elif not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"distributed.num_workers must be N or [min, max] with 1 <= min <= max, got {n!r}")
        if self.grad_accum < 1:
            raise ValueError(f"distributed.grad_accum must be >= 1, got {self.grad_accum}")
        if self.worker_wait_s <= 0:
            raise ValueError(f"distributed.worker_wait_s must be positive, got {self.worker_wait_s}")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    def global_batch(self, batch_size: int) -> int:
        """Cells per optimizer step as configured: ``batch_size`` per worker at the most workers, accumulated."""
        return batch_size * self.max_workers * self.grad_accum

    def step_shape(self, batch_size: int, world: int) -> tuple[int, int]:
        """(cells per minibatch, minibatches per optimizer step) for each of ``world`` workers, so that an
        elastic run keeps its global batch when it has fewer workers: more accumulation, the same
        minibatch where the numbers divide (a smaller one where they do not; the global batch is then
        the nearest that ``world`` can make)."""
        total = self.global_batch(batch_size)
        first = -(-total // (batch_size * world))
        exact = next((a for a in range(first, 2 * first + 1) if total % (world * a) == 0), first)
        return max(1, total // (world * exact)), exact


@dataclass
class RunConfig:
    model: ModelSection
    train: FitConfig
    distributed: DistributedSection = field(default_factory=DistributedSection)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what MLflow logs and ``config.yaml`` holds; :meth:`from_dict` reads it back)."""
        return {"model": copy.deepcopy(vars(self.model)), "train": dict(vars(self.train)),
                "distributed": {**copy.deepcopy(vars(self.distributed)), "loader": self.distributed.loader.settings()}}

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any], where: str = "<config>") -> RunConfig:
        return cls(model=read_section(ModelSection, tree.get("model"), where, "model"),
                   train=read_section(FitConfig, tree.get("train"), where, "train"),
                   distributed=read_section(DistributedSection, tree.get("distributed"), where, "distributed"),
                   source=where)


def _set(tree: dict[str, Any], dotted: str, raw: str, where: str) -> None:
    keys = dotted.split(".")
    if keys[0] == "distributed":
        tree.setdefault("distributed", {})
        known = {f.name for f in fields(DistributedSection)}
        if len(keys) == 2 and keys[1] in known:
            tree["distributed"].setdefault(keys[1], getattr(DistributedSection(), keys[1]))
        elif len(keys) >= 3 and keys[1] == "loader":
            tree["distributed"].setdefault("loader", {}).setdefault(keys[2], None)
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise InputError(where, dotted, f"no such config key (known: {sorted(node)})")
        node = node[key]
    if keys[-1] not in node and not (len(keys) >= 3 and keys[0] == "model" and keys[1] == "modalities"):
        raise InputError(where, dotted, f"no such config key (known: {sorted(node)})")
    node[keys[-1]] = _parse(raw)


def _parse(raw: str) -> Any:
    """A YAML scalar; numbers such as ``3e-4`` (a string to YAML 1.1) become floats."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def read_section(cls: type, data: Any, where: str, name: str) -> Any:
    """The section ``name`` (of a run or a pipeline config) as ``cls``, its values checked against the field
    types by pydantic: a value that YAML read as a string (``1e-1``, ``3e-4`` in YAML 1.1) becomes the number
    its field wants; a key the section (or a section inside it) does not have, or a value of another type,
    is one :class:`InputError` naming the key."""
    if data is not None and not isinstance(data, Mapping):
        raise InputError(where, name, f"expected a mapping, got {type(data).__name__}")
    data = dict(data or {})
    _refuse_unknown(cls, data, where, name)
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        msg, loc = str(first["msg"]).removeprefix("Value error, "), [str(p) for p in first["loc"]]
        if first["type"] == "value_error":  # a section's own check (its __post_init__) names key and value
            raise InputError(where, ".".join([name, *loc]), msg) from None
        depth = 3 if loc and loc[0] in _subsections(cls) else 2  # past it: a union member's type name
        raise InputError(where, ".".join([name, *loc][:depth]), f"{msg} (got {first['input']!r})") from None


def _subsections(cls: type) -> dict[str, type]:
    """The fields of ``cls`` that are sections of their own (a dataclass made by the default factory)."""
    return {f.name: f.default_factory for f in fields(cls) if isinstance(f.default_factory, type)
            and is_dataclass(f.default_factory)}


def _refuse_unknown(cls: type, data: Mapping[str, Any], where: str, name: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(where, f"{name}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(known))})")
    for key, sub in _subsections(cls).items():
        if isinstance(data.get(key), Mapping):
            _refuse_unknown(sub, data[key], where, f"{name}.{key}")


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def read_yaml(path: str | os.PathLike[str], kind: str = "configs") -> tuple[str, dict[str, Any]]:
    """Where a config was found and its top-level mapping: a path, or the name of a shipped one in
    ``kind`` (``configs``: run configs; ``pipelines``: pipeline configs). Both kinds are read here."""
    p = find_config(path, kind)
    if p is None:
        what = "pipeline config" if kind == "pipelines" else "config file"
        raise InputError(path, "path", f"{what} not found (shipped: {', '.join(config_names(kind))})")
    where = str(p)
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(where, "yaml", f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise InputError(where, "yaml", "expected a mapping at the top level")
    return where, tree


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config (a path, or the name of a shipped one) and apply ``key=value`` overrides."""
    where, tree = read_yaml(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(item, "override", "expected key=value")
        _set(tree, key.strip(), value, where)
    if "features" in tree:
        raise InputError(where, "features", "feature selection belongs to the store, not to training: choose it "
                                            "at ingest (--n-top-genes) or with `scmm-atlas stats`, and remove this "
                                            "section")
    unknown = set(tree) - {"model", "train", "distributed"}
    if unknown:
        raise InputError(where, "sections", f"unknown sections {sorted(unknown)}")
    return RunConfig.from_dict(tree, where)
