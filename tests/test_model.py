"""The MoE-MMVAE, its objectives and the in-memory trainer, on small tensors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from scmm_atlas.model import MMVAE, MMVAEConfig, moe_dreg, moe_elbo, moe_iwae
from scmm_atlas.model.fit import CellData, fit
from scmm_atlas.model.networks import Decoder
from scmm_atlas.model.objectives import log_likelihoods
from scmm_atlas.model.training import FitConfig


def _config(**kw) -> MMVAEConfig:
    mods = kw.pop("modalities", {"RNA": {"n_features": 40, "likelihood": "nb", "hidden": 16},
                                 "ADT": {"n_features": 6, "likelihood": "nb", "hidden": 8}})
    return MMVAEConfig(modalities=mods, latent_dim=kw.pop("latent_dim", 4), **kw)


def _synthetic(n: int = 200, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two groups of cells with different RNA and ADT profiles."""
    g = torch.Generator().manual_seed(seed)
    group = torch.arange(n) % 2
    rna_rate = torch.where(group[:, None] == 0, torch.linspace(0.1, 3, 40), torch.linspace(3, 0.1, 40))
    adt_rate = torch.where(group[:, None] == 0, torch.tensor([50.0, 5, 20, 1, 80, 10]),
                           torch.tensor([5.0, 50, 2, 30, 10, 80]))
    return {"RNA": torch.poisson(rna_rate, generator=g), "ADT": torch.poisson(adt_rate, generator=g)}


