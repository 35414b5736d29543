"""Inference maths without Ray or a store: embeddings, cross-modal predictions, pseudocell programs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from scmm_atlas.infer.predict import check_pairs, default_pairs, infer_batch
from scmm_atlas.infer.programs import programs, spearman, traversal
from scmm_atlas.model import MMVAE, MMVAEConfig


def _model(n_batches: int = 0, likelihood: str = "nb_disp", norm: str = "batchnorm") -> MMVAE:
    torch.manual_seed(0)
    mods = {"RNA": {"n_features": 12, "likelihood": likelihood, "hidden": 8, "n_layers": 1},
            "ADT": {"n_features": 5, "likelihood": likelihood, "hidden": 8, "n_layers": 1}}
    return MMVAE(MMVAEConfig(modalities=mods, latent_dim=3, n_batches=n_batches, norm=norm)).eval()


def _data(n: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"RNA": torch.poisson(torch.rand(n, 12, generator=g) * 5),
            "ADT": torch.poisson(torch.rand(n, 5, generator=g) * 40)}


def test_embeddings_and_missing_modalities() -> None:
    model, x = _model(), _data()
    mask = {"RNA": torch.ones(10, dtype=torch.bool), "ADT": torch.arange(10) < 6}  # 4 RNA-only cells
    out = infer_batch(model, x, mask=mask, pairs=default_pairs(model.names))
    np.testing.assert_allclose(out.joint, model.embed(x, mask=mask).numpy(), rtol=1e-6)
    assert np.isnan(out.per_modality["ADT"][6:]).all() and not np.isnan(out.per_modality["ADT"][:6]).any()
    np.testing.assert_allclose(out.joint[6:], out.per_modality["RNA"][6:], rtol=1e-6)  # only their RNA expert
    # RNA-only cells get protein predicted from RNA; nothing is predicted from the ADT they lack
    assert not np.isnan(out.predictions[("RNA", "ADT")]).any()
    assert np.isnan(out.predictions[("ADT", "RNA")][6:]).all()


def test_predictions_ignore_the_target_and_use_the_stated_library() -> None:
    model, x = _model(), _data()
    base = infer_batch(model, x, pairs=[("RNA", "ADT")])
    changed = dict(x, ADT=x["ADT"] * 7 + 3)  # the target's observed counts (and library) must not matter
    again = infer_batch(model, changed, pairs=[("RNA", "ADT")])
    np.testing.assert_array_equal(base.predictions[("RNA", "ADT")], again.predictions[("RNA", "ADT")])
    np.testing.assert_allclose(base.predictions[("RNA", "ADT")].sum(1), 1e4, rtol=1e-4)  # per 10k by default
    scaled = infer_batch(model, x, pairs=[("RNA", "ADT")], library_size=100.0)
    np.testing.assert_allclose(scaled.predictions[("RNA", "ADT")], base.predictions[("RNA", "ADT")] / 100, rtol=1e-4)


def test_pairs_are_checked() -> None:
    assert default_pairs(["RNA", "ADT", "ATAC"]) == [("ADT", "RNA"), ("ATAC", "RNA"), ("RNA", "ADT"),
                                                     ("ATAC", "ADT"), ("RNA", "ATAC"), ("ADT", "ATAC")]
    # by default no wide target: proteins from RNA and ATAC, not 4,000 genes or 50,000 peaks
    widths = {"RNA": 4000, "ADT": 100, "ATAC": 50_000}
    assert default_pairs(["RNA", "ADT", "ATAC"], widths) == [("RNA", "ADT"), ("ATAC", "ADT")]
    assert default_pairs(["RNA", "ADT"], widths, max_target_features=4000) == [("ADT", "RNA"), ("RNA", "ADT")]
    with pytest.raises(ValueError, match="no modality 'ATAC'"):
        check_pairs([("RNA", "ATAC")], ["RNA", "ADT"])
    with pytest.raises(ValueError, match="not predicted from itself"):
        check_pairs([("RNA", "RNA")], ["RNA", "ADT"])


def test_traversals() -> None:
    model = _model()
    np.testing.assert_allclose(traversal(model, 0, mode="faithful"), np.arange(-5, 5, 0.5))
    with torch.no_grad():
        model.prior_logits[0] = torch.tensor([2.0, 0.0, -2.0])  # a learned prior: other SD per dim
    sd = model.prior().stddev[0].detach().numpy()
    for d in range(3):
        values = traversal(model, d)
        assert len(values) == 20 and values[0] == pytest.approx(-values[-1])
        assert values[-1] == pytest.approx(5 * sd[d], rel=1e-6)
    with pytest.raises(ValueError, match="traversal mode"):
        traversal(model, 0, mode="wide")


def test_spearman_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    values = np.linspace(-1, 1, 20)
    means = rng.normal(size=(20, 30))
    means[:, 0] = np.exp(values)  # monotone: rho 1
    means[:, 1] = np.round(means[:, 1])  # ties
    rho, p = spearman(values, means)
    for j in range(30):
        ref = stats.spearmanr(values, means[:, j])
        assert rho[j] == pytest.approx(ref.statistic, abs=1e-10)
        assert p[j] == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-300)
    assert rho[0] == pytest.approx(1.0) and p[0] == 0.0


def test_planted_program_ranks_first_and_ties_break_by_effect() -> None:
    model = _model(norm="none", likelihood="nb")  # NB means exp(head) per feature: no softmax coupling
    dec = model.decoders["RNA"]
    with torch.no_grad():  # RNA features 3 and 7 rise with z_0, 5 and 9 fall; nothing depends on z_1, z_2
        for p in dec.parameters():
            p.zero_()
        dec.body[0].weight[0, 0], dec.body[0].bias[0] = 1.0, 50.0  # relu(z_0 + 50): linear over the traversal
        for feature, w in ((3, 0.1), (7, 0.02), (5, -0.1), (9, -0.02)):
            dec.head.weight[feature, 0] = w
    names = {"RNA": [f"g{i}" for i in range(12)], "ADT": [f"p{i}" for i in range(5)]}
    table, curves = programs(model, names, top_n=4)
    rna0 = table[(table.dim == 0) & (table.modality == "RNA")]
    up, down = rna0[rna0.direction == "up"], rna0[rna0.direction == "down"]
    # all four are exactly monotone (rho +-1, tied): the larger effect ranks first
    assert list(up.feature) == ["g3", "g7"] and (up.rho == 1).all() and list(up["rank"]) == [1, 2]
    assert set(down.feature) == {"g5", "g9"} and (down.rho == -1).all() and (down.p == 0).all()
    assert up.effect.iloc[0] > up.effect.iloc[1] > 0 and down.effect.iloc[0] > down.effect.iloc[1] > 0
    assert table[(table.modality == "RNA") & (table.dim > 0)].empty  # flat dims: no program
    g3 = curves[(curves.dim == 0) & (curves.feature == "g3")].sort_values("step")
    assert len(g3) == 20 and (np.diff(g3["mean"]) > 0).all() and g3.z.iloc[0] == pytest.approx(-g3.z.iloc[-1])
    with pytest.raises(ValueError, match="feature names for RNA"):
        programs(model, {**names, "RNA": names["RNA"][:5]})


def test_programs_average_over_batches() -> None:
    model = _model(n_batches=3)
    names = {"RNA": [f"g{i}" for i in range(12)], "ADT": [f"p{i}" for i in range(5)]}
    table = programs(model, names, top_n=3, dims=[1]).table
    assert set(table.dim) == {1} and set(table.modality) == {"RNA", "ADT"}
    assert table.groupby(["direction", "modality"]).size().max() <= 3


@pytest.mark.parametrize("faithful", [False, True])
def test_sparse_counts_give_the_dense_results(faithful: bool) -> None:
    """Inference hands the encoders CSR counts (no dense copy): the same outputs, with or without masks."""
    torch.manual_seed(0)
    mods = {"RNA": {"n_features": 12, "likelihood": "nb_disp", "hidden": 8, "n_layers": 1},
            "ADT": {"n_features": 5, "likelihood": "nb_disp", "hidden": 8, "n_layers": 1}}
    model = MMVAE(MMVAEConfig(modalities=mods, latent_dim=3, faithful=faithful, norm="layernorm")).eval()
    x = _data()
    x["RNA"][2] = 0
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        sparse = {m: v.to_sparse_csr() for m, v in x.items()}
    for mask in (None, {"RNA": torch.arange(10) != 2, "ADT": torch.arange(10) < 6}):
        dense_out = infer_batch(model, x, mask=mask, pairs=[("RNA", "ADT")])
        sparse_out = infer_batch(model, sparse, mask=mask, pairs=[("RNA", "ADT")])
        np.testing.assert_allclose(sparse_out.joint, dense_out.joint, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sparse_out.predictions[("RNA", "ADT")], dense_out.predictions[("RNA", "ADT")],
                                   rtol=1e-5)
