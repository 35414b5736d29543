"""Encoder and decoder blocks: [Linear -> norm -> ReLU (-> dropout)] x n_layers, then heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributions import (
    BernoulliCounts,
    Laplace,
    NegativeBinomial,
    NegativeBinomialMeanDisp,
    ZeroInflatedNB,
)

LIKELIHOODS = ("nb", "nb_disp", "zinb", "zinb_disp", "bernoulli")
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
    per-batch) dispersion; ``bernoulli``: open/closed peaks.
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
        if likelihood.endswith("_disp"):
            self.log_theta = nn.Parameter(torch.zeros(max(n_batches, 1), n_out))

    def forward(self, z: torch.Tensor, library: torch.Tensor | None, batch: torch.Tensor | None = None):
        """``z``: [N, D]; ``library``: [N, 1] counts of the target modality; ``batch``: [N] codes."""
        if library is None:  # decoded means at a fixed library size (per 10k counts by default)
            library = torch.full((z.shape[0], 1), self.library_scale, dtype=z.dtype, device=z.device)
        onehot = F.one_hot(batch, self.n_batches).to(z.dtype) if self.n_batches else None
        if onehot is not None:
            z = torch.cat([z, onehot], dim=-1)
        h = self.body(z)
        out = self.head(h)
        if self.likelihood == "bernoulli":
            return BernoulliCounts(out)
        if self.likelihood.endswith("_disp"):
            # per-batch dispersion as a matmul: indexing (log_theta[batch]) backpropagates through a serial
            # index_put on CPU, which made steps ~2.5x slower with 10 batches
            theta = torch.exp(onehot @ self.log_theta if onehot is not None else self.log_theta[0])
            nb = NegativeBinomialMeanDisp(F.softmax(out, dim=-1) * library, theta)
        else:
            r = torch.exp(out.clamp(-12, 12)) * (library / self.library_scale)
            nb = NegativeBinomial(r, self.head_p(h))
        return ZeroInflatedNB(nb, self.head_gate(h)) if self.likelihood.startswith("zinb") else nb
