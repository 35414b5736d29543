"""Run configs: the shipped YAML files, overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from scmm_atlas.config import RunConfig, config_names, find_config, load_config, shipped_configs, shipped_folder
from scmm_atlas.errors import InputError
from scmm_atlas.model import MMVAE


@pytest.mark.parametrize("name", config_names())
def test_every_shipped_config_builds_a_model(name: str) -> None:
    cfg = load_config(name)
    mods = list(cfg.model.modalities)[:2]
    model = MMVAE(cfg.model.build({m: 7 for m in mods}, n_batches=3))
    assert set(model.names) == set(mods)


def test_faithful_config_is_the_original() -> None:
    cfg = load_config("faithful_scmm")
    assert cfg.model.faithful and cfg.model.latent_dim == 10 and cfg.model.norm == "batchnorm"
    assert cfg.model.modalities["RNA"] == {"likelihood": "nb", "hidden": 100, "n_layers": 2}
    assert cfg.model.modalities["ADT"]["hidden"] == 20
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_epochs, cfg.train.amsgrad) == (32, 1e-4, 25, True)
    assert cfg.train.beta(1) == 0.0 and cfg.train.beta(26) == 1.0 and cfg.train.beta(13) == pytest.approx(12 / 25)
    built = cfg.model.build({"RNA": 50, "ADT": 5}, n_batches=4)
    assert built.n_batches == 0 and built.faithful


def test_overrides_and_errors(tmp_path: Path) -> None:
    cfg = load_config("atlas_cite", ["train.lr=3e-4", "model.latent_dim=30", "model.modalities.RNA.hidden=64"])
    assert cfg.train.lr == 3e-4 and cfg.model.latent_dim == 30 and cfg.model.modalities["RNA"]["hidden"] == 64
    with pytest.raises(InputError, match=r"train\.lrr: no such config key"):
        load_config("atlas_cite", ["train.lrr=1"])
    with pytest.raises(InputError, match="expected key=value"):
        load_config("atlas_cite", ["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {latent_dim: 5, colour: red}\n")
    with pytest.raises(InputError, match=r"bad\.yaml: model\.colour: unknown key \(known: batch_covariate, "):
        load_config(bad)
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_config_loads_and_the_gpu_one_is_set_for_a_cluster() -> None:
    assert config_names() == ["atlas_cite", "atlas_gpu", "atlas_rna_atac", "faithful_scmm"]
    for name in config_names():
        load_config(name)
    gpu = load_config("atlas_gpu").distributed
    assert gpu.use_gpu and gpu.num_workers == 8 and gpu.bf16 and gpu.storage_path.startswith("s3://")
    over = load_config("atlas_cite", ["distributed.num_workers=3", "distributed.loader.block_cells=1024"])
    assert over.distributed.num_workers == 3 and over.distributed.loader.settings() == {"block_cells": 1024}
    assert over.to_dict()["distributed"]["loader"] == {"block_cells": 1024}  # what MLflow logs, read back as is
    assert RunConfig.from_dict(over.to_dict()).distributed.loader == over.distributed.loader


def test_every_key_of_the_shipped_configs_is_a_field_that_training_reads(tmp_path) -> None:
    """A key in the shipped configs must reach the model or the trainer (none silently ignored)."""
    from dataclasses import fields

    import yaml

    from scmm_atlas.config import DistributedSection, ModelSection
    from scmm_atlas.model import ModalitySpec
    from scmm_atlas.model.training import FitConfig

    sections = {"model": ModelSection, "train": FitConfig, "distributed": DistributedSection}
    for path in shipped_configs():
        tree = yaml.safe_load(path.read_text())
        assert set(tree) <= set(sections), path
        for name, cls in sections.items():
            assert set(tree.get(name, {})) <= {f.name for f in fields(cls)}, (path, name)
        for spec in tree["model"]["modalities"].values():
            assert set(spec) <= {f.name for f in fields(ModalitySpec)}, path
        load_config(path.name)
    old = tmp_path / "old.yaml"
    old.write_text((shipped_folder() / "atlas_cite.yaml").read_text() + "features:\n  n_top_genes: 4000\n")
    with pytest.raises(InputError, match="feature selection belongs to the store"):
        load_config(old)


def test_shipped_configs_are_the_checkouts_top_level_folders_and_a_users_file_wins(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """In a checkout, names resolve in its top-level configs/ and pipelines/ (tests/test_install.py: in a
    wheel, inside it), whatever the working directory; a path to a user's file is read as is, even one that
    has a shipped config's name."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    assert shipped_folder() == root / "configs" and shipped_folder("pipelines") == root / "pipelines"
    assert find_config("atlas_cite") == find_config("atlas_cite.yaml") == root / "configs" / "atlas_cite.yaml"
    assert find_config("pbmc_demo") is None and find_config("nope") is None
    assert find_config("pbmc_demo", "pipelines") == root / "pipelines" / "pbmc_demo.yaml"
    with pytest.raises(ValueError, match="kind must be one of"):
        shipped_folder("jobs")
    mine = tmp_path / "atlas_cite.yaml"
    mine.write_text((root / "configs" / "atlas_cite.yaml").read_text().replace("latent_dim: 20", "latent_dim: 7"))
    assert load_config("atlas_cite.yaml").model.latent_dim == 7 and load_config(mine).source == str(mine)
    assert load_config("atlas_cite").model.latent_dim == 20  # the bare name is the shipped one
    with pytest.raises(InputError, match=r"config file not found \(shipped: atlas_cite, atlas_gpu, "):
        load_config("configs/atlas_cite.yaml")


