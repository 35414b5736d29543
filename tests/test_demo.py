"""The demo (README command 1) on the real data."""

from __future__ import annotations

from pathlib import Path

from scmm_atlas.cli import main
from scmm_atlas.store import open_store


def test_demo_builds_both_stores(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    (out / "stale").mkdir(parents=True)
    assert main(["demo", "--data", str(data_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "6,855 cells ingested" in text and "10,309 cells ingested" in text
    assert not (out / "stale").exists()
    with open_store(out / "mouse_cortex_snare.zarr") as store:
        assert store.modalities == ["RNA", "ATAC"]
        assert store.info.selection["ATAC"]["n_selected"] >= 25_734 // 4
        assert store.obs()["batch"].nunique() == 12
