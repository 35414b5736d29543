"""Per-cell outputs of a trained model: embeddings and cross-modal predictions.

Predictions are posterior means: the target modality's decoded mean at the source expert's
posterior mean (its location), at a stated library size (per ``library_size`` counts, 10k by
default) — never at the target's observed library, which would leak the answer into a benchmark
and does not exist for cells that lack the target. A cell that lacks a source modality gets no
prediction from it (NaN); a cell that lacks the target gets it predicted from what it has, which
is how an RNA-only dataset gets protein estimates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model import MMVAE

# Targets wider than this are predicted only when asked for: a dense prediction of 4,000 genes is
# 16 KB per cell (more than the cell's counts), costs most of the stage's time and storage, and
# predicting a transcriptome from a protein panel is rarely what a user reads.
DEFAULT_MAX_TARGET_FEATURES = 1000


def default_pairs(modalities: Sequence[str], widths: Mapping[str, int] | None = None, *,
                  max_target_features: int = DEFAULT_MAX_TARGET_FEATURES) -> list[tuple[str, str]]:
    """(source, target): every modality predicted from every other; with ``widths`` (features per
    modality), only into targets of at most ``max_target_features`` features."""
    return [(s, t) for t in modalities for s in modalities
            if s != t and (widths is None or widths[t] <= max_target_features)]


def check_pairs(pairs: Sequence[tuple[str, str]], modalities: Sequence[str]) -> list[tuple[str, str]]:
    for source, target in pairs:
        for m in (source, target):
            if m not in modalities:
                raise ValueError(f"prediction pair {source}->{target}: the model has no modality {m!r} "
                                 f"(it has {list(modalities)})")
        if source == target:
            raise ValueError(f"prediction pair {source}->{target}: a modality is not predicted from itself")
    return list(pairs)


@dataclass
class CellOutputs:
    """One minibatch's results as float32 numpy arrays (rows: the minibatch's cells)."""

    joint: np.ndarray  # [B, D]: mean of the locations of the experts each cell has
    per_modality: dict[str, np.ndarray]  # modality -> [B, D] its expert's location (NaN where absent)
    predictions: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (source, target) -> [B, F_t]


@torch.no_grad()
def infer_batch(model: MMVAE, x: Mapping[str, torch.Tensor], *, mask: Mapping[str, torch.Tensor] | None = None,
                batch: torch.Tensor | None = None, pairs: Sequence[tuple[str, str]] = (),
                library_size: float | None = None) -> CellOutputs:
    """Embeddings and the ``pairs``' predictions for one minibatch (the model in eval mode)."""
    model.eval()
    mask = model.full_mask(x) if mask is None else mask
    qz = model.encode(x, mask, batch)
    joint = model.joint_location(qz, mask)
    absent = {m: ~mask[m].bool() for m in model.names}
    per_mod = {m: _nan_rows(qz[m].loc, absent[m]) for m in model.names}
    library = None if library_size is None else joint.new_full((joint.shape[0], 1), float(library_size))
    preds = {}
    for source, target in pairs:
        mean = model.decode(qz[source].loc, target, library, batch).mean
        preds[(source, target)] = _nan_rows(mean, absent[source])
    return CellOutputs(joint=joint.float().cpu().numpy(), per_modality=per_mod, predictions=preds)


def _nan_rows(t: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
    out = t.float().cpu().numpy()  # a fresh tensor of this call: no copy needed
    out[rows.cpu().numpy()] = np.nan
    return out
