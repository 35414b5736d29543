"""`pip install .` (not editable) works away from the checkout: the configs and the job entry points ship.

The package is built from a copy of the checkout and installed, without its dependencies, into a fresh
virtual environment outside the checkout; the project's installed dependencies are made visible to it
by a ``.pth`` line naming this environment's site-packages (no network, no torch download). Run from
outside the checkout, ``scmm_atlas`` must then come from the fresh site-packages, the shipped configs
with it, and ``scmm-atlas demo`` must run end to end: a config or module left out of the wheel fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from scmm_atlas.store import open_store

REPO = Path(__file__).resolve().parents[1]
# What a build must not see or copy: environments, outputs, caches, the tests themselves
SKIP = (".git", ".venv", "runs", "build", "tests", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
        ".ruff_cache")

PROBE = """\
import json, pipelines, scmm_atlas, scmm_atlas.pipeline.demo as demo
from scmm_atlas.config import config_names, load_config, shipped_folder
from scmm_atlas.pipeline.config import load_pipeline
load_config("atlas_cite")
load_pipeline("pbmc_demo")
print(json.dumps({"package": scmm_atlas.__file__, "demo": demo.__file__, "configs": str(shipped_folder("configs")),
                  "jobs": pipelines.__file__, "pipelines_folder": str(shipped_folder("pipelines")),
                  "names": config_names(), "pipelines": config_names("pipelines")}))
"""


def _fresh_venv(root: Path) -> Path:
    """A new venv at ``root/venv`` with the package installed from a copy of the checkout; its python."""
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*SKIP))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # Dependencies (and setuptools for the build) from this environment: plain path lines, so that its
    # own .pth files (the editable install's finder, pointing at the checkout) are not run
    Path(purelib, "_scmm_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", str(src)], check=True, cwd=root)
    return python


def _env() -> dict[str, str]:
    """This environment minus what would point the child at the checkout or at another Ray cluster."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}


@pytest.mark.slow
def test_a_non_editable_install_ships_the_configs_and_runs_the_demo_twice(data_dir: Path, tmp_path: Path) -> None:
    assert REPO not in tmp_path.parents
    python = _fresh_venv(tmp_path)
    venv = python.parent.parent
    work = tmp_path / "work"
    work.mkdir()
    probe = subprocess.run([str(python), "-c", PROBE], cwd=work, env=_env(), capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.splitlines()[-1])
    for key in ("package", "demo", "configs", "jobs", "pipelines_folder"):
        assert Path(found[key]).is_relative_to(venv) and not Path(found[key]).is_relative_to(REPO), found
    # The wheel: scmm_atlas/ with configs/ inside it, pipelines/ beside it; every file of the checkout's
    installed = Path(found["package"]).parent
    for src, dest in (("scmm_atlas", installed), ("configs", installed / "configs"),
                      ("pipelines", installed.parent / "pipelines")):
        ours = {p.relative_to(REPO / src) for p in (REPO / src).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
        assert ours - {p.relative_to(dest) for p in dest.rglob("*")} == set(), f"{src}/: left out of the wheel"
    assert found["names"] == ["atlas_cite", "atlas_gpu", "atlas_rna_atac", "faithful_scmm"]
    assert found["pipelines"] == ["atlas", "pbmc_demo"]
    job = subprocess.run([str(python), "-m", "pipelines.run", "--help"], cwd=work, env=_env(), capture_output=True,
                         text=True)  # the Ray Job entry point, from the wheel
    assert job.returncode == 0 and "--config" in job.stdout, job.stderr[-2000:]
    stale = work / "runs" / "demo" / "stale"
    stale.mkdir(parents=True)
    first = _demo(venv, data_dir, work, "--fresh")
    assert not stale.exists()  # --fresh started over
    lines = _check_summary(first, work)
    # the demo again: every stage skipped, the same summary (the same model version and results version:
    # a stage that ran again would register or publish a new one)
    assert _check_summary(_demo(venv, data_dir, work), work) == lines


def _demo(venv: Path, data_dir: Path, work: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """The installed ``scmm-atlas demo`` (3 epochs) run from ``work``, away from the checkout."""
    run = subprocess.run([str(venv / "bin" / "scmm-atlas"), "demo", *flags, "--data", str(data_dir), "--no-progress",
                          "train.epochs=3", "train.warmup_epochs=1"], cwd=work, env=_env(), capture_output=True,
                         text=True, timeout=780)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    return run


def _check_summary(run: subprocess.CompletedProcess[str], work: Path) -> list[str]:
    """The demo's summary on the real data (README command 1): rough after 3 epochs, never random."""
    out = run.stdout.split("== scmm-atlas demo: 10x PBMC 10k CITE-seq ==\n", 1)[1]
    lines = out.splitlines()[:-1]  # all but the wall time
    assert lines[0] == "cells: 6,855; modalities: RNA (6,855 cells), ADT (6,855 cells)"
    assert re.search(r"training: 3 epochs in \d+ s", out)
    ari = re.search(r"7 labels\): ARI (0\.\d+), NMI (0\.\d+) at the best-NMI resolution", out)
    assert ari and float(ari.group(1)) > 0.2 and float(ari.group(2)) > 0.3, out
    fair = re.search(r"15-NN accuracy (0\.\d+); bio-conservation (0\.\d+)", out)
    assert fair and float(fair.group(1)) > 0.7 and 0.3 < float(fair.group(2)) < 1, out  # random labels: ~0.4 / ~0.2
    held = re.search(r"RNA -> ADT on (\d+) held-out cells: mean Pearson r (0\.\d+)", out)
    assert held and 500 < int(held.group(1)) < 900 and float(held.group(2)) > 0.15, out  # random: ~0
    assert len(re.findall(r"program of dim \d+: RNA up: \S+, \S+, \S+; RNA down: ", out)) == 3, out
    report = work / "runs" / "demo" / "report" / "index.html"
    assert report.is_file() and f"report: {report}" in out
    assert "MLflow UI: mlflow ui --backend-store-uri sqlite:///" in out and "--host 127.0.0.1" in out
    with open_store(work / "runs" / "demo" / "pbmc10k_cite.soma") as store:
        assert store.modalities == ["RNA", "ADT"] and store.info.selection["RNA"]["n_selected"] == 4000
    return lines
