"""Hand-fused log-likelihoods of the widest tensors of a step, as autograd functions.

Autograd evaluates the NB log-likelihood of a decoder's [rows, features] output as a chain of ~25
elementwise kernels, each writing a fresh [rows, features] buffer: at atlas widths every buffer is
larger than the CPU's caches, so the chain ran at memory speed (with page faults on every fresh
buffer) and cost more than the matmuls. These functions walk the rows in cache-sized chunks, keep
only their inputs for the backward pass (recomputing the rest chunk by chunk) and write the
gradients directly (derivations in the docstrings). ``tests/test_fused.py`` compares values and
gradients with the unfused distributions.
"""

from __future__ import annotations

import contextlib

import torch

CHUNK_ELEMENTS = 1 << 17  # 512 KiB of float32 per intermediate: stays in a core's L2 cache


def _chunks(n_rows: int, n_cols: int, nz: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first nonzero, end nonzero) of each chunk; ``nz`` flat and ascending.
    One chunk off the CPU: a GPU has no such cache to fit, and locating the chunks would wait for it."""
    if nz.device.type != "cpu":
        return [(0, n_rows, 0, len(nz))]
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    starts = list(range(0, n_rows, step))
    bounds = torch.searchsorted(nz, torch.tensor([*starts, n_rows], device=nz.device) * n_cols).tolist()
    return [(r0, min(r0 + step, n_rows), bounds[i], bounds[i + 1]) for i, r0 in enumerate(starts)]


def float32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off around a kernel, whose inputs the caller casts to float32 (under bf16 autocast a
    decoder's output arrives in bf16; autograd casts the gradients back)."""
    return torch.autocast(device.type, enabled=False) if torch.is_autocast_enabled(device.type) \
        else contextlib.nullcontext()


