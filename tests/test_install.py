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
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a build must not see or copy: environments, outputs, caches, the tests themselves
SKIP = (".git", ".venv", "runs", "build", "tests", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
        ".ruff_cache")

PROBE = """\
import json, scmm_atlas, scmm_atlas.pipeline.demo as demo
from scmm_atlas.config import CONFIG_DIR, config_names, load_config
from scmm_atlas.pipeline.config import load_pipeline
load_config("atlas_cite")
load_pipeline("pbmc_demo")
print(json.dumps({"package": scmm_atlas.__file__, "demo": demo.__file__, "configs": str(CONFIG_DIR),
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
def test_a_non_editable_install_ships_the_configs_and_runs_the_demo(data_dir: Path, tmp_path: Path) -> None:
    assert REPO not in tmp_path.parents
    python = _fresh_venv(tmp_path)
    venv = python.parent.parent
    work = tmp_path / "work"
    work.mkdir()
    probe = subprocess.run([str(python), "-c", PROBE], cwd=work, env=_env(), capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.splitlines()[-1])
    for key in ("package", "demo", "configs"):
        assert Path(found[key]).is_relative_to(venv) and not Path(found[key]).is_relative_to(REPO), found
    installed = Path(found["package"]).parent
    ours = {p.relative_to(REPO / "scmm_atlas") for p in (REPO / "scmm_atlas").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    assert ours - {p.relative_to(installed) for p in installed.rglob("*")} == set(), "left out of the wheel"
    assert found["names"] and found["pipelines"] == ["atlas", "pbmc_demo"]
    cli = venv / "bin" / "scmm-atlas"
    run = subprocess.run([str(cli), "demo", "--data", str(data_dir), "--no-progress", "train.epochs=2",
                          "train.warmup_epochs=1"], cwd=work, env=_env(), capture_output=True, text=True,
                         timeout=780)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert "== scmm-atlas demo: 10x PBMC 10k CITE-seq ==" in run.stdout
    assert "training: 2 epochs in" in run.stdout
    assert (work / "runs" / "demo" / "report" / "index.html").is_file()
