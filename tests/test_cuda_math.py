"""The arithmetic of the CUDA kernels (csrc/hmx_cuda_*.cu), emulated with torch on the CPU.

No GPU here, so the kernels never run in CI. This file emulates their passes in the order and with
the formulas, masks and rounding points of the .cu code (docs/HYPERMIXING.md, "Reassociated
form"):
    forward:  state -> fwd_finalize -> mix
    backward: bwd_prep -> query -> bwd_mid -> key -> bwd_final -> sum of partials
and checks them against autograd of the direct form Y = W2 GELU(W1^T V). It proves the algebra the
kernels implement and measures what their fp16 / bf16 rounding points cost against the backend's
declared tolerances; it proves nothing about the kernels' indexing, tiling or synchronisation
(tests/test_cuda_backend.py does, on a GPU).

Rounding points of the fp16 / bf16 kernels, emulated by `_Rounding`:
- token passes (tensor-core operands in the input type T): z, hid = GELU(U), V m^2 and m dY (exact:
  T inputs times 0/1), the staged C / R, dU; U, the column sums and every accumulator stay fp32;
- finalize passes: every operand as bf16 hi + lo planes (x ~ hi + lo, lo*lo dropped: ~16 bits);
- outputs y, dq, dk, dv rounded to T; weight gradients and P stay fp32.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hmx_kernels.dispatch import get_backend

F64 = torch.float64


def gelu_grad(x):
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


class _Rounding:
    """Rounding of the kernels for input type `half` (None: exact, every value kept)."""

    def __init__(self, half):
        self.half = half

    def tok(self, t):  # a token-pass operand or an output in the input type
        return t if self.half is None else t.to(self.half).to(t.dtype)

    def fin(self, t):  # a finalize operand: bf16 hi + lo planes
        if self.half is None:
            return t
        hi = t.to(torch.bfloat16).to(t.dtype)
        return hi + (t - hi).to(torch.bfloat16).to(t.dtype)


def _heads(x, H):  # [B, L, d] -> [B, H, L, d_h]
    B, L, d = x.shape
    return x.reshape(B, L, H, d // H).transpose(1, 2)


def _merge(x):  # [B, H, L, d_h] -> [B, L, d]
    B, H, L, dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * dh)


def _bias(b, shape_tail):  # [H, n] or None -> broadcastable [1, H, ..., n]
    return 0.0 if b is None else b.reshape(1, b.shape[0], *([1] * shape_tail), b.shape[1])


def _outer(b, vec):  # b [H, k_h] (or None), vec [B, H, d_h] -> b vec^T [B, H, k_h, d_h]
    return 0.0 if b is None else b[None, :, :, None] * vec[:, :, None, :]


def _sel(x, m):
    """x [B, L, ...] with padded rows (m 0) zero: the kernels select, they do not multiply by m."""
    return torch.where((m != 0).reshape(*m.shape, *([1] * (x.dim() - m.dim()))), x, 0.0)


def _token_hidden(x, m, pe, gen, scale, H, r):
    """z (rounded), U (fp32) and hid (rounded) of a token pass."""
    fc1, b1 = gen[0], gen[1]
    z = r.tok(_heads(scale * _sel(x, m) + pe, H))
    u = torch.einsum("bhlc,hoc->bhlo", z, r.tok(fc1)) + _bias(b1, 1)
    return z, u, r.tok(F.gelu(u))


def emulate_forward(q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale, r):
    H = g1[0].shape[0]
    mk, mq = m_k[:, None, :, None], m_q[:, None, :, None]
    # state: S = sum hid^T (V m^2), sv = sum V m^2
    _, _, hid = _token_hidden(k, m_k, pe_k, g1, scale, H, r)
    vx = r.tok(_heads(_sel(v, m_k), H))
    S = torch.einsum("bhlo,bhlc->bhoc", hid, vx)
    sv = vx.sum(2)
    # fwd_finalize: P = fc2 S + b2 sv^T, A = GELU(P), C = fc2_2^T A, c0 = b2_2^T A
    P = torch.einsum("hjo,bhoc->bhjc", r.fin(g1[2]), r.fin(S)) + _outer(g1[3], sv)
    A = F.gelu(P)
    C = torch.einsum("hjo,bhjc->bhoc", r.fin(g2[2]), r.fin(A))
    c0 = 0.0 if g2[3] is None else torch.einsum("hj,bhjc->bhc", g2[3], A)[:, :, None, :]
    # mix: Y = m (hid2 C + c0)
    _, _, hid2 = _token_hidden(q, m_q, pe_q, g2, scale, H, r)
    y = mq * (torch.einsum("bhlo,bhoc->bhlc", hid2, r.tok(C)) + c0)
    return r.tok(_merge(y)), P


def emulate_backward(dy, q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, p, scale, r):
    H = g1[0].shape[0]
    mk, mq = m_k[:, None, :, None], m_q[:, None, :, None]
    # bwd_prep: A, C (c0 is not needed by the backward)
    A = F.gelu(p)
    C = torch.einsum("hjo,bhjc->bhoc", r.fin(g2[2]), r.fin(A))
    # query: T = sum hid2^T (m dY), sdy = sum m dY, dU2 = (m dY) C^T * GELU'(U2)
    zq, u2, hid2 = _token_hidden(q, m_q, pe_q, g2, scale, H, r)
    dyx = r.tok(_heads(_sel(dy, m_q), H))
    Tm = torch.einsum("bhlo,bhlc->bhoc", hid2, dyx)
    sdy = dyx.sum(2)
    du2 = torch.einsum("bhlc,bhoc->bhlo", dyx, r.tok(C)) * gelu_grad(u2)
    dfc1_2 = torch.einsum("bhlo,bhlc->hoc", r.tok(du2), zq)
    db1_2 = du2.sum((0, 2))
    dq = r.tok(_merge(scale * mq * torch.einsum("bhlo,hoc->bhlc", r.tok(du2), r.tok(g2[0]))))
    # bwd_mid: dA = fc2_2 T + b2_2 sdy^T, dP = dA GELU'(P), dfc2_2 = A T^T, db2_2 = A sdy,
    # R = fc2^T dP, r0 = b2^T dP
    dA = torch.einsum("hjo,bhoc->bhjc", r.fin(g2[2]), r.fin(Tm)) + _outer(g2[3], sdy)
    dP = dA * gelu_grad(p)
    dfc2_2 = torch.einsum("bhjc,bhoc->hjo", r.fin(A), r.fin(Tm))
    db2_2 = torch.einsum("bhjc,bhc->hj", A, sdy)
    R = torch.einsum("hjo,bhjc->bhoc", r.fin(g1[2]), r.fin(dP))
    r0 = 0.0 if g1[3] is None else torch.einsum("hj,bhjc->bhc", g1[3], dP)[:, :, None, :]
    # key: S, sv again; dV = m^2 (hid R + r0), dU = (V m^2) R^T * GELU'(U)
    zk, u, hid = _token_hidden(k, m_k, pe_k, g1, scale, H, r)
    vx = r.tok(_heads(_sel(v, m_k), H))
    S = torch.einsum("bhlo,bhlc->bhoc", hid, vx)
    sv = vx.sum(2)
    dv = r.tok(_merge(mk * mk * (torch.einsum("bhlo,bhoc->bhlc", hid, r.tok(R)) + r0)))
    du = torch.einsum("bhlc,bhoc->bhlo", vx, r.tok(R)) * gelu_grad(u)
    dfc1 = torch.einsum("bhlo,bhlc->hoc", r.tok(du), zk)
    db1 = du.sum((0, 2))
    dk = r.tok(_merge(scale * mk * torch.einsum("bhlo,hoc->bhlc", r.tok(du), r.tok(g1[0]))))
    # bwd_final: dfc2 = dP S^T, db2 = dP sv
    dfc2 = torch.einsum("bhjc,bhoc->hjo", r.fin(dP), r.fin(S))
    db2 = torch.einsum("bhjc,bhc->hj", dP, sv)
    return [dq, dk, dv, dfc1, db1, dfc2, db2, dfc1_2, db1_2, dfc2_2, db2_2]


def direct_form(q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale):
    """Y = W2 GELU(W1^T V) per head, as docs/HYPERMIXING.md defines it (and P = W1^T V)."""
    H = g1[0].shape[0]

    def mlp(x, m, pe, gen):
        z = _heads(scale * (x * m[..., None]) + pe, H)
        hid = F.gelu(torch.einsum("bhlc,hoc->bhlo", z, gen[0]) + _bias(gen[1], 1))
        w = torch.einsum("bhlo,hjo->bhlj", hid, gen[2]) + _bias(gen[3], 1)
        return w * m[:, None, :, None]

    w1, w2 = mlp(k, m_k, pe_k, g1), mlp(q, m_q, pe_q, g2)
    P = torch.einsum("bhlj,bhlc->bhjc", w1, _heads(v, H) * m_k[:, None, :, None])
    return _merge(torch.einsum("bhlj,bhjc->bhlc", w2, F.gelu(P))), P


def _problem(B=2, M=7, N=9, H=2, dh=6, kh=10, bias=True, seed=0, input_scale=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    d = H * dh

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * s).to(dtype)

    q, k, v = rnd(B, M, d, s=input_scale), rnd(B, N, d, s=input_scale), rnd(B, N, d, s=input_scale)
    pe_q = (torch.rand(M, d, generator=g, dtype=F64) * 2 - 1)
    pe_k = (torch.rand(N, d, generator=g, dtype=F64) * 2 - 1)
    m_q, m_k = torch.ones(B, M, dtype=F64), torch.ones(B, N, dtype=F64)
    m_q[1, M // 2:] = 0  # padded tails
    m_k[1, 2 * N // 3:] = 0
    gens = []
    for _ in range(2):
        gens.append((rnd(H, dh, dh, s=dh**-0.5), rnd(H, dh, s=0.5) if bias else None,
                     rnd(H, kh, dh, s=dh**-0.5), rnd(H, kh, s=0.5) if bias else None))
    return q, k, v, pe_q, pe_k, m_q, m_k, gens[0], gens[1], (0.3 if input_scale != 1.0 else 1.0)


def _autograd_reference(prob, dy):
    q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale = prob
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (q, k, v, *g1, *g2)]
    lq, lk, lv = leaves[:3]
    lg1, lg2 = tuple(leaves[3:7]), tuple(leaves[7:11])
    y, P = direct_form(lq, lk, lv, pe_q, pe_k, m_q, m_k, lg1, lg2, scale)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, wanted, dy))
    return y.detach(), P.detach(), [next(grads) if t is not None else None for t in leaves]


@pytest.mark.parametrize("bias", [True, False], ids=["biases", "no-biases"])
def test_reassociated_passes_match_the_direct_form_fp64(bias):
    prob = _problem(bias=bias)
    q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale = prob
    exact = _Rounding(None)
    y, p = emulate_forward(*prob, exact)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    grads = emulate_backward(dy, q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, p, scale, exact)
    y_ref, p_ref, g_ref = _autograd_reference(prob, dy)
    names = ["y", "p", "dq", "dk", "dv", "dfc1", "db1", "dfc2", "db2", "dfc1_2", "db1_2", "dfc2_2", "db2_2"]
    # binding order: dq, dk, dv, generator 1 (fc1_w, fc1_b, fc2_w, fc2_b), generator 2 (same)
    for name, a, e in zip(names, [y, p] + grads, [y_ref, p_ref] + g_ref):
        if e is None:
            continue
        err = (a - e).abs().max().item() / e.abs().max().item()
        assert err < 1e-12, f"{name}: relative error {err:.2e}"
    # masked tokens contribute nothing and get zero gradients
    assert grads[1][1, 2 * 9 // 3:].abs().max() == 0 and grads[2][1, 2 * 9 // 3:].abs().max() == 0
    assert y[1, 7 // 2:].abs().max() == 0 and grads[0][1, 7 // 2:].abs().max() == 0


def test_nonfinite_padding_is_selected_away():
    """NaN / inf in the padded rows of the tokens and of dY: the passes (selecting padded rows,
    as the .cu token loads do) give exactly what zeros there give, and zero gradients there."""
    prob = _problem(seed=4)
    q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale = prob
    bad = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=F64)

    def poison(x, m):
        fill = bad.repeat(x.numel() // 3 + 1)[:x.numel()].reshape(x.shape)
        return torch.where((m == 0)[..., None], fill, x)

    exact = _Rounding(None)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    runs = []
    for qq, kk, vv, gy in ((q, k, v, dy), (poison(q, m_q), poison(k, m_k), poison(v, m_k), poison(dy, m_q))):
        y, p = emulate_forward(qq, kk, vv, pe_q, pe_k, m_q, m_k, g1, g2, scale, exact)
        runs.append([y, p] + emulate_backward(gy, qq, kk, vv, pe_q, pe_k, m_q, m_k, g1, g2, p, scale, exact))
    for i, (a, e) in enumerate(zip(*runs)):
        assert torch.isfinite(a).all() and torch.equal(a, e), f"result {i} differs with NaN / inf in the padding"
    assert runs[1][3][m_k == 0].abs().max() == 0 and runs[1][4][m_k == 0].abs().max() == 0  # dk, dv


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_rounding_points_fit_the_cuda_tolerances(half):
    """The kernels' fp16 / bf16 roundings (inputs in T, computed in fp32 with the roundings of
    _Rounding, output through LayerNorm) against the exact result, in units of the "cuda"
    backend's declared tolerances: a budget check for the tolerances, on a recipe-like shape."""
    torch.manual_seed(0)
    prob64 = _problem(B=2, M=300, N=450, H=2, dh=18, kh=72, input_scale=0.3, seed=3)
    q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale = prob64
    rd = lambda t: None if t is None else t.to(half).to(F64)  # noqa: E731  (inputs in T)
    qh, kh_, vh = rd(q), rd(k), rd(v)
    g1h, g2h = tuple(rd(t) for t in g1), tuple(rd(t) for t in g2)
    d = q.shape[2]
    ln_w = 1 + 0.1 * torch.randn(d, dtype=F64)
    ln_b = 0.1 * torch.randn(d, dtype=F64)
    grad_out = torch.randn(q.shape, dtype=F64)

    # exact: the direct form on the same (rounded) inputs, LayerNorm, autograd
    leaves = [t.clone().requires_grad_(True) for t in (qh, kh_, vh, *g1h, *g2h)]
    y_ref, _ = direct_form(*leaves[:3], pe_q, pe_k, m_q, m_k, tuple(leaves[3:7]), tuple(leaves[7:]), scale)
    out_ref = F.layer_norm(y_ref, (d,), ln_w, ln_b, 1e-5)
    g_ref = torch.autograd.grad(out_ref, leaves, grad_out)

    # emulated kernels in fp32 with their roundings; LayerNorm in fp32 on y, dY rounded to T
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    r = _Rounding(half)
    args32 = [f32(t) for t in (qh, kh_, vh, pe_q, pe_k, m_q, m_k)]
    g1f, g2f = tuple(f32(t) for t in g1h), tuple(f32(t) for t in g2h)
    y, p = emulate_forward(*args32, g1f, g2f, scale, r)
    yl = y.detach().requires_grad_(True)
    out = F.layer_norm(yl, (d,), ln_w.float(), ln_b.float(), 1e-5)
    (dy,) = torch.autograd.grad(out, yl, grad_out.float())
    grads = emulate_backward(r.tok(dy), *args32, g1f, g2f, p, scale, r)

    tol = get_backend("cuda").tolerances[("cuda", half)]
    used_out = ((r.tok(out).double() - out_ref).abs().max() / out_ref.abs().max()).item() / tol.out
    used_grad = max(((a.double() - e).abs().max() / e.abs().max()).item() / tol.grad
                    for a, e in zip(grads, g_ref))
    print(f"{half}: output uses {used_out:.2f}, gradients {used_grad:.2f} of the tolerances")
    assert used_out < 0.5 and used_grad < 0.5
