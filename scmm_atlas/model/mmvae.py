"""The MoE-MMVAE (scMM) for any set of modalities, with masks for missing ones.

One encoder and one decoder per modality; the joint posterior is the equal mixture of the experts
a cell has; every expert's sample decodes every modality. ``faithful`` reproduces the original
scMM (encoder input counts / library x 1e4 without log, Laplace posterior with softmax scale);
otherwise atlas mode (log1p of library-normalised counts, free posterior scale). Zero-count cells
never give NaN: their library is taken as 1, so their input is all zeros.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .distributions import Laplace
from .networks import Decoder, Encoder


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

    def __post_init__(self) -> None:
        if len(self.modalities) < 2:
            raise ValueError(f"a MoE-MMVAE needs at least two modalities, got {list(self.modalities)}")
        self.modalities = {k: v if isinstance(v, ModalitySpec) else ModalitySpec(**v)
                           for k, v in self.modalities.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> MMVAEConfig:
        """The inverse of ``dataclasses.asdict`` (how configs travel in checkpoints and model files)."""
        return cls(**data)


@dataclass
class MMVAEOutput:
    """One forward pass: posteriors, samples, and every expert x modality reconstruction."""

    qz: dict[str, Laplace]  # expert -> posterior over the batch (absent rows: placeholders)
    zs: dict[str, torch.Tensor]  # expert -> [K, B, D] samples
    # modality -> its reconstruction from every expert's samples: either one distribution per
    # expert (over [K * B, F]) or a single one over all experts stacked ([M * K * B, F])
    px: dict[str, list[object]]
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

    def full_mask(self, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every cell has every modality (paired data)."""
        return {m: torch.ones(x[m].shape[0], dtype=torch.bool, device=x[m].device) for m in self.names}

    # -- distributions -------------------------------------------------------------------------
    def prior(self) -> Laplace:
        """Laplace(0, softmax(psi) * D): scMM's prior; the scales sum to D."""
        scale = F.softmax(self.prior_logits, dim=-1) * self.config.latent_dim
        return Laplace(torch.zeros_like(scale), scale)

    def encoder_input(self, x: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        normed = x / library.clamp(min=1.0) * self.config.library_scale
        return normed if self.config.faithful else torch.log1p(normed)

    def encode(self, x: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor],
               batch: torch.Tensor | None = None, library: Mapping[str, torch.Tensor] | None = None
               ) -> dict[str, Laplace]:
        """Each expert's posterior. Encoders see only the cells that have their modality."""
        qz = {}
        for m in self.names:
            lib = library[m] if library is not None else x[m].sum(-1, keepdim=True)
            inp = self.encoder_input(x[m], lib)
            if self.config.batch_in_encoder and self.config.n_batches:
                inp = torch.cat([inp, F.one_hot(batch, self.config.n_batches).to(inp.dtype)], dim=-1)
            present = mask[m]
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
        zs = {m: q.rsample((K,)) for m, q in qz.items()}
        rep_batch = batch.repeat(K) if batch is not None else None
        px: dict[str, list[object]] = {}
        for d in self.names:
            lib = library[d].repeat(K, 1)
            if self.config.norm == "batchnorm":
                # BatchNorm statistics per expert, as the original computes them.
                px[d] = [self.decode(zs[e].reshape(K * n, -1), d, lib, rep_batch) for e in self.names]
            else:
                # No cross-cell statistics: one decoder call for all experts' samples.
                z_all = torch.cat([zs[e].reshape(K * n, -1) for e in self.names])
                m = len(self.names)
                b_all = rep_batch.repeat(m) if rep_batch is not None else None
                px[d] = [self.decode(z_all, d, lib.repeat(m, 1), b_all)]
        return MMVAEOutput(qz=qz, zs=zs, px=px, mask=dict(mask), library=library)

    @torch.no_grad()
    def embed(self, x: Mapping[str, torch.Tensor], *, mask: Mapping[str, torch.Tensor] | None = None,
              batch: torch.Tensor | None = None) -> torch.Tensor:
        """Joint embedding: the mean of the locations of the experts each cell has."""
        mask = self.full_mask(x) if mask is None else mask
        return self.joint_location(self.encode(x, mask, batch), mask)

    def joint_location(self, qz: Mapping[str, Laplace], mask: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, D]: the mean of the locations of the experts each cell has."""
        weights = torch.stack([mask[m].to(qz[m].loc.dtype) for m in self.names])  # [M, B]
        locs = torch.stack([qz[m].loc for m in self.names])  # [M, B, D]
        return (weights.unsqueeze(-1) * locs).sum(0) / weights.sum(0).clamp(min=1).unsqueeze(-1)
