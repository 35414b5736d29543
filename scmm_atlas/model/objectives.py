"""Objectives for the MMVAE: the stratified mixture ELBO with beta warm-up (scMM's MoE ELBO; for
``poe`` and ``mopoe`` the same average over the joint posterior's components), and, for the MoE
posterior, the importance-weighted bound (IWAE) and its doubly-reparameterised gradient (DReG)
with K samples per expert (after Shi et al., 2019). Every objective takes ``beta``, the KL's
weight; the importance-weighted bounds have no separate KL term and accept only 1.

Missing modalities: a cell's mixture holds only the components it has, it reconstructs only what
was observed, and its objective is normalised by its own number of components. Every function
returns the loss to minimise: minus the objective, summed over the cells of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .distributions import Counts, kl_laplace
from .mmvae import MMVAE, MMVAEOutput


@dataclass
class Objective:
    loss: torch.Tensor  # scalar: -sum over cells of the objective
    # detached 0-dim tensors, not floats: reading them would wait for the device at every step
    recon: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> sum over cells (mean over experts)
    kl: torch.Tensor | None = None  # sum over cells of the experts' mean KL (the ELBO's only)


def _masks(model: MMVAE, x: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """[M, B] float presence (1 where a cell has the modality)."""
    mask = model.full_mask(x) if mask is None else mask
    return torch.stack([mask[m].float() for m in model.names])


def log_likelihoods(model: MMVAE, out: MMVAEOutput, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Modality -> [C, K, B]: log p(x_d | z) summed over features, for every component's samples.

    The data-only term sum_f lgamma(x + 1) is computed once per cell and modality.
    """
    m = len(out.zs)
    k = out.zs[0].shape[0]
    out_lp = {}
    for d in model.names:
        counts = Counts.from_dense(x[d])
        n = counts.shape[0]
        lp = out.px[d].log_prob_rows(counts.repeat(m * k)).view(m, k, n)
        if not model.config.modalities[d].likelihood.startswith("bernoulli"):
            lp = lp - counts.lgamma_rows()
        out_lp[d] = lp
    return out_lp


def moe_elbo(model: MMVAE, x: Mapping[str, torch.Tensor], *, mask: Mapping[str, torch.Tensor] | None = None,
             batch: torch.Tensor | None = None, beta: float = 1.0, K: int = 1) -> Objective:
    """(1/C_c) sum_c [ sum_d log p(x_d | z_c) - beta KL(q_c(z|x) || p(z)) ], z_c ~ q_c(z|x), over the
    components c a cell has (for ``moe`` the experts: scMM's objective)."""
    out = model(x, mask=mask, batch=batch, K=K)
    observed = _masks(model, x, mask)  # [M, B]
    present = out.present  # [C, B]
    lpx = log_likelihoods(model, out, x)
    prior = model.prior()
    kl = torch.stack([kl_laplace(q, prior).sum(-1) for q in out.qc])  # [C, B]
    recon_d = {d: lp.mean(1) * observed[i] for i, (d, lp) in enumerate(lpx.items())}  # [C, B] each
    recon = torch.stack(list(recon_d.values())).sum(0)  # [C, B]
    n_comp = present.sum(0).clamp(min=1)
    per_cell = (present * (recon - beta * kl)).sum(0) / n_comp
    with torch.no_grad():
        parts = {d: ((present * r).sum(0) / n_comp).sum() for d, r in recon_d.items()}
        kl_sum = ((present * kl).sum(0) / n_comp).sum()
    return Objective(loss=-per_cell.sum(), recon=parts, kl=kl_sum)


