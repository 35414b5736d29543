"""Encoder and decoder blocks: [Linear -> norm -> ReLU (-> dropout)] x n_layers, then heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .distributions import (
    BernoulliCounts,
    Laplace,
    NBBackgroundMixture,
    NegativeBinomial,
    NegativeBinomialMeanDisp,
    PoissonCounts,
    ZeroInflatedNB,
)

LIKELIHOODS = ("nb", "nb_disp", "zinb", "zinb_disp", "bernoulli", "bernoulli_depth", "poisson", "nb_mixture")
DEPTH_MOMENTUM = 0.01  # of the running mean of log library that ``bernoulli_depth`` is relative to
NORMS = ("batchnorm", "layernorm", "none")


def mlp(n_in: int, hidden: int, n_layers: int, *, norm: str, dropout: float) -> nn.Sequential:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(n_in if i == 0 else hidden, hidden))
        if norm == "batchnorm":
            layers.append(nn.BatchNorm1d(hidden))
        elif norm == "layernorm":
            layers.append(nn.LayerNorm(hidden))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """q(z | x_m): Laplace. ``softmax_scale``: scMM's scale, softmax(clamp(h, +-12)) * D + 1e-6
    (the scales of a cell sum to D); otherwise a free scale, softplus(h) + 1e-4."""

    def __init__(self, n_in: int, latent: int, hidden: int, n_layers: int, *, norm: str, dropout: float,
                 softmax_scale: bool) -> None:
        super().__init__()
        self.body = mlp(n_in, hidden, n_layers, norm=norm, dropout=dropout)
        self.loc = nn.Linear(hidden, latent)
        self.scale = nn.Linear(hidden, latent)
        self.softmax_scale = softmax_scale

    def forward(self, x: torch.Tensor) -> Laplace:
        h = self.body(x)
        s = self.scale(h)
        scale = F.softmax(s.clamp(-12, 12), dim=-1) * s.shape[-1] + 1e-6 if self.softmax_scale else F.softplus(s) + 1e-4
        return Laplace(self.loc(h), scale)


class Decoder(nn.Module):
    """p(x_m | z): the body, then one head per likelihood parameter.

    ``nb``/``zinb``: scMM's NB, total_count = exp(clamp(h, +-12)) * library / 1e4 and per cell x
    feature probs; ``*_disp``: mean = softmax(h) * library with a per-feature (optionally
    per-batch) dispersion; ``poisson``: rate = softmax(h) * library; ``bernoulli``: open/closed
    peaks; ``bernoulli_depth``: the same with the cell's sequencing depth as a known offset of the
    logits, log library minus its running mean over training (PeakVI's per-cell factor, observed
    rather than encoded), so that the latent space need not carry depth; predictions without a
    library are at the mean depth; ``nb_mixture``: proteins as background + foreground (totalVI's idea): a background
    mean per protein (and batch) at the cell's library relative to ``library_scale``, shifted per
    cell by a head bounded to +-1 in log space, a foreground 1 + softplus(h) times higher, and a
    per cell x protein background probability; shared per-protein dispersion.
    """

    def __init__(self, latent: int, n_out: int, hidden: int, n_layers: int, *, likelihood: str, norm: str,
                 dropout: float, n_batches: int = 0, library_scale: float = 1e4) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.likelihood, self.n_batches, self.library_scale = likelihood, n_batches, library_scale
        self.body = mlp(latent + n_batches, hidden, n_layers, norm=norm, dropout=dropout)
        self.head = nn.Linear(hidden, n_out)
        if likelihood in ("nb", "zinb"):
            self.head_p = nn.Linear(hidden, n_out)
        if likelihood.startswith("zinb"):
            self.head_gate = nn.Linear(hidden, n_out)
        if likelihood.endswith("_disp") or likelihood == "nb_mixture":
            self.log_theta = nn.Parameter(torch.zeros(max(n_batches, 1), n_out))
        if likelihood == "bernoulli_depth":
            self.register_buffer("log_depth", torch.zeros(()))
            self.register_buffer("depth_seen", torch.zeros((), dtype=torch.bool))
        if likelihood == "nb_mixture":
            # start the background at each protein's equal share of the library: from exp(0) = 1 count
            # per 10k, Adam's ~lr-sized steps needed hundreds of epochs to reach real protein levels, so
            # early stopping ended training while every prediction was still background (Pearson 0.17)
            start = math.log(library_scale / n_out)
            self.back_log_mean = nn.Parameter(torch.full((max(n_batches, 1), n_out), start))
            self.head_back = nn.Linear(hidden, n_out)
            self.head_gate = nn.Linear(hidden, n_out)

    def forward(self, z: torch.Tensor, library: torch.Tensor | None, batch: torch.Tensor | None = None):
        """``z``: [N, D]; ``library``: [N, 1] counts of the target modality; ``batch``: [N] codes."""
        return self.heads(self.hidden(z, batch), library, batch)

    def hidden(self, z: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        """The body's output [N, hidden] (the only part with cross-cell statistics, under BatchNorm)."""
        if self.n_batches:
            z = torch.cat([z, F.one_hot(batch, self.n_batches).to(z.dtype)], dim=-1)
        return self.body(z)

    def heads(self, h: torch.Tensor, library: torch.Tensor | None, batch: torch.Tensor | None = None):
        """The likelihood of the body's output ``h`` (row-wise: rows may come from several body calls)."""
        out = self.head(h)
        if self.likelihood == "bernoulli_depth" and library is not None:
            out = out + self._depth_offset(library)
        if library is None:  # decoded means at a fixed library size (per 10k counts by default)
            library = torch.full((h.shape[0], 1), self.library_scale, dtype=h.dtype, device=h.device)
        onehot = F.one_hot(batch, self.n_batches).to(h.dtype) if self.n_batches else None
        if self.likelihood.startswith("bernoulli"):
            return BernoulliCounts(out)
        if self.likelihood == "poisson":
            return PoissonCounts(F.softmax(out, dim=-1) * library)
        if self.likelihood.endswith("_disp") or self.likelihood == "nb_mixture":
            theta = torch.exp(self._per_batch(self.log_theta, onehot))
            if self.likelihood == "nb_mixture":
                log_back = (self._per_batch(self.back_log_mean, onehot) + torch.tanh(self.head_back(h))
                            + torch.log(library.clamp(min=1) / self.library_scale))
                mu_back = torch.exp(log_back.clamp(max=20))
                return NBBackgroundMixture(mu_back, mu_back * (1 + F.softplus(out)), theta, self.head_gate(h))
            nb = NegativeBinomialMeanDisp.from_logits(out, library, theta)
        else:
            nb = NegativeBinomial.from_heads(out, self.head_p(h), library / self.library_scale)
        return ZeroInflatedNB(nb, self.head_gate(h)) if self.likelihood.startswith("zinb") else nb

    def _depth_offset(self, library: torch.Tensor) -> torch.Tensor:
        """[N, 1] log depth relative to the running mean of training batches' log depth."""
        log_lib = torch.log(library.clamp(min=1))
        if self.training:
            with torch.no_grad():
                mean = log_lib.mean()
                self.log_depth.copy_(torch.where(self.depth_seen, torch.lerp(self.log_depth, mean, DEPTH_MOMENTUM),
                                                 mean))
                self.depth_seen.fill_(True)
        return log_lib - self.log_depth

    @staticmethod
    def _per_batch(param: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
        """A [batches, F] parameter for each cell; as a matmul: indexing (param[batch]) backpropagates
        through a serial index_put on CPU, which made steps ~2.5x slower with 10 batches. With one
        batch, the [F] row itself (every cell has it): no [cells, F] copy."""
        return onehot @ param if onehot is not None and param.shape[0] > 1 else param[0]
