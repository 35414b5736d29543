"""The MoE-MMVAE (scMM) for any set of modalities, with masks for missing ones.

One encoder and one decoder per modality. The joint posterior is a mixture of components, each a
product of experts (``joint``): ``moe`` (scMM): the equal mixture of the experts a cell has;
``poe``: the product of a cell's experts (one component, MVAE); ``mopoe``: the mixture of the
products of every subset of the modalities (Sutter et al. 2021), singletons included. Every
component's sample decodes every modality. Laplace experts have no closed-form product: a product
is the Laplace with the precision-weighted mean of the experts' locations and the variance of the
product of Gaussians of the experts' variances (exact for Gaussians; no prior expert).

``faithful`` reproduces the original scMM (encoder input counts / library x 1e4 without log,
Laplace posterior with softmax scale); otherwise atlas mode (log1p of library-normalised counts,
free posterior scale). Zero-count cells never give NaN: their library is taken as 1, so their
input is all zeros. The embedding (``embedding``) is the joint posterior's mean (``mean``: the
mean of the locations of the components a cell has) or the experts' locations side by side
(``concat``; an absent expert's block holds the joint mean).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn

from .distributions import Laplace
from .networks import Decoder, Encoder

JOINTS = ("moe", "poe", "mopoe")
EMBEDDINGS = ("mean", "concat")


@dataclass
class ModalitySpec:
    n_features: int
    likelihood: str = "nb_disp"  # see networks.LIKELIHOODS
    hidden: int = 256
    n_layers: int = 2


@dataclass
class MMVAEConfig:
    modalities: dict[str, ModalitySpec]
    latent_dim: int = 20
    faithful: bool = False
    norm: str = "batchnorm"
    dropout: float = 0.0
    learn_prior: bool = True
    n_batches: int = 0  # batch/donor covariate (one-hot) into decoders when > 0
    batch_in_encoder: bool = False
    library_scale: float = 1e4
    joint: str = "moe"  # moe | poe | mopoe (module doc)
    embedding: str = "mean"  # mean | concat

    def __post_init__(self) -> None:
        if len(self.modalities) < 2:
            raise ValueError(f"a MoE-MMVAE needs at least two modalities, got {list(self.modalities)}")
        if self.joint not in JOINTS:
            raise ValueError(f"model.joint must be one of {JOINTS}, got {self.joint!r}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"model.embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        self.modalities = {k: v if isinstance(v, ModalitySpec) else ModalitySpec(**v)
                           for k, v in self.modalities.items()}

    @property
    def embedding_dim(self) -> int:
        """Width of the joint embedding."""
        return self.latent_dim * (len(self.modalities) if self.embedding == "concat" else 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> MMVAEConfig:
        """The inverse of ``dataclasses.asdict`` (how configs travel in checkpoints and model files)."""
        return cls(**data)


@dataclass
class MMVAEOutput:
    """One forward pass: posteriors, samples, and every component x modality reconstruction."""

    qz: dict[str, Laplace]  # expert -> posterior over the batch (absent rows: placeholders)
    qc: list[Laplace]  # the joint posterior's components (for moe: the experts, in order)
    present: torch.Tensor  # [C, B] float: 1 where a cell has the component
    zs: list[torch.Tensor]  # per component, [K, B, D] samples
    # modality -> its reconstruction from every component's samples, stacked: rows [C * K * B, F]
    px: dict[str, object]
    mask: dict[str, torch.Tensor]  # modality -> [B] bool presence
    library: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> [B, 1]


class MMVAE(nn.Module):
    def __init__(self, config: MMVAEConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.names = list(cfg.modalities)
        enc_batches = cfg.n_batches if cfg.batch_in_encoder else 0
        self.encoders = nn.ModuleDict({
            m: Encoder(s.n_features + enc_batches, cfg.latent_dim, s.hidden, s.n_layers, norm=cfg.norm,
                       dropout=cfg.dropout, softmax_scale=cfg.faithful)
            for m, s in cfg.modalities.items()})
        self.decoders = nn.ModuleDict({
            m: Decoder(cfg.latent_dim, s.n_features, s.hidden, s.n_layers, likelihood=s.likelihood, norm=cfg.norm,
                       dropout=cfg.dropout, n_batches=cfg.n_batches, library_scale=cfg.library_scale)
            for m, s in cfg.modalities.items()})
        self.prior_logits = nn.Parameter(torch.zeros(1, cfg.latent_dim), requires_grad=cfg.learn_prior)
        names = tuple(self.names)
        self.components: list[tuple[str, ...]] = (
            [(m,) for m in names] if cfg.joint == "moe" else [names] if cfg.joint == "poe"
            else [c for r in range(1, len(names) + 1) for c in combinations(names, r)])


    def full_mask(self, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every cell has every modality (paired data)."""
        return {m: torch.ones(x[m].shape[0], dtype=torch.bool, device=x[m].device) for m in self.names}

    # -- distributions -------------------------------------------------------------------------
    def prior(self) -> Laplace:
        """Laplace(0, softmax(psi) * D): scMM's prior; the scales sum to D."""
        scale = F.softmax(self.prior_logits, dim=-1) * self.config.latent_dim
        return Laplace(torch.zeros_like(scale), scale)

    def encoder_input(self, x: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """Library-normalised counts (log1p in atlas mode); a sparse CSR ``x`` stays sparse (both maps keep 0 at 0)."""
        if x.layout == torch.sparse_csr:
            values = x.values() * (self.config.library_scale / library.clamp(min=1.0)).squeeze(-1)[_csr_rows(x)]
            values = values if self.config.faithful else torch.log1p(values)
            return torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), values, x.shape, check_invariants=False)
        normed = x / library.clamp(min=1.0) * self.config.library_scale
        return normed if self.config.faithful else torch.log1p(normed)

    def encode(self, x: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor],
               batch: torch.Tensor | None = None, library: Mapping[str, torch.Tensor] | None = None
               ) -> dict[str, Laplace]:
        """Each expert's posterior. Encoders see only the cells that have their modality.

        ``x`` may hold sparse CSR counts (inference): the encoders' first layers multiply them as
        they are, without a dense copy."""
        qz = {}
        for m in self.names:
            lib = library[m] if library is not None else row_sums(x[m])
            inp = self.encoder_input(x[m], lib)
            present = mask[m]
            if inp.layout == torch.sparse_csr and (self.config.batch_in_encoder or not bool(present.all())):
                inp = inp.to_dense()
            if self.config.batch_in_encoder and self.config.n_batches:
                inp = torch.cat([inp, F.one_hot(batch, self.config.n_batches).to(inp.dtype)], dim=-1)
            if bool(present.all()):
                qz[m] = self.encoders[m](inp)
                continue
            idx = present.nonzero().squeeze(-1)
            sub = self.encoders[m](inp.index_select(0, idx))
            loc = inp.new_zeros(inp.shape[0], self.config.latent_dim).index_copy(0, idx, sub.loc)
            scale = inp.new_ones(inp.shape[0], self.config.latent_dim).index_copy(0, idx, sub.scale)
            qz[m] = Laplace(loc, scale)
        return qz

    def decode(self, z: torch.Tensor, modality: str, library: torch.Tensor | None = None,
               batch: torch.Tensor | None = None) -> object:
        """p(x_modality | z) for ``z`` [N, D] at ``library`` [N, 1] (None: per ``library_scale``)."""
        return self.decoders[modality](z, library, batch)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Mapping[str, torch.Tensor], *, mask: Mapping[str, torch.Tensor] | None = None,
                batch: torch.Tensor | None = None, K: int = 1) -> MMVAEOutput:
        n = next(iter(x.values())).shape[0]
        mask = self.full_mask(x) if mask is None else mask
        library = {m: x[m].sum(-1, keepdim=True) for m in self.names}
        qz = self.encode(x, mask, batch, library)
        qc, present = self.joint_components(qz, mask)
        zs = [q.rsample((K,)) for q in qc]
        rep_batch = batch.repeat(K) if batch is not None else None
        px: dict[str, object] = {}
        c = len(zs)
        b_all = rep_batch.repeat(c) if rep_batch is not None else None
        for d in self.names:
            lib = library[d].repeat(K * c, 1)
            dec = self.decoders[d]
            if self.config.norm == "batchnorm":
                # BatchNorm statistics per component, as the original computes them per expert; the
                # heads (the widest layers) run once over every component's rows.
                h = torch.cat([dec.hidden(z.reshape(K * n, -1), rep_batch) for z in zs])
            else:  # no cross-cell statistics: one body call for all components' samples
                h = dec.hidden(torch.cat([z.reshape(K * n, -1) for z in zs]), b_all)
            px[d] = dec.heads(h, lib, b_all)
        return MMVAEOutput(qz=qz, qc=qc, present=present, zs=zs, px=px, mask=dict(mask), library=library)

    def joint_components(self, qz: Mapping[str, Laplace], mask: Mapping[str, torch.Tensor]
                         ) -> tuple[list[Laplace], torch.Tensor]:
        """The joint posterior's components and their [C, B] float presence (module doc).

        A component is present where the cell has all its experts; ``poe``'s single product is
        taken over the experts a cell has, so it is present where the cell has any.
        """
        qc, present = [], []
        for comp in self.components:
            have = torch.stack([mask[m] for m in comp]).to(qz[comp[0]].loc.dtype)  # [|c|, B]
            qc.append(qz[comp[0]] if len(comp) == 1 else product_of_experts([qz[m] for m in comp], have))
            present.append(have.amax(0) if self.config.joint == "poe" else have.amin(0))
        return qc, torch.stack(present)

    @torch.no_grad()
    def embed(self, x: Mapping[str, torch.Tensor], *, mask: Mapping[str, torch.Tensor] | None = None,
              batch: torch.Tensor | None = None) -> torch.Tensor:
        """Joint embedding [B, config.embedding_dim] (module doc)."""
        mask = self.full_mask(x) if mask is None else mask
        return self.joint_location(self.encode(x, mask, batch), mask)

    def joint_location(self, qz: Mapping[str, Laplace], mask: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, config.embedding_dim]: the joint posterior's mean, or the experts' locations side by side."""
        qc, present = self.joint_components(qz, mask)
        mean = _weighted_mean(torch.stack([q.loc for q in qc]), present)
        if self.config.embedding == "mean":
            return mean
        return torch.cat([torch.where(mask[m].unsqueeze(-1), qz[m].loc, mean) for m in self.names], dim=-1)


def _csr_rows(x: torch.Tensor) -> torch.Tensor:
    """The row of each stored value of a sparse CSR tensor."""
    crow = x.crow_indices()
    return torch.repeat_interleave(torch.arange(len(crow) - 1, device=crow.device), crow.diff())


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """[N, 1] per-cell totals of dense or sparse CSR counts."""
    if x.layout == torch.sparse_csr:
        return x.values().new_zeros(x.shape[0]).index_add_(0, _csr_rows(x), x.values()).unsqueeze(-1)
    return x.sum(-1, keepdim=True)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, D]: the mean over the first axis of ``values`` [N, B, D] with ``weights`` [N, B] (0/1)."""
    return (weights.unsqueeze(-1) * values).sum(0) / weights.sum(0).clamp(min=1).unsqueeze(-1)


def product_of_experts(experts: list[Laplace], have: torch.Tensor) -> Laplace:
    """The product of the Laplace experts a cell has (``have`` [E, B] 0/1), as a Laplace (module doc):
    precision 1 / (2 b^2) per expert, the precision-weighted mean of the locations, the summed
    precision's variance. Cells with none of the experts get the first expert's placeholder."""
    prec = torch.stack([1 / (2 * q.scale.square()) for q in experts]) * have.unsqueeze(-1)  # [E, B, D]
    total = prec.sum(0)
    loc = (prec * torch.stack([q.loc for q in experts])).sum(0) / total.clamp(min=1e-12)
    scale = torch.sqrt(1 / (2 * total.clamp(min=1e-12)))
    none = (have.sum(0) == 0).unsqueeze(-1)
    return Laplace(torch.where(none, experts[0].loc, loc), torch.where(none, experts[0].scale, scale))