def test_every_shipped_pipeline_config_loads_and_names_a_shipped_run_config(tmp_path: Path) -> None:
    from scmm_atlas.ingest.selection import N_TOP_GENES
    from scmm_atlas.pipeline.config import StatsSection, load_pipeline

    assert config_names("pipelines") == ["atlas", "pbmc_demo"]
    for name in config_names("pipelines"):
        cfg = load_pipeline(name, data=tmp_path)
        assert cfg.train.config in config_names(), name
        load_config(cfg.train.config, cfg.train.overrides)
    assert StatsSection().n_top_genes == N_TOP_GENES
    mine = tmp_path / "mine.yaml"
    mine.write_text("store: here.soma\nstats: {n_top_genes: 10}\n")
    assert load_pipeline(mine).stats.n_top_genes == 10
    with pytest.raises(InputError, match=r"pipeline config not found \(shipped: atlas, pbmc_demo\)"):
        load_pipeline("nope")


@pytest.mark.parametrize("workers,world,expect", [(2, 2, (256, 1)), (2, 1, (256, 2)), ([1, 4], 4, (256, 1)),
                                                  ([1, 4], 2, (256, 2)), ([2, 3], 2, (192, 2)), ([1, 3], 1, (256, 3)),
                                                  ([1, 4], 3, (170, 2))])
def test_an_elastic_run_keeps_its_global_batch_at_any_world_size(workers, world, expect) -> None:
    from scmm_atlas.config import DistributedSection

    d = DistributedSection(num_workers=workers)
    assert d.global_batch(256) == 256 * d.max_workers
    batch, accum = d.step_shape(256, world)
    assert (batch, accum) == expect
    # exact where the world size divides the global batch; else the nearest below it
    assert 0 <= d.global_batch(256) - batch * world * accum < world * accum


def test_num_workers_is_a_count_or_a_range() -> None:
    from scmm_atlas.config import DistributedSection

    assert DistributedSection(num_workers=[1, 3]).elastic
    assert DistributedSection(num_workers=[2, 2]).num_workers == 2  # a range of one size is fixed
    cfg = load_config("atlas_cite", ["distributed.num_workers=[1, 2]"])
    assert (cfg.distributed.min_workers, cfg.distributed.max_workers) == (1, 2)
    for bad in ("[2, 1]", "[0, 2]", "0", "[1, 2, 3]"):
        with pytest.raises(ValueError, match="num_workers must be N or"):
            load_config("atlas_cite", [f"distributed.num_workers={bad}"])
    with pytest.raises(ValueError, match=r"distributed\.num_workers: Input should be a valid integer"):
        load_config("atlas_cite", ["distributed.num_workers=x"])


def test_yaml_values_of_the_wrong_type_are_coerced_or_refused_in_one_line(tmp_path: Path) -> None:
    """PyYAML reads ``1e-1`` and ``3e-4`` as strings (YAML 1.1): the float fields still get numbers; a value
    that is no number is one error naming the file and the key, not a TypeError deep in training."""
    own = tmp_path / "mine.yaml"
    own.write_text("model: {latent_dim: 8}\ntrain: {kl_weight: 1e-1, lr: 3e-4, epochs: '12'}\n")
    cfg = load_config(own)
    assert (cfg.train.kl_weight, cfg.train.lr, cfg.train.epochs) == (0.1, 3e-4, 12)
    assert isinstance(cfg.train.kl_weight, float) and isinstance(cfg.train.epochs, int)
    _each_refused_in_one_line(own, [("train.epochs=abc", "train.epochs", "valid integer"),
                                    ("model.latent_dim=2.5", "model.latent_dim", "fractional part"),
                                    ("distributed.use_gpu=maybe", "distributed.use_gpu", "valid boolean"),
                                    ("train.lr=fast", "train.lr", "valid number")])
    own.write_text("model: {latent_dim: 8}\ntrain: {lr_schedule: step}\n")  # the section's own check
    with pytest.raises(InputError, match=f"^{own}: train: train.lr_schedule must be one of .* got 'step'$"):
        load_config(own)


def test_the_loader_section_is_typed_and_checked_when_the_config_is_read(tmp_path: Path) -> None:
    """``distributed.loader`` is a section like the others: coerced, unknown keys and the loader's own
    checks refused at once (not when a Ray worker starts); what it leaves unset follows the run."""
    own = tmp_path / "mine.yaml"
    own.write_text("model: {latent_dim: 8}\ntrain: {seed: 7}\ndistributed: {loader: {read_cpus: 5e-1, readers: '2'}}\n")
    loader = load_config(own).distributed.loader
    assert loader.settings() == {"read_cpus": 0.5, "readers": 2}
    built = loader.build(seed=7, batch_size=64, accumulate=2)
    assert (built.seed, built.batch_size, built.accumulate, built.read_cpus, built.readers) == (7, 64, 2, 0.5, 2)
    assert load_config(own, ["distributed.loader.seed=3"]).distributed.loader.build(seed=7).seed == 3  # set: wins
    _each_refused_in_one_line(own, [("distributed.loader.block_cells=0", "distributed.loader", "must be positive"),
                                    ("distributed.loader.mode=fast", "distributed.loader", "mode must be one of"),
                                    ("distributed.loader.readers=x", "distributed.loader.readers", "valid integer"),
                                    ("distributed.loader.batch_size=8", "distributed.loader.batch_size",
                                     "unknown key (known: block_cells, buffer_blocks, ")])


def _each_refused_in_one_line(own: Path, cases: list[tuple[str, str, str]]) -> None:
    """Each (override, key, problem): ``own`` with the override is one error line naming file and key."""
    for override, key, problem in cases:
        with pytest.raises(InputError) as err:
            load_config(own, [override])
        assert str(err.value).startswith(f"{own}: {key}: ") and problem in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
