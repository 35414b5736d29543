"""``scmm-atlas bench step``: one training step (forward + backward + optimizer) in isolation.

Atlas mode at totalVI's widths (2 x 256 hidden, latent 20, batch 256 cells x (4,000 genes + 100
proteins)), reported as cells/s and achieved model GFLOP/s against this machine's fp32 matmul
peak measured in the same run; and faithful mode at the original's tutorial settings (config A:
batch 32, 5,000 genes + 25 proteins, widths 100/20, latent 10), where the original ran 829 cells/s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from ..memory import keep_freed_buffers
from ..model import MMVAE, MMVAEConfig, moe_elbo
from ..model.training import adam
from . import format_table, vector_isa

# the original's config A speed per CPU type (shared/reference/faithful/README.md)
ORIGINAL_A_CELLS_PER_S = {"AVX-512": 829, "AVX2": 559}


def matmul_peak_gflops(n: int = 2048, seconds: float = 3.0) -> float:
    """Best fp32 GFLOP/s of an n x n x n matmul on this machine and thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def model_flops_per_step(model: MMVAE, batch: int, K: int = 1) -> float:
    """Linear-layer FLOPs of one step: forward 2*rows*in*out per layer, backward twice that."""
    m = len(model.names)
    total = 0.0
    for name in model.names:
        for mod, rows in ((model.encoders[name], batch), (model.decoders[name], m * K * batch)):
            for layer in mod.modules():
                if isinstance(layer, nn.Linear):
                    total += 3 * 2 * rows * layer.in_features * layer.out_features
    return total


def synthetic_batch(n: int, genes: int, proteins: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """CITE-like counts: RNA ~10 % nonzero, proteins dense."""
    rng = np.random.default_rng(seed)
    rna = rng.poisson(rng.lognormal(-2.5, 1.2, genes)[None, :] * rng.lognormal(0, 0.4, (n, 1)) * 1.5)
    adt = rng.negative_binomial(3, 3 / (3 + rng.lognormal(4, 1, proteins)[None, :]), (n, proteins))
    return {"RNA": torch.tensor(rna, dtype=torch.float32), "ADT": torch.tensor(adt, dtype=torch.float32)}


def time_steps(model: MMVAE, x: dict[str, torch.Tensor], *, seconds: float, lr: float = 1e-3) -> float:
    """Steady-state seconds per step (median over timed steps after a warm-up)."""
    opt = adam(list(model.parameters()), lr=lr)
    model.train()

    def step() -> None:
        loss = moe_elbo(model, x, beta=1.0).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 10:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def atlas_model(genes: int = 4000, proteins: int = 100) -> MMVAE:
    return MMVAE(MMVAEConfig(
        modalities={"RNA": {"n_features": genes, "likelihood": "nb_disp", "hidden": 256, "n_layers": 2},
                    "ADT": {"n_features": proteins, "likelihood": "nb_disp", "hidden": 256, "n_layers": 2}},
        latent_dim=20, norm="layernorm"))


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    keep_freed_buffers()
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak: {peak:,.1f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)
    model = atlas_model()
    x = synthetic_batch(256, 4000, 100)
    sec = time_steps(model, x, seconds=10)
    gflops = model_flops_per_step(model, 256) / sec / 1e9
    atlas = {"system": "scmm-atlas", "cells_per_s": 256 / sec, "gflops": gflops, "pct_peak": 100 * gflops / peak,
             "peak_gflops": peak, "step_ms": 1e3 * sec}
    from .faithful import faithful_config

    faithful = MMVAE(faithful_config(5000, 25, 10, 100, 20))
    sec_a = time_steps(faithful, synthetic_batch(32, 5000, 25, seed=1), seconds=10, lr=1e-4)
    isa = vector_isa()
    original = ORIGINAL_A_CELLS_PER_S.get(isa)
    row_a = {"system": "scmm-atlas faithful", "config": "A", "cells_per_s": 32 / sec_a, "step_ms": 1e3 * sec_a,
             "vs_original": 32 / sec_a / original if original else None}
    rows = [atlas, row_a]
    print(format_table(rows, ["system", "config", "cells_per_s", "step_ms", "gflops", "pct_peak", "vs_original"]))
    print(f"\ntarget: atlas step >= 40 % of matmul peak: {atlas['pct_peak']:.1f} % "
          f"({'met' if atlas['pct_peak'] >= 40 else 'MISSED'})")
    if original is None:
        print(f"faithful config A: no reference speed of the original on a {isa} CPU "
              f"(only {sorted(ORIGINAL_A_CELLS_PER_S)})")
    else:
        print(f"target: faithful config A >= 3x the original's {original} cells/s on {isa}: "
              f"{row_a['vs_original']:.2f}x ({'met' if row_a['vs_original'] >= 3 else 'MISSED'})")
    return rows
