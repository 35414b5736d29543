"""Pseudocell programs: what each latent dimension does to every modality.

Each latent dim is traversed with the others at 0, every point decoded by every decoder (means at
the model's library scale, per 10k counts, averaged over batches when the decoders take one), and
each feature's decoded mean is Spearman-correlated with the traversal value. The features that
rise (direction ``up``) or fall (``down``) most form the dim's multimodal program.

- ``faithful``: the original's 20 points from -5 to +4.5 in steps of 0.5, in raw latent units
  (its "prior SDs" ignore a learned prior's scale).
- ``atlas``: symmetric, -5..+5 standard deviations of the learned prior in each dim.

Over 20 smooth points many features reach |rho| = 1; ties are broken by the effect size, the
range of the decoded mean along the traversal, so the ranking among them is not arbitrary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ..model import MMVAE

MODES = ("atlas", "faithful")
COLUMNS = ["dim", "direction", "modality", "feature", "rho", "p", "effect", "rank"]
TRAVERSAL_COLUMNS = ["dim", "direction", "modality", "feature", "step", "z", "mean"]


def traversal(model: MMVAE, dim: int, *, mode: str = "atlas", n_points: int = 20) -> np.ndarray:
    """The ``n_points`` values taken by latent ``dim`` (latent units)."""
    if mode not in MODES:
        raise ValueError(f"traversal mode must be one of {MODES}, got {mode!r}")
    if mode == "faithful":
        return np.arange(-5.0, 5.0, 0.5)
    sd = float(model.prior().stddev[0, dim].detach())
    return np.linspace(-5.0, 5.0, n_points) * sd


@torch.no_grad()
def decode_traversal(model: MMVAE, dim: int, values: np.ndarray) -> dict[str, np.ndarray]:
    """Modality -> [points, features]: decoded means along the traversal of ``dim``."""
    model.eval()
    device = model.prior_logits.device
    n_batches = max(model.config.n_batches, 1)
    z = torch.zeros(len(values), model.config.latent_dim, device=device)
    z[:, dim] = torch.as_tensor(values, dtype=z.dtype, device=device)
    z_all = z.repeat(n_batches, 1)
    codes = (torch.arange(n_batches, device=device).repeat_interleave(len(values))
             if model.config.n_batches else None)
    return {m: model.decode(z_all, m, None, codes).mean.view(n_batches, len(values), -1).mean(0).float().cpu().numpy()
            for m in model.names}


def spearman(values: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rho, two-sided p) of each column of ``means`` [points, features] against ``values``."""
    n = len(values)
    rx = stats.rankdata(values)
    ry = stats.rankdata(means, axis=0)
    rx = (rx - rx.mean()) / np.linalg.norm(rx - rx.mean())
    ry = ry - ry.mean(0)
    norm = np.linalg.norm(ry, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(norm > 0, rx @ ry / norm, 0.0)
        rho = np.where(np.abs(rho) > 1 - 1e-12, np.sign(rho), rho)  # exact monotone: rho +-1, p 0
        t = rho * np.sqrt((n - 2) / np.maximum(1.0 - rho**2, 1e-300))
    p = 2 * stats.t.sf(np.abs(t), n - 2)
    return rho, p


class Programs(NamedTuple):
    table: pd.DataFrame  # COLUMNS: the top features per (dim, direction, modality)
    traversals: pd.DataFrame  # TRAVERSAL_COLUMNS: their decoded means along the traversal (for heatmaps)


def programs(model: MMVAE, features: Mapping[str, Sequence[str]], *, mode: str = "atlas", top_n: int = 50,
             dims: Sequence[int] | None = None) -> Programs:
    """The top ``top_n`` features per (dim, direction, modality), ranked by rho then effect size, and
    their decoded means along each traversal."""
    for m in model.names:
        if len(features[m]) != model.config.modalities[m].n_features:
            raise ValueError(f"programs: {len(features[m])} feature names for {m}, the model has "
                             f"{model.config.modalities[m].n_features}")
    parts, curves = [], []
    for dim in dims if dims is not None else range(model.config.latent_dim):
        values = traversal(model, dim, mode=mode)
        for m, means in decode_traversal(model, dim, values).items():
            names = np.asarray(features[m], dtype=object)
            rho, p = spearman(values, means)
            effect = means.max(0) - means.min(0)
            for direction, sign in (("up", 1.0), ("down", -1.0)):
                idx = np.flatnonzero(sign * rho > 0)
                order = idx[np.lexsort((-effect[idx], -sign * rho[idx]))][:top_n]
                parts.append(pd.DataFrame({
                    "dim": dim, "direction": direction, "modality": m, "feature": names[order], "rho": rho[order],
                    "p": p[order], "effect": effect[order], "rank": np.arange(1, len(order) + 1)}))
                curves.append(pd.DataFrame({
                    "dim": dim, "direction": direction, "modality": m, "feature": np.repeat(names[order], len(values)),
                    "step": np.tile(np.arange(len(values)), len(order)), "z": np.tile(values, len(order)),
                    "mean": means[:, order].T.ravel()}))
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    curve = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=TRAVERSAL_COLUMNS)
    return Programs(table.astype({"dim": "int32", "rank": "int32", "rho": "float64", "p": "float64",
                                  "effect": "float64"}),
                    curve.astype({"dim": "int32", "step": "int32", "z": "float64", "mean": "float64"}))
