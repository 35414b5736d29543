"""The demo (README command 1) without its data. Its run on the real data, twice, is in test_install.py:
the installed command, run from outside the checkout."""

from __future__ import annotations

from scmm_atlas.cli import main


def test_demo_without_the_data_says_where_to_point_it(tmp_path, capsys) -> None:
    assert main(["demo", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: data: the real datasets are not here (pass "
                                               "--data or set SCMM_ATLAS_DATA)")
