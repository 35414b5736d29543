"""Likelihoods against scipy.stats, the sparse row sums against the dense ones, Laplace KL vs Monte Carlo."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch

import scmm_atlas.model.distributions as D

DTYPES = [torch.float32, torch.float64]


def _counts(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    x = rng.negative_binomial(2, 0.2, size=shape).astype(float)
    x[rng.random(shape) < 0.5] = 0  # many zeros
    x[0, 0] = 0
    x[0, 1] = 5000  # a large count
    return x


def _rtol(dtype: torch.dtype) -> float:
    return 2e-4 if dtype == torch.float32 else 1e-9


@pytest.mark.parametrize("dtype", DTYPES)
def test_nb_scmm_matches_scipy(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    x = _counts(rng, (6, 9))
    r = rng.uniform(0.05, 40, x.shape)
    p = rng.uniform(0.01, 0.99, x.shape)  # torch's success probability
    nb = D.NegativeBinomial(torch.tensor(r, dtype=dtype), torch.logit(torch.tensor(p, dtype=dtype)))
    ours = nb.log_prob(torch.tensor(x, dtype=dtype)).numpy()
    expected = st.nbinom.logpmf(x, r, 1 - p)  # scipy's p is the failure-side probability
    np.testing.assert_allclose(ours, expected, rtol=_rtol(dtype), atol=1e-3 if dtype == torch.float32 else 1e-8)
    np.testing.assert_allclose(nb.mean.numpy(), r * p / (1 - p), rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nb_mean_dispersion_matches_scipy(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(1)
    x = _counts(rng, (5, 8))
    mu = rng.uniform(0.01, 300, x.shape)
    theta = rng.uniform(0.1, 20, x.shape[1])  # per feature
    nb = D.NegativeBinomialMeanDisp(torch.tensor(mu, dtype=dtype), torch.tensor(theta, dtype=dtype), eps=0.0)
    expected = st.nbinom.logpmf(x, theta, theta / (theta + mu))
    np.testing.assert_allclose(nb.log_prob(torch.tensor(x, dtype=dtype)).numpy(), expected, rtol=_rtol(dtype),
                               atol=1e-3 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zinb_matches_mixture(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(2)
    x = _counts(rng, (5, 7))
    r, p, gate = rng.uniform(0.1, 10, x.shape), rng.uniform(0.05, 0.95, x.shape), rng.uniform(0.01, 0.9, x.shape)
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    zinb = D.ZeroInflatedNB(D.NegativeBinomial(t(r), torch.logit(t(p))), torch.logit(t(gate)))
    nb_lp = st.nbinom.logpmf(x, r, 1 - p)
    expected = np.where(x == 0, np.log(gate + (1 - gate) * np.exp(nb_lp)), np.log1p(-gate) + nb_lp)
    np.testing.assert_allclose(zinb.log_prob(t(x)).numpy(), expected, rtol=_rtol(dtype) * 10, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_poisson_and_background_mixture_match_scipy(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(3)
    x = _counts(rng, (5, 7))
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    rate = rng.uniform(0.01, 200, x.shape)
    np.testing.assert_allclose(D.PoissonCounts(t(rate), eps=0.0).log_prob(t(x)).numpy(), st.poisson.logpmf(x, rate),
                               rtol=_rtol(dtype), atol=1e-3 if dtype == torch.float32 else 1e-8)
    back, fore = rng.uniform(0.5, 20, x.shape), rng.uniform(20, 500, x.shape)
    theta, pi = rng.uniform(0.5, 10, x.shape[1]), rng.uniform(0.05, 0.95, x.shape)
    mix = D.NBBackgroundMixture(t(back), t(fore), t(theta), torch.logit(t(pi)))
    mix.back.eps = mix.fore.eps = 0.0
    expected = np.log(pi * st.nbinom.pmf(x, theta, theta / (theta + back))
                      + (1 - pi) * st.nbinom.pmf(x, theta, theta / (theta + fore)))
    np.testing.assert_allclose(mix.log_prob(t(x)).numpy(), expected, rtol=_rtol(dtype) * 10,
                               atol=1e-3 if dtype == torch.float32 else 1e-8)
    np.testing.assert_allclose(mix.mean.numpy(), pi * back + (1 - pi) * fore, rtol=1e-5)
    np.testing.assert_allclose(mix.foreground_mean.numpy(), (1 - pi) * fore, rtol=1e-5)


def test_bernoulli_on_binarised_counts() -> None:
    logits = torch.tensor([[-2.0, 0.5, 3.0]])
    x = torch.tensor([[0.0, 4.0, 1.0]])
    expected = st.bernoulli.logpmf([[0, 1, 1]], 1 / (1 + np.exp(-logits.numpy())))
    np.testing.assert_allclose(D.BernoulliCounts(logits).log_prob(x).numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_row_sums_equal_dense(dtype: torch.dtype) -> None:
    """log_prob_rows (dense part + nonzeros only) equals summing the elementwise log_prob."""
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(12, 30, generator=g, dtype=dtype) * 1.5)
    x[3] = 0  # an all-zero cell
    c = D.Counts.from_dense(x)
    lg = torch.lgamma(x + 1).sum(-1)
    r, logits = torch.rand(12, 30, dtype=dtype, generator=g) * 5 + 0.1, torch.randn(12, 30, dtype=dtype, generator=g)
    mu, theta = torch.rand(12, 30, dtype=dtype, generator=g) * 4, torch.rand(30, dtype=dtype, generator=g) + 0.2
    gate = torch.randn(12, 30, dtype=dtype, generator=g)
    for dist, has_lgamma in [(D.NegativeBinomial(r, logits), True), (D.NegativeBinomialMeanDisp(mu, theta), True),
                             (D.ZeroInflatedNB(D.NegativeBinomial(r, logits), gate), True),
                             (D.ZeroInflatedNB(D.NegativeBinomialMeanDisp(mu, theta), gate), True),
                             (D.PoissonCounts(mu), True), (D.NBBackgroundMixture(mu, mu * 3, theta, gate), True),
                             (D.BernoulliCounts(logits), False)]:
        dense = dist.log_prob(x).sum(-1)
        rows = dist.log_prob_rows(c) - (lg if has_lgamma else 0)
        torch.testing.assert_close(rows, dense, rtol=_rtol(dtype) * 10, atol=1e-3 if dtype == torch.float32 else 1e-9)
    rep = c.repeat(3)
    assert torch.equal(rep.x, x.repeat(3, 1)) and torch.equal(torch.flatten(rep.x)[rep.nz], rep.values)


def test_laplace_log_prob_and_sampling() -> None:
    loc, scale = torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0])
    z = torch.tensor([[0.1, 3.0], [2.0, -1.0]])
    np.testing.assert_allclose(D.Laplace(loc, scale).log_prob(z).numpy(),
                               st.laplace.logpdf(z.numpy(), loc.numpy(), scale.numpy()), rtol=1e-6)
    torch.manual_seed(0)
    s = D.Laplace(loc, scale).rsample((200_000,))
    np.testing.assert_allclose(s.mean(0).numpy(), loc.numpy(), atol=0.02)
    np.testing.assert_allclose(s.std(0).numpy(), np.sqrt(2) * scale.numpy(), rtol=0.02)


def test_laplace_kl_closed_form_matches_monte_carlo() -> None:
    torch.manual_seed(0)
    f64 = torch.float64
    q = D.Laplace(torch.tensor([0.3, -2.0, 1.0], dtype=f64), torch.tensor([0.5, 1.5, 0.05], dtype=f64))
    p = D.Laplace(torch.tensor([0.0, 0.0, 1.2], dtype=f64), torch.tensor([1.0, 0.7, 2.0], dtype=f64))
    z = q.rsample((400_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    np.testing.assert_allclose(D.kl_laplace(q, p).numpy(), mc.numpy(), rtol=0.02, atol=2e-3)
    assert torch.allclose(D.kl_laplace(p, p), torch.zeros(3, dtype=torch.float64))