def wide(t: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 as float32; other dtypes as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class NBSoftmaxRows(torch.autograd.Function):
    """Per-row sum over features of the NB log pmf without its data-only and theta-only terms.

    With mean mu = softmax(h) * lib and inverse dispersion theta (``[F]`` or ``[R, F]``):

        out_r = sum_f -theta log(t) + sum_{f: x > 0} x (log(mu + eps) - log(t)),  t = theta + mu + eps

    The NB log pmf is this plus sum_f theta log(theta + eps) and, at the nonzeros,
    lgamma(x + theta) - lgamma(theta) - lgamma(x + 1), which do not depend on ``h`` (callers add
    them, with autograd). Gradients, with G = mu * d out / d mu:

        G = -theta mu / t  (+ x mu (1 / (mu + eps) - 1 / t) at the nonzeros)
        d out / d h = G - softmax(h) * sum_f G
        d out / d theta = -log t - theta / t  (- x / t at the nonzeros)

    ``nz``/``values``: flat index (ascending) and count of each nonzero of the [R, F] counts.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, lib: torch.Tensor, theta: torch.Tensor, nz: torch.Tensor,
                values: torch.Tensor, eps: float) -> torch.Tensor:
        n_rows, n_cols = h.shape
        chunks = _chunks(n_rows, n_cols, nz)
        out = h.new_empty(n_rows)
        for r0, r1, a, b in chunks:
            th = theta if theta.dim() == 1 else theta[r0:r1]
            mu = torch.softmax(h[r0:r1], dim=-1).mul_(lib[r0:r1])
            idx = nz[a:b] - r0 * n_cols
            mu_nz = mu.view(-1)[idx]
            log_t = mu.add_(th).add_(eps).log_()  # mu's buffer: t, then log t
            o = out[r0:r1]
            if th.dim() == 1:
                torch.mv(log_t, th, out=o)
            else:
                torch.sum(log_t * th, dim=-1, out=o)
            o.neg_().index_add_(0, torch.div(idx, n_cols, rounding_mode="floor"),
                                values[a:b] * (torch.log(mu_nz + eps) - log_t.view(-1)[idx]))
        ctx.save_for_backward(h, lib, theta, nz, values)
        ctx.eps, ctx.chunks = eps, chunks
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, lib, theta, nz, values = ctx.saved_tensors
        n_cols, eps = h.shape[1], ctx.eps
        grad_h = torch.empty_like(h)
        need_theta = ctx.needs_input_grad[2]
        grad_theta = torch.zeros_like(theta) if need_theta else None
        for r0, r1, a, b in ctx.chunks:
            th = theta if theta.dim() == 1 else theta[r0:r1]
            g = grad[r0:r1].unsqueeze(-1)
            idx, x = nz[a:b] - r0 * n_cols, values[a:b]
            s = torch.softmax(h[r0:r1], dim=-1)
            mu = torch.mul(s, lib[r0:r1])
            mu_nz = mu.view(-1)[idx]
            t = torch.add(mu, th).add_(eps)
            t_nz = t.view(-1)[idx]
            q = torch.div(th, t)  # theta / t
            if need_theta:
                d = torch.log(t).add_(q)
                d.view(-1).index_add_(0, idx, x / t_nz)
                d.mul_(g)
                if theta.dim() == 1:
                    grad_theta.sub_(d.sum(0))
                else:
                    grad_theta[r0:r1] = d.neg_()
            # G = -theta mu / t, plus the nonzeros' x mu (1 / (mu + eps) - 1 / t)
            big_g = mu.mul_(q).neg_()
            big_g.view(-1).index_add_(0, idx, x * mu_nz * (1 / (mu_nz + eps) - 1 / t_nz))
            torch.mul(big_g.addcmul_(s, big_g.sum(-1, keepdim=True), value=-1), g, out=grad_h[r0:r1])
        return grad_h, None, grad_theta, None, None, None


class NBLogitsRows(torch.autograd.Function):
    """scMM's NB (``distributions.NegativeBinomial``) per row, without lgamma(x + 1), from the
    decoder's two heads: total count r = exp(clamp(a, +-12)) * lib_scaled, logits l = clamp(b, +-limit):

        out_r = sum_f r log sigmoid(-l) + sum_{f: x > 0} lgamma(x + r) - lgamma(r) + x log sigmoid(l)

    Gradients (zero where a clamp is active):

        d out / d a = r log sigmoid(-l)  (+ r (digamma(x + r) - digamma(r)) at the nonzeros)
        d out / d b = -r sigmoid(l)  (+ x sigmoid(-l) at the nonzeros)
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, lib_scaled: torch.Tensor, nz: torch.Tensor,
                values: torch.Tensor, r_limit: float, l_limit: float) -> torch.Tensor:
        n_rows, n_cols = a.shape
        chunks = _chunks(n_rows, n_cols, nz)
        out = a.new_empty(n_rows)
        for r0, r1, i0, i1 in chunks:
            r = a[r0:r1].clamp(-r_limit, r_limit).exp_().mul_(lib_scaled[r0:r1])
            lb = b[r0:r1].clamp(-l_limit, l_limit)
            idx, x = nz[i0:i1] - r0 * n_cols, values[i0:i1]
            r_nz, l_nz = r.view(-1)[idx], lb.view(-1)[idx]
            torch.sum(r.mul_(torch.nn.functional.logsigmoid(lb.neg_())), dim=-1, out=out[r0:r1])
            extra = torch.lgamma(x + r_nz).sub_(torch.lgamma(r_nz)).add_(torch.nn.functional.logsigmoid(l_nz).mul_(x))
            out[r0:r1].index_add_(0, torch.div(idx, n_cols, rounding_mode="floor"), extra)
        ctx.save_for_backward(a, b, lib_scaled, nz, values)
        ctx.chunks, ctx.limits = chunks, (r_limit, l_limit)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b, lib_scaled, nz, values = ctx.saved_tensors
        r_limit, l_limit = ctx.limits
        n_cols = a.shape[1]
        grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
        for r0, r1, i0, i1 in ctx.chunks:
            g = grad[r0:r1].unsqueeze(-1)
            idx, x = nz[i0:i1] - r0 * n_cols, values[i0:i1]
            ac, bc = a[r0:r1], b[r0:r1]
            r = ac.clamp(-r_limit, r_limit).exp_().mul_(lib_scaled[r0:r1])
            lb = bc.clamp(-l_limit, l_limit)
            sig = torch.sigmoid(lb)
            r_nz, sig_nz = r.view(-1)[idx], sig.view(-1)[idx]
            da = torch.nn.functional.softplus(lb).mul_(r).neg_()  # r log sigmoid(-l) = -r softplus(l)
            da.view(-1).index_add_(0, idx, r_nz * (torch.digamma(x + r_nz) - torch.digamma(r_nz)))
            db = sig.mul_(r).neg_()
            db.view(-1).index_add_(0, idx, x * (1 - sig_nz))
            torch.mul(da, g, out=grad_a[r0:r1]).masked_fill_(ac.abs() > r_limit, 0)
            torch.mul(db, g, out=grad_b[r0:r1]).masked_fill_(bc.abs() > l_limit, 0)
        return grad_a, grad_b, None, None, None, None, None
