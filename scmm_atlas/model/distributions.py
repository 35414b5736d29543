"""Likelihoods and the latent distribution, as small classes without argument validation.

``torch.distributions`` validates its arguments on every call (a measurable share of the original
scMM's step time) and recomputes data-only terms such as ``lgamma(x + 1)`` per call; these classes
do neither. ``log_prob`` is elementwise; callers sum over features. Every count likelihood takes
an optional precomputed ``lgamma(x + 1)`` so that one minibatch pays for it once, not once per
expert and sample.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused import NBLogitsRows, NBSoftmaxRows, float32, wide

# logit(1 - 1e-8): the original clamps NB probs to [1e-8, 1 - 1e-8]; clamping the logit is the same.
PROBS_LOGIT_LIMIT = math.log((1 - 1e-8) / 1e-8)
TOTAL_COUNT_LOG_LIMIT = 12.0  # scMM clamps the log total count to +-12


def lgamma1p(x: torch.Tensor) -> torch.Tensor:
    """``lgamma(x + 1)``, the data-only term of every count likelihood."""
    return torch.lgamma(x + 1)


@dataclass
class Counts:
    """A minibatch of counts [N, F], possibly stacked ``times`` times, with its nonzeros located once.

    Count likelihoods split into a dense part that is cheap (no lgamma) and a part that is zero
    wherever x = 0; :meth:`log_prob_rows` evaluates the second only at the nonzeros (RNA is ~90 %
    zeros), which removes most lgamma/digamma work from the step. Stacking (one block per expert
    and sample) repeats the nonzeros' indices, not the dense counts.
    """

    data: torch.Tensor  # [N, F]: one block of counts
    nz: torch.Tensor  # [nnz] flat indices into the stacked [times * N, F], ascending
    values: torch.Tensor  # [nnz]
    times: int = 1

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> Counts:
        flat = torch.flatten(x)
        nz = flat.nonzero().squeeze(-1)
        return cls(data=x, nz=nz, values=flat[nz])

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        """[nnz] row of each nonzero (in the stacked counts), derived once when first asked for."""
        return torch.div(self.nz, self.data.shape[1], rounding_mode="floor")

    @functools.cached_property
    def cols(self) -> torch.Tensor:
        """[nnz] column of each nonzero."""
        return self.nz % self.data.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.times * self.data.shape[0], self.data.shape[1]

    @property
    def x(self) -> torch.Tensor:
        """The stacked counts, dense (materialised: only for small panels)."""
        return self.data if self.times == 1 else self.data.repeat(self.times, 1)

    def block(self) -> Counts:
        """The first block alone (its nonzeros lead the stacked ones)."""
        k = len(self.nz) // self.times
        return Counts(data=self.data, nz=self.nz[:k], values=self.values[:k])

    def lgamma_rows(self) -> torch.Tensor:
        """[N] sum over features of lgamma(x + 1) (zeros contribute 0)."""
        return self.values.new_zeros(self.shape[0]).index_add(0, self.rows, torch.lgamma(self.values + 1))

    def repeat(self, times: int) -> Counts:
        """The same counts stacked ``times`` times ([times * N, F]), e.g. once per expert and sample."""
        if times == 1:
            return self
        n, f = self.shape
        offsets = torch.arange(times, device=self.nz.device).unsqueeze(-1) * (n * f)
        return Counts(data=self.data, nz=(self.nz + offsets).reshape(-1), values=self.values.repeat(times),
                      times=self.times * times)


def _rows(dense: torch.Tensor, c: Counts, sparse: torch.Tensor) -> torch.Tensor:
    """Per-row sums: ``dense`` [N, F] summed, plus ``sparse`` [nnz] added to their rows."""
    return dense.sum(-1).index_add(0, c.rows, sparse)


def _at(t: torch.Tensor, c: Counts) -> torch.Tensor:
    """``t`` ([N, F], or [F] per feature) at the nonzeros of ``c``."""
    return t.index_select(0, c.cols) if t.dim() == 1 else t.expand(c.shape).reshape(-1).index_select(0, c.nz)


class NegativeBinomial:
    """NB in scMM's (torch's) parameterisation: ``total_count`` r and success ``logits``.

    pmf(k) = C(k + r - 1, k) p^k (1 - p)^r, mean r p / (1 - p), p = sigmoid(logits). Made by
    :meth:`from_heads` (scMM's decoder heads), :meth:`log_prob_rows` runs the fused kernel of
    ``fused.NBLogitsRows``; the values are the same.
    """

    def __init__(self, total_count: torch.Tensor | None, logits: torch.Tensor | None) -> None:
        self._total_count = total_count
        self._logits = logits.clamp(-PROBS_LOGIT_LIMIT, PROBS_LOGIT_LIMIT) if logits is not None else None
        self.heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_heads(cls, count_head: torch.Tensor, logit_head: torch.Tensor, lib_scaled: torch.Tensor
                   ) -> NegativeBinomial:
        """r = exp(clamp(count_head, +-12)) * lib_scaled, logits = logit_head (scMM's decoder)."""
        nb = cls(None, None)
        nb.heads = (count_head, logit_head, lib_scaled)
        return nb

    @property
    def total_count(self) -> torch.Tensor:
        if self._total_count is None:
            a, _, lib_scaled = self.heads
            self._total_count = torch.exp(a.clamp(-TOTAL_COUNT_LOG_LIMIT, TOTAL_COUNT_LOG_LIMIT)) * lib_scaled
        return self._total_count

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self.heads[1].clamp(-PROBS_LOGIT_LIMIT, PROBS_LOGIT_LIMIT)
        return self._logits

    @property
    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @property
    def mean(self) -> torch.Tensor:
        return self.total_count * torch.exp(self.logits)

    def log_prob(self, x: torch.Tensor, lgamma_x1: torch.Tensor | None = None) -> torch.Tensor:
        r = self.total_count
        lg = lgamma1p(x) if lgamma_x1 is None else lgamma_x1
        return (torch.lgamma(x + r) - torch.lgamma(r) - lg
                + r * F.logsigmoid(-self.logits) + x * F.logsigmoid(self.logits))

    def log_prob_zero(self) -> torch.Tensor:
        """[N, F] log pmf at 0."""
        return self.total_count * F.logsigmoid(-self.logits)

    def log_prob_extra(self, c: Counts) -> torch.Tensor:
        """[nnz] log pmf at the nonzeros minus log pmf at 0, without lgamma(x + 1)."""
        r_nz = _at(self.total_count, c)
        return torch.lgamma(c.values + r_nz) - torch.lgamma(r_nz) + c.values * F.logsigmoid(_at(self.logits, c))

    def log_prob_rows(self, c: Counts) -> torch.Tensor:
        """[N] sum over features of log_prob without lgamma(x + 1)."""
        if self.heads is None or self.heads[2].requires_grad:
            return _rows(self.log_prob_zero(), c, self.log_prob_extra(c))
        a, b, lib_scaled = self.heads
        with float32(a.device):
            return NBLogitsRows.apply(wide(a), wide(b), wide(lib_scaled), c.nz, wide(c.values),
                                      TOTAL_COUNT_LOG_LIMIT, PROBS_LOGIT_LIMIT)

    def sample(self) -> torch.Tensor:
        rate = torch.distributions.Gamma(self.total_count, torch.exp(-self.logits)).sample()
        return torch.poisson(rate)


class NegativeBinomialMeanDisp:
    """NB with mean ``mu`` and inverse dispersion ``theta`` (scVI's parameterisation).

    Made by :meth:`from_logits` (mu = softmax(logits) * library), :meth:`log_prob_rows` runs the
    fused kernel of ``fused.NBSoftmaxRows``; the values are the same.
    """

    def __init__(self, mu: torch.Tensor | None, theta: torch.Tensor, eps: float = 1e-8) -> None:
        self._mu, self.theta, self.eps = mu, theta, eps
        self.logits: torch.Tensor | None = None
        self.library: torch.Tensor | None = None

    @classmethod
    def from_logits(cls, logits: torch.Tensor, library: torch.Tensor, theta: torch.Tensor,
                    eps: float = 1e-8) -> NegativeBinomialMeanDisp:
        nb = cls(None, theta, eps)
        nb.logits, nb.library = logits, library
        return nb

    @property
    def mu(self) -> torch.Tensor:
        if self._mu is None:
            self._mu = F.softmax(self.logits, dim=-1) * self.library
        return self._mu

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    def log_prob(self, x: torch.Tensor, lgamma_x1: torch.Tensor | None = None) -> torch.Tensor:
        mu, theta, eps = self.mu, self.theta, self.eps
        lg = lgamma1p(x) if lgamma_x1 is None else lgamma_x1
        log_theta_mu = torch.log(theta + mu + eps)
        return (theta * (torch.log(theta + eps) - log_theta_mu) + x * (torch.log(mu + eps) - log_theta_mu)
                + torch.lgamma(x + theta) - torch.lgamma(theta) - lg)

    def log_prob_zero(self) -> torch.Tensor:
        """[N, F] log pmf at 0."""
        return self.theta * (torch.log(self.theta + self.eps) - torch.log(self.theta + self.mu + self.eps))

    def log_prob_extra(self, c: Counts) -> torch.Tensor:
        """[nnz] log pmf at the nonzeros minus log pmf at 0, without lgamma(x + 1)."""
        mu_nz, t_nz = _at(self.mu, c), _at(self.theta, c)
        return (c.values * (torch.log(mu_nz + self.eps) - torch.log(t_nz + mu_nz + self.eps))
                + torch.lgamma(c.values + t_nz) - torch.lgamma(t_nz))

    def log_prob_rows(self, c: Counts) -> torch.Tensor:
        """[N] sum over features of log_prob without lgamma(x + 1)."""
        if self.logits is None or self.library.requires_grad:
            return _rows(self.log_prob_zero(), c, self.log_prob_extra(c))
        theta, eps = wide(self.theta), self.eps
        with float32(theta.device):
            out = NBSoftmaxRows.apply(wide(self.logits), wide(self.library), theta, c.nz, wide(c.values), eps)
        const = theta * torch.log(theta + eps)
        out = out + (const.sum() if theta.dim() == 1 else const.sum(-1))
        if theta.dim() == 1:  # the lgamma terms do not change between stacked blocks: once per cell
            b = c.block()
            cols = b.cols
            lg = torch.lgamma(b.values + theta.index_select(0, cols)) - torch.lgamma(theta).index_select(0, cols)
            return out + b.values.new_zeros(b.shape[0]).index_add(0, b.rows, lg).repeat(c.times)
        t_nz = _at(theta, c)
        return out.index_add(0, c.rows, torch.lgamma(c.values + t_nz) - torch.lgamma(t_nz))

    def sample(self) -> torch.Tensor:
        rate = torch.distributions.Gamma(self.theta, self.theta / (self.mu + self.eps)).sample()
        return torch.poisson(rate)


class ZeroInflatedNB:
    """An NB (either parameterisation) with a zero-inflation gate per cell x feature."""

    def __init__(self, nb: NegativeBinomial | NegativeBinomialMeanDisp, gate_logits: torch.Tensor) -> None:
        self.nb, self.gate_logits = nb, gate_logits

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(-self.gate_logits) * self.nb.mean

    def log_prob(self, x: torch.Tensor, lgamma_x1: torch.Tensor | None = None) -> torch.Tensor:
        nb_lp = self.nb.log_prob(x, lgamma_x1)
        log_gate = F.logsigmoid(self.gate_logits)
        log_1m_gate = F.logsigmoid(-self.gate_logits)
        zero = torch.logaddexp(log_gate, log_1m_gate + nb_lp)
        return torch.where(x == 0, zero, log_1m_gate + nb_lp)

    def log_prob_rows(self, c: Counts) -> torch.Tensor:
        """[N] sum over features of log_prob without lgamma(x + 1)."""
        log_gate, log_1m_gate = F.logsigmoid(self.gate_logits), F.logsigmoid(-self.gate_logits)
        nb_zero = log_1m_gate + self.nb.log_prob_zero()
        zero = torch.logaddexp(log_gate, nb_zero)
        # At the nonzeros the zero-branch term is replaced by log(1 - gate) + NB log pmf.
        return _rows(zero, c, _at(nb_zero - zero, c) + self.nb.log_prob_extra(c))

    def sample(self) -> torch.Tensor:
        keep = torch.rand_like(self.gate_logits) >= torch.sigmoid(self.gate_logits)
        return self.nb.sample() * keep


class PoissonCounts:
    """Poisson with rate ``rate`` [N, F] (e.g. ATAC fragment counts, as in Martens et al. 2023)."""

    def __init__(self, rate: torch.Tensor, eps: float = 1e-8) -> None:
        self.rate, self.eps = rate, eps

    @property
    def mean(self) -> torch.Tensor:
        return self.rate

    def log_prob(self, x: torch.Tensor, lgamma_x1: torch.Tensor | None = None) -> torch.Tensor:
        lg = lgamma1p(x) if lgamma_x1 is None else lgamma_x1
        return x * torch.log(self.rate + self.eps) - self.rate - lg

    def log_prob_rows(self, c: Counts) -> torch.Tensor:
        """[N] sum over features of log_prob without lgamma(x + 1): -rate everywhere, x log rate at the nonzeros."""
        return _rows(-self.rate, c, c.values * torch.log(_at(self.rate, c) + self.eps))

    def sample(self) -> torch.Tensor:
        return torch.poisson(self.rate)


class NBBackgroundMixture:
    """Protein counts as totalVI models them: a two-component NB mixture with a shared inverse dispersion
    ``theta``, a background mean ``mu_back`` and a foreground mean ``mu_fore`` (> background), and the
    probability of background ``sigmoid(back_logits)`` per cell x protein."""

    def __init__(self, mu_back: torch.Tensor, mu_fore: torch.Tensor, theta: torch.Tensor,
                 back_logits: torch.Tensor) -> None:
        self.back = NegativeBinomialMeanDisp(mu_back, theta)
        self.fore = NegativeBinomialMeanDisp(mu_fore, theta)
        self.back_logits = back_logits

    @property
    def mean(self) -> torch.Tensor:
        pi = torch.sigmoid(self.back_logits)
        return pi * self.back.mu + (1 - pi) * self.fore.mu

    @property
    def foreground_mean(self) -> torch.Tensor:
        """The expected counts without the background (totalVI's denoised protein)."""
        return torch.sigmoid(-self.back_logits) * self.fore.mu

    def log_prob(self, x: torch.Tensor, lgamma_x1: torch.Tensor | None = None) -> torch.Tensor:
        return torch.logaddexp(F.logsigmoid(self.back_logits) + self.back.log_prob(x, lgamma_x1),
                               F.logsigmoid(-self.back_logits) + self.fore.log_prob(x, lgamma_x1))

    def log_prob_rows(self, c: Counts) -> torch.Tensor:
        """[N] sum over features of log_prob without lgamma(x + 1) (dense: protein panels are small)."""
        return self.log_prob(c.x, torch.zeros_like(c.x)).sum(-1)

    def sample(self) -> torch.Tensor:
        back = torch.rand_like(self.back_logits) < torch.sigmoid(self.back_logits)
        return torch.where(back, self.back.sample(), self.fore.sample())


class BernoulliCounts:
    """Bernoulli on binarised counts (x > 0), e.g. ATAC peaks as open / closed."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def log_prob(self, x: torch.Tensor, lgamma_x1: torch.Tensor | None = None) -> torch.Tensor:
        del lgamma_x1  # no count term
        return -F.binary_cross_entropy_with_logits(self.logits, (x > 0).to(self.logits.dtype), reduction="none")

    def log_prob_rows(self, c: Counts) -> torch.Tensor:
        """[N] sum over features of log_prob: log sigmoid(-l) everywhere, plus l at the nonzeros."""
        return _rows(F.logsigmoid(-self.logits), c, _at(self.logits, c))

    def sample(self) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(self.logits))


class Laplace:
    """Laplace(loc, scale): posterior and prior of scMM's latent space."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        self.loc, self.scale = loc, scale

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def stddev(self) -> torch.Tensor:
        return math.sqrt(2) * self.scale

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        shape = (*sample_shape, *torch.broadcast_shapes(self.loc.shape, self.scale.shape))
        finfo = torch.finfo(self.loc.dtype)
        u = torch.empty(shape, dtype=self.loc.dtype, device=self.loc.device).uniform_(finfo.eps - 1, 1)
        return self.loc - self.scale * u.sign() * torch.log1p(-u.abs())

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -torch.log(2 * self.scale) - (z - self.loc).abs() / self.scale

    def detach(self) -> Laplace:
        return Laplace(self.loc.detach(), self.scale.detach())


def kl_laplace(q: Laplace, p: Laplace) -> torch.Tensor:
    """KL(q || p) of two Laplace distributions, elementwise (closed form)."""
    diff = (q.loc - p.loc).abs()
    ratio = q.scale / p.scale
    return -torch.log(ratio) + diff / p.scale + ratio * torch.exp(-diff / q.scale) - 1
