"""The lean step computes the same objective: fused likelihood kernels and stacked decoding against
the plain formulas (elementwise log pmf of each component's own decoder call), values and gradients."""

from __future__ import annotations

import pytest
import torch

from scmm_atlas.model import MMVAE, MMVAEConfig, fused, moe_elbo
from scmm_atlas.model.distributions import Counts, NegativeBinomial, NegativeBinomialMeanDisp, kl_laplace

CHUNKS = [1 << 17, 64]  # one chunk; many chunks, with cells split across chunk edges


def _counts(n: int, f: int, seed: int, *, empty_cell: bool = True) -> torch.Tensor:
    """Counts with an empty cell (scMM's NB total count is 0 there: its plain pmf is NaN, ours is not)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, f, generator=g, dtype=torch.float64) * 3, generator=g)
    if empty_cell:
        x[1] = 0
    else:
        x[:, 0] += 1
    return x


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("per_row_theta", [False, True])
def test_nb_softmax_kernel_equals_unfused(monkeypatch: pytest.MonkeyPatch, chunk: int, per_row_theta: bool) -> None:
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    x = _counts(8, 50, 1)
    h = (torch.randn(24, 50, dtype=torch.float64) * 4).requires_grad_()
    log_theta = torch.randn(*((24, 50) if per_row_theta else (50,)), dtype=torch.float64, requires_grad=True)
    lib = x.sum(-1, keepdim=True).repeat(3, 1)
    c = Counts.from_dense(x).repeat(3)
    w = torch.randn(24, dtype=torch.float64)
    fast = NegativeBinomialMeanDisp.from_logits(h, lib, log_theta.exp()).log_prob_rows(c)
    plain = NegativeBinomialMeanDisp(torch.softmax(h, -1) * lib, log_theta.exp()).log_prob(
        c.x, torch.zeros_like(c.x)).sum(-1)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-9)
    for a, b in zip(torch.autograd.grad((fast * w).sum(), [h, log_theta]),
                    torch.autograd.grad((plain * w).sum(), [h, log_theta]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_nb_heads_kernel_equals_unfused_with_clamps(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    x = _counts(8, 50, 2, empty_cell=False)
    a = (torch.randn(24, 50, dtype=torch.float64) * 8).requires_grad_()
    b = (torch.randn(24, 50, dtype=torch.float64) * 8).requires_grad_()
    with torch.no_grad():
        a[0, :5], b[2, :5] = 13.0, -30.0  # beyond scMM's clamps: no gradient there
    lib_scaled = (x.sum(-1, keepdim=True) / 1e4).repeat(3, 1)
    c = Counts.from_dense(x).repeat(3)
    w = torch.randn(24, dtype=torch.float64)
    fast = NegativeBinomial.from_heads(a, b, lib_scaled).log_prob_rows(c)
    plain = NegativeBinomial(torch.exp(a.clamp(-12, 12)) * lib_scaled, b).log_prob(c.x, torch.zeros_like(c.x)).sum(-1)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-9)
    grads = torch.autograd.grad((fast * w).sum(), [a, b])
    for g_fast, g_plain in zip(grads, torch.autograd.grad((plain * w).sum(), [a, b]), strict=True):
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-9, atol=1e-9)
    assert (grads[0][0, :5] == 0).all() and (grads[1][2, :5] == 0).all()


def _plain_elbo(model: MMVAE, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor], batch: torch.Tensor | None,
                beta: float) -> torch.Tensor:
    """scMM's stratified MoE ELBO written out: each expert's sample decoded by its own decoder call,
    the elementwise log pmf summed over features; cells average over the experts they have."""
    library = {m: x[m].sum(-1, keepdim=True) for m in model.names}
    qz = model.encode(x, mask, batch, library)
    prior = model.prior()
    per_expert = []
    for e in model.names:
        z = qz[e].rsample((1,))[0]
        recon = sum(mask[d].double() * model.decode(z, d, library[d], batch).log_prob(x[d]).sum(-1)
                    for d in model.names)
        per_expert.append(mask[e].double() * (recon - beta * kl_laplace(qz[e], prior).sum(-1)))
    n_experts = torch.stack([mask[m].double() for m in model.names]).sum(0)
    return -(torch.stack(per_expert).sum(0) / n_experts).sum()


@pytest.mark.parametrize("setting", ["faithful", "atlas", "atlas_batches_zinb"])
def test_loss_and_gradients_equal_the_plain_objective(setting: str) -> None:
    """The optimised step (stacked decoding, heads once over all experts under BatchNorm, fused
    kernels, lgamma terms once per cell) against the objective written plainly, in float64."""
    torch.manual_seed(0)
    faithful = setting == "faithful"
    rna_lik = "nb" if faithful else "zinb_disp" if "zinb" in setting else "nb_disp"
    mods = {"RNA": {"n_features": 60, "likelihood": rna_lik, "hidden": 16},
            "ADT": {"n_features": 7, "likelihood": "nb" if faithful else "nb_disp", "hidden": 8}}
    n_batches = 3 if "batches" in setting else 0
    model = MMVAE(MMVAEConfig(modalities=mods, latent_dim=4, faithful=faithful,
                              norm="batchnorm" if faithful else "layernorm", n_batches=n_batches)).double()
    x = {"RNA": _counts(24, 60, 3, empty_cell=not faithful), "ADT": _counts(24, 7, 4, empty_cell=False) * 10}
    mask = {"RNA": torch.ones(24, dtype=torch.bool), "ADT": torch.arange(24) >= 4}  # 4 cells without ADT
    batch = torch.arange(24) % 3 if n_batches else None
    params = [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(7)
    fast = moe_elbo(model, x, mask=mask, batch=batch, beta=0.7).loss
    g_fast = torch.autograd.grad(fast, params, allow_unused=True)
    torch.manual_seed(7)
    plain = _plain_elbo(model, x, mask, batch, beta=0.7)
    g_plain = torch.autograd.grad(plain, params, allow_unused=True)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-8)
    for p, a, b in zip(params, g_fast, g_plain, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=lambda m, p=p: f"{tuple(p.shape)}: {m}")


@pytest.mark.parametrize("faithful", [True, False])
def test_kernels_under_bf16_autocast(faithful: bool) -> None:
    """Under bf16 autocast (the GPU option) decoder outputs arrive in bf16: the kernels compute in
    float32 and the loss and gradients stay close to float32's."""
    torch.manual_seed(0)
    lik = "nb" if faithful else "nb_disp"
    mods = {"RNA": {"n_features": 60, "likelihood": lik, "hidden": 16}, "ADT": {"n_features": 7, "likelihood": lik,
                                                                               "hidden": 8}}
    model = MMVAE(MMVAEConfig(modalities=mods, latent_dim=4, faithful=faithful, norm="layernorm"))
    x = {"RNA": _counts(24, 60, 3, empty_cell=False).float(), "ADT": _counts(24, 7, 4, empty_cell=False).float() * 10}
    torch.manual_seed(1)
    ref = moe_elbo(model, x).loss
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = moe_elbo(model, x).loss
    low.backward()
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert abs(float(low) - float(ref)) < 0.02 * abs(float(ref))
    assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
               for p in model.parameters())