@pytest.mark.parametrize("faithful", [True, False])
def test_zero_library_cells_give_no_nan(faithful: bool) -> None:
    torch.manual_seed(0)
    model = MMVAE(_config(faithful=faithful))
    x = _synthetic(16)
    x["RNA"][3] = 0
    x["ADT"][5] = 0
    out = moe_elbo(model, x, beta=1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(model.embed(x)).all()


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_missing_modality_is_masked_not_faked(norm: str) -> None:
    torch.manual_seed(0)
    model = MMVAE(_config(norm=norm))
    x = _synthetic(20)
    mask = {"RNA": torch.ones(20, dtype=torch.bool), "ADT": torch.arange(20) >= 5}  # cells 0-4: RNA only
    seen = []
    model.encoders["ADT"].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    torch.manual_seed(1)
    loss_a = moe_elbo(model, x, mask=mask).loss
    assert seen[-1] == 15  # the ADT encoder saw only cells that have ADT
    x_b = {k: v.clone() for k, v in x.items()}
    x_b["ADT"][:5] = 1e4  # garbage where ADT is absent must not matter
    torch.manual_seed(1)
    loss_b = moe_elbo(model, x_b, mask=mask).loss
    torch.testing.assert_close(loss_a, loss_b)


def test_rna_only_cell_objective_uses_its_own_expert() -> None:
    """A cell with one modality: objective = log p(x_RNA | z_RNA) - beta KL(q_RNA || p), not halved."""
    torch.manual_seed(0)
    model = MMVAE(_config(norm="layernorm")).eval()
    x = _synthetic(6)
    mask = {"RNA": torch.ones(6, dtype=torch.bool), "ADT": torch.tensor([False, True, True, True, True, True])}
    torch.manual_seed(3)
    total = moe_elbo(model, x, mask=mask, beta=0.5).loss
    torch.manual_seed(3)
    out = model(x, mask=mask)
    lpx = log_likelihoods(model, out, x)
    from scmm_atlas.model.distributions import kl_laplace

    kl = {e: kl_laplace(out.qz[e], model.prior()).sum(-1) for e in model.names}
    cell0 = lpx["RNA"][0, 0, 0] - 0.5 * kl["RNA"][0]
    others = sum((lpx["RNA"][i, 0, 1:] + lpx["ADT"][i, 0, 1:] - 0.5 * kl[e][1:]) for i, e in enumerate(model.names)) / 2
    torch.testing.assert_close(total, -(cell0 + others.sum()))


def test_three_modalities_and_batch_covariates() -> None:
    torch.manual_seed(0)
    mods = {"RNA": {"n_features": 30, "likelihood": "nb_disp"}, "ADT": {"n_features": 5, "likelihood": "nb_disp"},
            "ATAC": {"n_features": 50, "likelihood": "bernoulli"}}
    model = MMVAE(_config(modalities=mods, n_batches=3, batch_in_encoder=True, norm="layernorm", dropout=0.1))
    g = torch.Generator().manual_seed(0)
    x = {"RNA": torch.poisson(torch.rand(12, 30, generator=g) * 3), "ADT": torch.poisson(torch.ones(12, 5) * 20),
         "ATAC": (torch.rand(12, 50, generator=g) < 0.1).float()}
    batch = torch.arange(12) % 3
    out = model(x, batch=batch, K=2)
    assert out.zs[2].shape == (2, 12, 4)  # components follow the modalities: ATAC is the third
    loss = moe_elbo(model, x, batch=batch, K=2)
    loss.loss.backward()
    assert set(loss.recon) == {"RNA", "ADT", "ATAC"}
    assert model.decoders["RNA"].log_theta.shape == (3, 30)  # per-batch dispersion
    assert model.decoders["RNA"].log_theta.grad is not None


def _trained_tiny_model(seed: int = 0) -> tuple[MMVAE, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = MMVAE(_config(norm="layernorm", faithful=False))
    data = CellData(_synthetic(120))
    fit(model, data, np.arange(120), None, FitConfig(epochs=15, batch_size=40, lr=1e-2, warmup_epochs=0, seed=seed))
    return model.eval(), {k: v[:40] for k, v in _synthetic(120, seed=5).items()}


@pytest.mark.slow
def test_iwae_bound_above_elbo_and_grows_with_k() -> None:
    model, x = _trained_tiny_model()
    bounds = {}
    with torch.no_grad():
        for k in (1, 5, 30):
            vals = []
            for s in range(20):
                torch.manual_seed(100 + s)
                vals.append(-float(moe_iwae(model, x, K=k).loss))
            bounds[k] = np.mean(vals)
        elbo = []
        for s in range(20):
            torch.manual_seed(100 + s)
            elbo.append(-float(moe_elbo(model, x, beta=1.0).loss))
    assert bounds[1] >= np.mean(elbo)
    assert bounds[1] < bounds[5] < bounds[30]


@pytest.mark.slow
def test_dreg_gradient_matches_iwae_in_expectation_with_lower_variance() -> None:
    model, x = _trained_tiny_model()
    params = list(model.encoders.parameters())

    def grads(objective) -> np.ndarray:
        out = []
        for s in range(150):
            torch.manual_seed(1000 + s)
            model.zero_grad()
            objective(model, x, K=8).loss.backward()
            out.append(torch.cat([p.grad.flatten() for p in params]).numpy().copy())
        return np.stack(out)

    g_iwae, g_dreg = grads(moe_iwae), grads(moe_dreg)
    mean_i, mean_d = g_iwae.mean(0), g_dreg.mean(0)
    se = np.sqrt(g_iwae.var(0) / len(g_iwae) + g_dreg.var(0) / len(g_dreg))
    big = np.abs(mean_i) > 3 * se  # coordinates whose expected gradient is clearly non-zero
    assert big.sum() > 20
    z = (mean_i - mean_d) / (se + 1e-12)
    assert np.mean(np.abs(z) < 3) > 0.95  # same expectation within sampling error
    cos = mean_i @ mean_d / (np.linalg.norm(mean_i) * np.linalg.norm(mean_d))
    assert cos > 0.9
    assert g_dreg.var(0).sum() < 0.5 * g_iwae.var(0).sum()  # measurably lower variance


@pytest.mark.slow
def test_fit_is_deterministic_and_converges() -> None:
    def run() -> list[float]:
        torch.manual_seed(0)
        model = MMVAE(_config())
        data = CellData(_synthetic(200))
        res = fit(model, data, np.arange(160), np.arange(160, 200),
                  FitConfig(epochs=12, batch_size=32, lr=3e-3, warmup_epochs=4, seed=7))
        return [r.train_loss for r in res.history] + [r.val_loss for r in res.history]

    a, b = run(), run()
    assert a == b
    train = a[:12]
    assert train[-1] < 0.7 * train[0]


@pytest.mark.slow
def test_early_stopping_on_validation_restores_best() -> None:
    torch.manual_seed(0)
    model = MMVAE(_config(norm="layernorm"))
    data = CellData(_synthetic(200))
    val = np.arange(160, 200)
    states = {}
    # A large learning rate makes validation noisy, so that patience runs out.
    cfg = FitConfig(epochs=60, batch_size=16, lr=5e-2, warmup_epochs=2, patience=3, seed=0)
    res = fit(model, data, np.arange(160), val, cfg,
              on_epoch=lambda rec: states.__setitem__(rec.epoch, copy.deepcopy(model.state_dict())))
    assert res.stopped_early and len(res.history) < cfg.epochs
    assert res.best_epoch > cfg.warmup_epochs
    assert len(res.history) == res.best_epoch + cfg.patience
    assert res.best_val == min(r.val_loss for r in res.history if r.epoch > cfg.warmup_epochs)
    for key, value in model.state_dict().items():  # the best epoch's weights, not the last ones
        torch.testing.assert_close(value, states[res.best_epoch][key])


def test_fewer_than_two_modalities_refused() -> None:
    with pytest.raises(ValueError, match="at least two modalities"):
        MMVAEConfig(modalities={"RNA": {"n_features": 3}})


def test_product_of_experts_is_the_gaussian_product_and_skips_absent_experts() -> None:
    from scmm_atlas.model.distributions import Laplace
    from scmm_atlas.model.mmvae import product_of_experts

    a = Laplace(torch.tensor([[0.0, 2.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.5], [2.0, 2.0]]))
    b = Laplace(torch.tensor([[3.0, 2.0], [5.0, 5.0]]), torch.tensor([[2.0, 0.5], [1.0, 1.0]]))
    have = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # cell 1 lacks expert b
    p = product_of_experts([a, b], have)
    var_a, var_b = 2 * a.scale[0] ** 2, 2 * b.scale[0] ** 2
    var = 1 / (1 / var_a + 1 / var_b)
    torch.testing.assert_close(p.loc[0], var * (a.loc[0] / var_a + b.loc[0] / var_b))
    torch.testing.assert_close(2 * p.scale[0] ** 2, var)  # the product's variance
    torch.testing.assert_close(p.loc[1], a.loc[1])  # only its own expert
    torch.testing.assert_close(p.scale[1], a.scale[1])


@pytest.mark.parametrize("joint", ["poe", "mopoe"])
def test_joint_posteriors_average_over_their_components(joint: str) -> None:
    from scmm_atlas.model.distributions import kl_laplace

    torch.manual_seed(0)
    model = MMVAE(_config(norm="layernorm", joint=joint)).eval()
    assert model.components == ([("RNA", "ADT")] if joint == "poe" else [("RNA",), ("ADT",), ("RNA", "ADT")])
    x = _synthetic(6)
    mask = {"RNA": torch.ones(6, dtype=torch.bool), "ADT": torch.arange(6) > 0}  # cell 0: RNA only
    torch.manual_seed(3)
    total = moe_elbo(model, x, mask=mask, beta=0.5).loss
    torch.manual_seed(3)
    out = model(x, mask=mask)
    lpx = log_likelihoods(model, out, x)
    kl = torch.stack([kl_laplace(q, model.prior()).sum(-1) for q in out.qc])
    elbo = lpx["RNA"][:, 0] + lpx["ADT"][:, 0] * mask["ADT"] - 0.5 * kl  # [C, B]
    if joint == "poe":  # one component, for cell 0 the RNA expert alone
        assert out.present.tolist() == [[1.0] * 6]
        torch.testing.assert_close(out.qc[0].loc[0], out.qz["RNA"].loc[0])
        expected = elbo[0].sum()
    else:  # cell 0 has only the RNA singleton; the others all three components
        assert out.present[:, 0].tolist() == [1.0, 0.0, 0.0]
        expected = elbo[0, 0] + elbo[:, 1:].mean(0).sum()
    torch.testing.assert_close(total, -expected)
    emb = model.embed(x, mask=mask)
    qc, _ = model.joint_components(out.qz, mask)
    torch.testing.assert_close(emb[1], torch.stack([q.loc[1] for q in qc]).mean(0))  # the mixture's mean


def test_iwae_needs_the_mixture_of_experts() -> None:
    model = MMVAE(_config(joint="poe"))
    with pytest.raises(ValueError, match=r"need model\.joint=moe"):
        moe_iwae(model, _synthetic(8), K=2)


def test_concatenated_embedding_fills_absent_experts_with_the_joint_mean() -> None:
    torch.manual_seed(0)
    model = MMVAE(_config(norm="layernorm", embedding="concat")).eval()
    assert model.config.embedding_dim == 8
    x = _synthetic(6)
    mask = {"RNA": torch.ones(6, dtype=torch.bool), "ADT": torch.arange(6) > 0}
    emb = model.embed(x, mask=mask)
    qz = model.encode(x, mask)
    torch.testing.assert_close(emb[:, :4], qz["RNA"].loc)
    torch.testing.assert_close(emb[1:, 4:], qz["ADT"].loc[1:])
    torch.testing.assert_close(emb[0, 4:], qz["RNA"].loc[0])  # cell 0's joint mean is its RNA expert


def test_bad_joint_or_embedding_named() -> None:
    with pytest.raises(ValueError, match=r"model\.joint must be one of"):
        _config(joint="sum")
    with pytest.raises(ValueError, match=r"model\.embedding must be one of"):
        _config(embedding="max")


@pytest.mark.parametrize("likelihood", ["nb", "nb_disp", "zinb", "zinb_disp", "bernoulli", "bernoulli_depth", "poisson",
                                        "nb_mixture"])
@pytest.mark.slow
def test_every_likelihood_trains_and_predicts(likelihood: str) -> None:
    torch.manual_seed(0)
    mods = {"RNA": {"n_features": 40, "likelihood": "nb_disp", "hidden": 16},
            "ADT": {"n_features": 6, "likelihood": likelihood, "hidden": 8}}
    model = MMVAE(_config(modalities=mods, norm="layernorm", n_batches=2))
    data = CellData(_synthetic(120), batch=np.arange(120) % 2)
    result = fit(model, data, np.arange(100), np.arange(100, 120),
                 FitConfig(epochs=12, batch_size=20, lr=1e-2, warmup_epochs=0, patience=50))
    losses = [r.train_loss for r in result.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    mean = model.eval().decode(torch.zeros(3, 4), "ADT", None, torch.tensor([0, 1, 0])).mean
    assert mean.shape == (3, 6) and torch.isfinite(mean).all() and (mean >= 0).all()


@pytest.mark.parametrize("library", [300.0, 3000.0, 30000.0])
def test_protein_mixture_starts_at_the_scale_of_the_library(library: float) -> None:
    """An untrained background/foreground mixture predicts counts of the cell's library's order: it once
    started at 1 count per protein per 10k, too far for training to climb before early stopping."""
    torch.manual_seed(0)
    dec = Decoder(8, 14, 16, 1, likelihood="nb_mixture", norm="layernorm", dropout=0.0, n_batches=2)
    total = dec(torch.randn(64, 8), torch.full((64, 1), library), torch.arange(64) % 2).mean.sum(-1)
    assert (total > 0.3 * library).all() and (total < 3 * library).all()


def test_depth_aware_peaks_take_depth_relative_to_the_training_mean() -> None:
    """``bernoulli_depth``: training batches set the reference depth; a deeper cell's peaks are more likely
    open by exactly its log depth ratio; a prediction without a library is at the reference depth."""
    torch.manual_seed(0)
    dec = Decoder(4, 10, 8, 1, likelihood="bernoulli_depth", norm="layernorm", dropout=0.0)
    z = torch.randn(4, 4)
    for _ in range(3):  # the first batch sets the reference; later ones move it by the momentum
        dec.train()(z, torch.tensor([[50.0], [50.0], [200.0], [200.0]]))
    assert float(dec.log_depth) == pytest.approx(np.log(100.0), abs=1e-5)
    dec.eval()
    fixed = dec(z, None).logits
    deep = dec(z, torch.full((4, 1), 400.0)).logits
    torch.testing.assert_close(deep - fixed, torch.full_like(fixed, float(np.log(4.0))))
    before = float(dec.log_depth)
    dec(z, torch.full((4, 1), 1e4))
    assert float(dec.log_depth) == before  # evaluation leaves the reference alone
    assert Decoder(4, 10, 8, 1, likelihood="bernoulli", norm="layernorm", dropout=0.0).state_dict().keys().isdisjoint(
        {"log_depth", "depth_seen"})


def test_kl_weight_and_learning_rate_schedules() -> None:
    cfg = FitConfig(epochs=11, warmup_epochs=4, kl_weight=0.5, lr=1e-2, lr_schedule="cosine", lr_min_factor=0.1)
    assert [cfg.beta(e) for e in (1, 3, 5, 9)] == [0.0, 0.25, 0.5, 0.5]
    assert cfg.lr_at(1) == pytest.approx(1e-2) and cfg.lr_at(11) == pytest.approx(1e-3)
    assert cfg.lr_at(6) == pytest.approx(0.55e-2)  # halfway down the cosine
    assert FitConfig(lr=1e-3).lr_at(50) == 1e-3
    with pytest.raises(ValueError, match=r"train\.lr_schedule must be one of"):
        FitConfig(lr_schedule="step")
    torch.manual_seed(0)
    model = MMVAE(_config(norm="layernorm"))
    seen = []
    fit(model, CellData(_synthetic(40)), np.arange(40), None,
        FitConfig(epochs=3, batch_size=20, lr=1e-2, lr_schedule="cosine", lr_min_factor=0.0, warmup_epochs=0),
        on_epoch=lambda r: seen.append(r.lr))
    assert seen == pytest.approx([1e-2, 5e-3, 0.0])


def test_a_saved_model_reads_back_as_the_same_model_from_any_depth_of_its_folder(tmp_path) -> None:
    """The one saved-model format (model/saved.py): what training writes, inference and the pyfunc read."""
    from scmm_atlas.errors import InputError
    from scmm_atlas.model.saved import find_saved, read_saved, write_meta

    config = MMVAEConfig(modalities={"RNA": {"n_features": 6, "hidden": 8, "n_layers": 1},
                                     "ADT": {"n_features": 3, "hidden": 8, "n_layers": 1}}, latent_dim=2)
    torch.manual_seed(3)
    model = MMVAE(config).eval()
    folder = tmp_path / "run" / "artifacts"
    folder.mkdir(parents=True)
    with pytest.raises(InputError, match=r"no meta\.json under it"):
        find_saved(tmp_path)
    write_meta(folder, config, {"RNA": [f"g{i}" for i in range(6)], "ADT": ["a", "b", "c"]}, ["b0", "b1"])
    with pytest.raises(InputError, match=r"no \.pt weights beside meta\.json"):
        find_saved(tmp_path)
    torch.save(model.state_dict(), folder / "best_model.pt")
    saved = read_saved(*find_saved(tmp_path))
    assert saved.config == config and saved.features["ADT"] == ["a", "b", "c"] and saved.batches == ["b0", "b1"]
    x = {"RNA": torch.rand(4, 6) * 5, "ADT": torch.rand(4, 3) * 5}
    with torch.no_grad():
        torch.testing.assert_close(saved.build().embed(x), model.embed(x))
