"""The quality bench's verdicts and the sweep's selection rule: pure functions of result rows."""

from __future__ import annotations

from scmm_atlas.bench.quality import _targets
from scmm_atlas.bench.sweep import choose, skill


def _variant(name: str, select: float, sd: float) -> dict:
    return {"system": name, "dataset": "d", "overrides": name, "select": select, "select_sd": sd, "bio": 0.6,
            "pearson": 2 * select - 0.6}


def test_skill_puts_proteins_and_peaks_on_one_scale() -> None:
    assert skill({"pearson": 0.8}) == 0.8
    assert skill({"auroc": 0.5}) == 0.0 and skill({"auroc": 0.75}) == 0.5


def test_the_sweep_picks_the_best_select_and_says_when_the_lead_is_noise() -> None:
    clear = choose([_variant("a", 0.70, 0.01), _variant("b", 0.75, 0.01), _variant("c", 0.60, 0.0)])
    assert clear.startswith("chosen on d's validation cells: b (b), select 0.750") and "lead over a 0.050" in clear
    assert "rerun" not in clear
    close = choose([_variant("a", 0.74, 0.02), _variant("b", 0.75, 0.005)])
    assert "b (b)" in close and "within the seeds' sd 0.020: rerun both" in close
    assert "peaks differ" not in close
    other_peaks = {**_variant("q", 0.80, 0.0), "overrides": "stats.atac_quantile=0.5 train.kl_weight=0.5"}
    assert "AUROC is over other peaks" in choose([_variant("a", 0.74, 0.0), other_peaks])


def _ours(**means: float) -> dict:
    return {"system": "scmm-atlas (mean of 3)", "dataset": "mouse_cortex_snare",
            **means, **{f"{k}_sd": 0.02 for k in means}}


def test_quality_targets_need_the_floor_and_a_lead_of_one_sd_over_each_peer() -> None:
    ours = _ours(bio=0.63, bio_graph=0.70, nmi=0.61, ari=0.44, auroc=0.7)
    peers = [{"system": "knn", "dataset": "mouse_cortex_snare", "bio": 0.6, "nmi": 0.5, "ari": 0.43},
             {"system": "WNN", "dataset": "mouse_cortex_snare", "bio": float("nan"), "bio_graph": 0.69, "nmi": 0.5,
              "ari": 0.3}]
    lines = _targets([ours, *peers])
    assert "target on mouse_cortex_snare: bio 0.630 ± 0.020 >= 0.62: met" in lines
    assert "target on mouse_cortex_snare: ari 0.440 ± 0.020 >= 0.45: MISSED" in lines
    assert any(line.startswith("target on mouse_cortex_snare: bio 0.630") and "above knn 0.600" in line
               and line.endswith("met") for line in lines)
    # WNN gives a graph: compared on bio_graph, and 0.70 is not 0.02 above 0.69
    assert any("bio_graph 0.700" in line and "above WNN 0.690" in line and line.endswith("MISSED") for line in lines)
    assert any("ari 0.440" in line and "above knn 0.430" in line and line.endswith("MISSED") for line in lines)
    assert not any("MultiVI" in line for line in lines)  # a peer that did not run gives no line
