"""The pipeline's config: one YAML naming the store, what to ingest, and each stage's options.

Example (the shipped ``pbmc_demo``, ``pipelines/pbmc_demo.yaml``)::

    store: runs/demo/pbmc10k_cite.soma
    workdir: runs/demo                  # stage records, Ray Train checkpoints, the report
    tracking_uri: sqlite:///runs/demo/mlflow.db
    ingest:                              # optional: omit it for a store that exists
      inputs: ["RNA={data}/pbmc10k_cite/rna.h5ad", "ADT={data}/pbmc10k_cite/protein.h5ad"]
      label_key: cell_type
    stats: {n_top_genes: 4000}
    train: {config: atlas_cite, overrides: [train.epochs=15]}
    infer: {pairs: null, library_size: 1.0e4}
    report: {max_cells: 20000}

``{data}`` in an input is the real-data folder (``--data``, ``$SCMM_ATLAS_DATA``, else
``../shared/data`` beside a checkout's repository). ``--store`` / ``--workdir`` / ``--tracking-uri`` on the
command line win over the file. An unknown key is an error naming the file and the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import read_section, read_yaml
from ..errors import InputError
from ..infer.stage import InferConfig
from ..ingest.selection import ATAC_QUANTILE, N_TOP_GENES
from ..settings import settings

# Beside a checkout (scmm_atlas/pipeline/config.py -> <repo>/../shared/data); an installed package passes --data
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass
class IngestSection:
    inputs: list[str]
    label_key: str | None = None
    batch_key: str | None = None
    dataset: str | None = None
    append: bool = False
    modalities: list[str] | None = None
    prefix_barcodes: bool = False


@dataclass
class StatsSection:
    n_top_genes: int = N_TOP_GENES
    atac_quantile: float = ATAC_QUANTILE


@dataclass
class TrainSection:
    config: str = "atlas_cite"  # a file, or the name of a shipped run config (configs/)
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE, as on `scmm-atlas train`
    num_workers: int | list[int] | None = None  # N, or [min, max] for an elastic run
    use_gpu: bool = False


@dataclass
class InferSection:
    pairs: list[str] | None = None  # "SOURCE:TARGET"; None: predict.default_pairs (targets <= 1,000 features)
    library_size: float | None = 1e4
    traversal: str = "atlas"
    top_n: int = 50
    actors: int = 0
    executor: str = "auto"  # ray | local | auto (infer.stage module doc)
    genome: str | None = None  # FASTA of the peaks' assembly: JASPAR motifs of the ATAC programs (infer.motifs)

    def pair_tuples(self) -> tuple[tuple[str, str], ...] | None:
        if self.pairs is None:
            return None
        pairs = tuple(tuple(str(p).split(":", 1)) for p in self.pairs)
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"expected SOURCE:TARGET items, got {self.pairs}")
        return pairs  # type: ignore[return-value]

    def build(self) -> InferConfig:
        if self.traversal not in ("atlas", "faithful"):
            raise ValueError(f"traversal must be 'atlas' or 'faithful', got {self.traversal!r}")
        return InferConfig(pairs=self.pair_tuples(), library_size=self.library_size, programs_mode=self.traversal,
                           top_n=self.top_n, actors=self.actors, executor=self.executor, genome=self.genome)


@dataclass
class ReportSection:
    enabled: bool = True
    out: str | None = None  # a local folder; default: <workdir>/report, or runs/report if workdir is on S3
    max_cells: int = 20_000


@dataclass
class PipelineConfig:
    store: str
    workdir: str
    tracking_uri: str | None = None
    ingest: IngestSection | None = None
    stats: StatsSection = field(default_factory=StatsSection)
    train: TrainSection = field(default_factory=TrainSection)
    infer: InferSection = field(default_factory=InferSection)
    report: ReportSection = field(default_factory=ReportSection)
    source: str = "<config>"

    @property
    def report_dir(self) -> str:
        if self.report.out:
            return self.report.out
        return f"{self.workdir.rstrip('/')}/report" if "://" not in self.workdir else "runs/report"


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    return Path(explicit or settings().data or DEFAULT_DATA).expanduser().resolve()


def load_pipeline(path: str | os.PathLike[str], *, store: str | None = None, tracking_uri: str | None = None,
                  data: str | os.PathLike[str] | None = None, workdir: str | None = None) -> PipelineConfig:
    """Read a pipeline YAML (a path, or the name of a shipped one under ``pipelines/``)."""
    where, tree = read_yaml(path, "pipelines")
    sections = {"ingest": IngestSection, "stats": StatsSection, "train": TrainSection, "infer": InferSection,
                "report": ReportSection}
    unknown = set(tree) - {*sections, "store", "workdir", "tracking_uri"}
    if unknown:
        raise InputError(where, sorted(unknown)[0], "unknown key (known: store, workdir, tracking_uri, "
                         f"{', '.join(sections)})")
    store = store or tree.get("store")
    if not store:
        raise InputError(where, "store", "no store: set it in the file or pass --store")
    built = {name: read_section(cls, tree.get(name), where, name) for name, cls in sections.items()
             if name != "ingest"}
    try:  # the infer options are checked now, not after training
        built["infer"].build()
    except ValueError as exc:
        raise InputError(where, "infer", str(exc)) from None
    ingest = None
    if tree.get("ingest") is not None:
        ingest = read_section(IngestSection, tree["ingest"], where, "ingest")
        folder = str(data_dir(data))
        ingest.inputs = [str(i).replace("{data}", folder) for i in ingest.inputs]
    workdir = str(workdir or tree.get("workdir") or f"runs/pipeline/{Path(str(store).rstrip('/')).stem}")
    return PipelineConfig(store=str(store), workdir=workdir, tracking_uri=tracking_uri or tree.get("tracking_uri"),
                          ingest=ingest, source=where, **built)