def _log_weights(model: MMVAE, out: MMVAEOutput, x: Mapping[str, torch.Tensor], present: torch.Tensor,
                 detach_q: bool) -> torch.Tensor:
    """[M, K, B] log importance weights log p(x, z) - log q_mix(z | x) of every expert's samples;
    -inf for experts a cell lacks. q_mix is the equal mixture of the cell's own experts."""
    if model.config.joint != "moe":
        raise ValueError(f"the iwae and dreg objectives need model.joint=moe (got {model.config.joint!r}); "
                         "use train.objective=elbo")
    prior = model.prior()
    lpx = log_likelihoods(model, out, x)
    qs = [q.detach() if detach_q else q for q in out.qc]
    log_present = torch.log(present)  # 0 or -inf, [M, B]
    lws = []
    for i in range(len(model.names)):
        z = out.zs[i]  # [K, B, D]
        lpz = prior.log_prob(z).sum(-1)
        lq_each = torch.stack([q.log_prob(z).sum(-1) for q in qs])  # [M, K, B]
        lq_mix = torch.logsumexp(lq_each + log_present.unsqueeze(1), 0) - torch.log(present.sum(0))
        lpx_e = sum(lpx[d][i] * present[j] for j, d in enumerate(model.names))
        lws.append(lpz + lpx_e - lq_mix)
    lw = torch.stack(lws)  # [M, K, B]
    return torch.where(present.unsqueeze(1) > 0, lw, torch.full_like(lw, -math.inf))


def _check_beta(name: str, beta: float) -> None:
    if beta != 1.0:
        raise ValueError(f"the {name} objective has no KL term to weigh: beta must be 1, got {beta} "
                         "(use train.objective=elbo for a KL warm-up)")


def _pooled_bound(lw: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[B]: log (1 / (M_c K)) sum over the cell's experts and samples of the weights."""
    k = lw.shape[1]
    flat = lw.transpose(0, 1).reshape(-1, lw.shape[-1])  # [M * K, B]
    return torch.logsumexp(flat, 0) - torch.log(present.sum(0) * k)


def moe_iwae(model: MMVAE, x: Mapping[str, torch.Tensor], *, mask: Mapping[str, torch.Tensor] | None = None,
             batch: torch.Tensor | None = None, beta: float = 1.0, K: int = 10) -> Objective:
    """The importance-weighted bound with K samples per expert, pooled over the mixture."""
    _check_beta("iwae", beta)
    out = model(x, mask=mask, batch=batch, K=K)
    present = _masks(model, x, mask)
    bound = _pooled_bound(_log_weights(model, out, x, present, detach_q=False), present)
    return Objective(loss=-bound.sum())


def moe_dreg(model: MMVAE, x: Mapping[str, torch.Tensor], *, mask: Mapping[str, torch.Tensor] | None = None,
             batch: torch.Tensor | None = None, beta: float = 1.0, K: int = 10) -> Objective:
    """IWAE with the doubly-reparameterised encoder gradient (Tucker et al. 2018; MMVAE's m_dreg).

    The encoder receives gradient only through the samples, weighted by the squared normalised
    weights; the decoder and prior get IWAE's gradient. The returned loss is a surrogate: its
    gradient is DReG's, its value is not the bound (use :func:`moe_iwae` to report the bound).
    """
    _check_beta("dreg", beta)
    out = model(x, mask=mask, batch=batch, K=K)
    present = _masks(model, x, mask)
    lw = _log_weights(model, out, x, present, detach_q=True)
    with torch.no_grad():
        k = lw.shape[1]
        flat = lw.transpose(0, 1).reshape(-1, lw.shape[-1])
        wt = (flat - torch.logsumexp(flat, 0, keepdim=True)).exp().reshape(k, -1, lw.shape[-1]).transpose(0, 1)
    for i, z in enumerate(out.zs):
        if z.requires_grad:
            z.register_hook(lambda g, w=wt[i]: g * w.unsqueeze(-1))
    surrogate = torch.where(present.unsqueeze(1) > 0, wt * lw, torch.zeros_like(lw)).sum()
    return Objective(loss=-surrogate)


OBJECTIVES = {"elbo": moe_elbo, "iwae": moe_iwae, "dreg": moe_dreg}
