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
- token passes (tensor-core operands in the input type T): z, hid = GELU(U), V m^2 (exact: T
  inputs times 0/1), m dY (read in fp32), the staged C / R, dU; U, the column sums and every
  accumulator stay fp32;
- fp16 only, its range: C / R are staged divided by the power of two of their largest element
  (per (b, h)), each m dY tile of TT tokens by its own (per (b, h, tile)), and dU is rounded in
  those units (`_Rounding.pow2`); bf16 has fp32's range and takes none of it;
- finalize passes: every operand as bf16 hi + lo planes (x ~ hi + lo, lo*lo dropped: ~16 bits);
- outputs dq, dk, dv rounded to T; y (before the LayerNorm), weight gradients and P stay fp32.
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

    def dy_in(self, t):  # dY as the backward kernels receive it: fp32
        return t

    def pow2(self, x, dims):
        """The power of two (exponent bits) of max |x| over `dims`, kept for broadcasting: the
        kernels' pow2_of (1 for an all-zero block); 1 everywhere but fp16."""
        if self.half != torch.float16:
            return torch.ones_like(x.abs().amax(dim=dims, keepdim=True))
        amax = x.abs().amax(dim=dims, keepdim=True)
        _, e = torch.frexp(amax)
        return torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), e - 1), torch.ones_like(amax))

    def tile_pow2(self, x, tile):
        """pow2 of x [B, H, L, d_h] per (b, h, tile of `tile` rows), expanded to x's shape."""
        B, H, L, dh = x.shape
        n = -(-L // tile)
        xp = torch.cat([x, x.new_zeros(B, H, n * tile - L, dh)], 2).view(B, H, n, tile, dh)
        return self.pow2(xp, (3, 4)).expand(B, H, n, tile, dh).reshape(B, H, n * tile, dh)[:, :, :L]

    def fin(self, t):  # a finalize operand: bf16 hi + lo planes
        if self.half is None:
            return t
        hi = t.to(torch.bfloat16).to(t.dtype)
        return hi + (t - hi).to(torch.bfloat16).to(t.dtype)


def _token_tile(d_h):
    """The fp16 / bf16 token kernels' tile TT at head block D (csrc/hmx_cuda_layout.cuh TokCfg)."""
    return 32 if d_h > 64 else 64


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


def emulate_forward(q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale, r, reduce=None):
    """reduce(S, sv) -> (S, sv): sequence parallelism's all-reduce, between the state pass and
    fwd_finalize (hmx_cuda_forward.cu); None: one process."""
    H = g1[0].shape[0]
    mk, mq = m_k[:, None, :, None], m_q[:, None, :, None]
    # state: S = sum hid^T (V m^2), sv = sum V m^2
    _, _, hid = _token_hidden(k, m_k, pe_k, g1, scale, H, r)
    vx = r.tok(_heads(_sel(v, m_k), H))
    S = torch.einsum("bhlo,bhlc->bhoc", hid, vx)
    sv = vx.sum(2)
    if reduce is not None:
        S, sv = reduce(S, sv)
    # fwd_finalize: P = fc2 S + b2 sv^T, A = GELU(P), C = fc2_2^T A, c0 = b2_2^T A
    P = torch.einsum("hjo,bhoc->bhjc", r.fin(g1[2]), r.fin(S)) + _outer(g1[3], sv)
    A = F.gelu(P)
    C = torch.einsum("hjo,bhjc->bhoc", r.fin(g2[2]), r.fin(A))
    c0 = 0.0 if g2[3] is None else torch.einsum("hj,bhjc->bhc", g2[3], A)[:, :, None, :]
    # mix: Y = m (hid2 C + c0), C staged as C / cs, Y in fp32
    _, _, hid2 = _token_hidden(q, m_q, pe_q, g2, scale, H, r)
    cs = r.pow2(C, (-2, -1))
    y = mq * (torch.einsum("bhlo,bhoc->bhlc", hid2, r.tok(C / cs)) * cs + c0)
    return _merge(y), P


def emulate_backward(dy, q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, p, scale, r, reduce=None):
    """reduce(T, sdy) -> (T, sdy): sequence parallelism's all-reduce, between the query pass and
    bwd_mid (hmx_cuda_backward.cu); the key pass's S, sv stay the slice's own."""
    H = g1[0].shape[0]
    mk, mq = m_k[:, None, :, None], m_q[:, None, :, None]
    # bwd_prep: A, C (c0 is not needed by the backward)
    A = F.gelu(p)
    C = torch.einsum("hjo,bhjc->bhoc", r.fin(g2[2]), r.fin(A))
    # query: T = sum hid2^T (m dY), sdy = sum m dY, dU2 = (m dY) C^T * GELU'(U2); C staged as
    # C / cs, each m dY tile as m dY / g, dU2 rounded in units g cs
    zq, u2, hid2 = _token_hidden(q, m_q, pe_q, g2, scale, H, r)
    dyt = _heads(_sel(dy, m_q), H)
    g = r.tile_pow2(dyt, _token_tile(p.shape[-1]))
    cs = r.pow2(C, (-2, -1))
    dyx = r.tok(dyt / g)
    Tm = torch.einsum("bhlo,bhlc->bhoc", hid2, dyx * g)
    sdy = (dyx * g).sum(2)
    T_own, sdy_own = Tm, sdy  # sequence parallel: the generator-2 fc2 gradients' (a mid pass of their own)
    if reduce is not None:
        Tm, sdy = reduce(Tm, sdy)
    du2 = torch.einsum("bhlc,bhoc->bhlo", dyx, r.tok(C / cs)) * gelu_grad(u2)  # units g cs
    unit = g[..., :1] * cs
    dfc1_2 = torch.einsum("bhlo,bhlc->hoc", r.tok(du2) * unit, zq)
    db1_2 = (du2 * unit).sum((0, 2))
    dq = r.tok(_merge(scale * mq * torch.einsum("bhlo,hoc->bhlc", r.tok(du2), r.tok(g2[0])) * unit))
    # bwd_mid: dA = fc2_2 T + b2_2 sdy^T, dP = dA GELU'(P), dfc2_2 = A T^T, db2_2 = A sdy,
    # R = fc2^T dP, r0 = b2^T dP
    dA = torch.einsum("hjo,bhoc->bhjc", r.fin(g2[2]), r.fin(Tm)) + _outer(g2[3], sdy)
    dP = dA * gelu_grad(p)
    dfc2_2 = torch.einsum("bhjc,bhoc->hjo", r.fin(A), r.fin(T_own))
    db2_2 = torch.einsum("bhjc,bhc->hj", A, sdy_own)
    R = torch.einsum("hjo,bhjc->bhoc", r.fin(g1[2]), r.fin(dP))
    r0 = 0.0 if g1[3] is None else torch.einsum("hj,bhjc->bhc", g1[3], dP)[:, :, None, :]
    # key: S, sv again; dV = m^2 (hid R + r0), dU = (V m^2) R^T * GELU'(U)
    zk, u, hid = _token_hidden(k, m_k, pe_k, g1, scale, H, r)
    vx = r.tok(_heads(_sel(v, m_k), H))
    S = torch.einsum("bhlo,bhlc->bhoc", hid, vx)
    sv = vx.sum(2)
    # (R staged as R / rs, dU rounded in units rs)
    rs = r.pow2(R, (-2, -1))
    dv = r.tok(_merge(mk * mk * (torch.einsum("bhlo,bhoc->bhlc", hid, r.tok(R / rs)) * rs + r0)))
    du = torch.einsum("bhlc,bhoc->bhlo", vx, r.tok(R / rs)) * gelu_grad(u)  # units rs
    dfc1 = torch.einsum("bhlo,bhlc->hoc", r.tok(du) * rs, zk)
    db1 = (du * rs).sum((0, 2))
    dk = r.tok(_merge(scale * mk * torch.einsum("bhlo,hoc->bhlc", r.tok(du), r.tok(g1[0])) * rs))
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


@pytest.mark.parametrize("M, N, q_cuts, k_cuts", [(23, 23, (9,), (9,)), (23, 23, (3, 10), (3, 10)),
                                                  (7, 9, (4,), (4,)), (7, 9, (0, 4), (0, 6))],
                         ids=["self-2", "self-3", "cross-2", "cross-3-one-empty"])
def test_sequence_parallel_reduce_points_fp64(M, N, q_cuts, k_cuts):
    """Sequence parallelism on the CUDA kernels: each rank runs the passes on its slice (its own PE
    rows), with the all-reduce of S, sv after its state pass and of T, sdy after its query pass
    (hmx_cuda_forward.cu / hmx_cuda_backward.cu, `reduce`; the generator-2 fc2 gradients from the
    slice's own T, sdy, in a second mid pass); its output and token gradients are its
    slice of the one-process result, the weight gradients summed over the ranks equal the
    one-process ones, and the key pass's own S, sv (bwd_final) need no all-reduce. A rank may hold
    no queries. fp64, 1e-12."""
    prob = _problem(M=M, N=N, seed=7)
    q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale = prob
    exact = _Rounding(None)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    y_ref, p_ref, g_ref = _autograd_reference(prob, dy)
    qb, kb = (0, *q_cuts, M), (0, *k_cuts, N)
    ranks = [(slice(qb[i], qb[i + 1]), slice(kb[i], kb[i + 1])) for i in range(len(qb) - 1)]

    def local(i):
        sq, sk = ranks[i]
        return (q[:, sq], k[:, sk], v[:, sk], pe_q[sq], pe_k[sk], m_q[:, sq], m_k[:, sk], g1, g2, scale)

    def all_reduce(parts):  # each rank's sums, as a collective returns them: their total on every rank
        total = [sum(p[j] for p in parts) for j in range(2)]
        return lambda a, b: (total[0], total[1])

    fwd_sums = []
    for i in range(len(ranks)):  # the collective's inputs: each rank's own S, sv
        emulate_forward(*local(i), exact, reduce=lambda S, sv: fwd_sums.append((S, sv)) or (S, sv))
    outs = [emulate_forward(*local(i), exact, reduce=all_reduce(fwd_sums)) for i in range(len(ranks))]
    for i, (y, P) in enumerate(outs):
        torch.testing.assert_close(P, p_ref, rtol=0, atol=1e-12 * p_ref.abs().max().item())
        e = y_ref[:, ranks[i][0]]
        assert y.shape == e.shape and (y.numel() == 0 or (y - e).abs().max() <= 1e-12 * y_ref.abs().max()), i

    def bwd(i, reduce):
        lq, lk, lv, pq, pk, mq, mk, _, _, _ = local(i)
        return emulate_backward(dy[:, ranks[i][0]], lq, lk, lv, pq, pk, mq, mk, g1, g2, outs[i][1], scale, exact,
                                reduce=reduce)

    bwd_sums = []
    for i in range(len(ranks)):
        bwd(i, lambda T, sdy: bwd_sums.append((T, sdy)) or (T, sdy))
    grads = [bwd(i, all_reduce(bwd_sums)) for i in range(len(ranks))]
    names = ["dq", "dk", "dv", "dfc1", "db1", "dfc2", "db2", "dfc1_2", "db1_2", "dfc2_2", "db2_2"]
    for j, (name, e) in enumerate(zip(names, g_ref)):
        if j < 3:  # token gradients: each rank's slice
            a = torch.cat([g[j] for g in grads], dim=1)
        else:  # weight gradients: summed over the ranks (data-parallel style)
            a = sum(g[j] for g in grads)
        err = (a - e).abs().max().item() / e.abs().max().item()
        assert err < 1e-12, f"{name}: relative error {err:.2e}"
    # the reduce points matter: without the backward's all-reduce the key gradients are wrong (dP,
    # R need every rank's queries), and so are the generator-2 fc2 gradients taken after it
    wrong = bwd(len(ranks) - 1, None)
    assert (wrong[1] - g_ref[1][:, ranks[-1][1]]).abs().max() > 1e-3 * g_ref[1].abs().max()


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
    grads = emulate_backward(r.dy_in(dy), *args32, g1f, g2f, p, scale, r)

    tol = get_backend("cuda").tolerances[("cuda", half)]
    used_out = ((r.tok(out).double() - out_ref).abs().max() / out_ref.abs().max()).item() / tol.out
    used_grad = max(((a.double() - e).abs().max() / e.abs().max()).item() / tol.grad
                    for a, e in zip(grads, g_ref))
    print(f"{half}: output uses {used_out:.2f}, gradients {used_grad:.2f} of the tolerances")
    assert used_out < 0.5 and used_grad < 0.5


def _through_layer_norm(prob64, half, grad_scale=1.0, seed=0, tail=None):
    """The exact result (direct form on the inputs rounded to `half`, LayerNorm, autograd, fp64)
    and the emulated kernels' (fp32 with the roundings of _Rounding(half), LayerNorm in fp32):
    (out_ref, grads_ref, out, grads, max |Y|, exact m dY). tail = (row, factor): the upstream
    gradient of the query rows from `row` on times `factor`."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale = prob64
    rd = lambda t: None if t is None else t.to(half).to(F64)  # noqa: E731  (inputs in T)
    qh, kh_, vh = rd(q), rd(k), rd(v)
    g1h, g2h = tuple(rd(t) for t in g1), tuple(rd(t) for t in g2)
    d = q.shape[2]
    ln_w = 1 + 0.1 * torch.randn(d, generator=g, dtype=F64)
    ln_b = 0.1 * torch.randn(d, generator=g, dtype=F64)
    grad_out = torch.randn(q.shape, generator=g, dtype=F64) * grad_scale
    if tail is not None:
        grad_out[:, tail[0]:] *= tail[1]

    leaves = [t.clone().requires_grad_(True) for t in (qh, kh_, vh, *g1h, *g2h) if t is not None]
    it = iter(leaves)
    lq, lk, lv = next(it), next(it), next(it)
    lg1 = tuple(None if t is None else next(it) for t in g1h)
    lg2 = tuple(None if t is None else next(it) for t in g2h)
    y_ref, _ = direct_form(lq, lk, lv, pe_q, pe_k, m_q, m_k, lg1, lg2, scale)
    out_ref = F.layer_norm(y_ref, (d,), ln_w, ln_b, 1e-5)
    g_ref = torch.autograd.grad(out_ref, leaves, grad_out)
    y_exact = y_ref.detach().requires_grad_(True)  # the exact dY, for the case's preconditions
    (dy_exact,) = torch.autograd.grad(F.layer_norm(y_exact, (d,), ln_w, ln_b, 1e-5), y_exact, grad_out)

    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    r = _Rounding(half)
    args32 = [f32(t) for t in (qh, kh_, vh, pe_q, pe_k, m_q, m_k)]
    g1f, g2f = tuple(f32(t) for t in g1h), tuple(f32(t) for t in g2h)
    y, p = emulate_forward(*args32, g1f, g2f, scale, r)
    yl = y.detach().float().requires_grad_(True)
    out = F.layer_norm(yl, (d,), ln_w.float(), ln_b.float(), 1e-5)
    (dy,) = torch.autograd.grad(out, yl, grad_out.float())
    grads = [gr for gr in emulate_backward(r.dy_in(dy), *args32, g1f, g2f, p, scale, r) if gr is not None]
    return out_ref, g_ref, r.tok(out), grads, y_ref.abs().max().item(), dy_exact * m_q[..., None]


def test_fp16_range_large_state_and_small_gradients():
    """fp16 range: a large state makes C = fc2_2^T GELU(P) and the pre-LayerNorm Y exceed fp16's
    65504, and the LayerNorm then scales dY below fp16's normal range (2^-14). The kernels stage C /
    R divided by a power of two, write Y in fp32, read dY in fp32 and divide each m dY tile by its
    power of two (csrc/hmx_cuda_passes.cuh): output and every gradient finite and within the
    "cuda" fp16 tolerances. Rounding C or Y to fp16 unscaled gives inf, then NaN after the
    LayerNorm; rounding dY unscaled flushes the gradients to zero. Two query tiles (M 70 > 64)
    whose dY have different powers of two exercise the accumulators' rescaling."""
    half = torch.float16
    prob = list(_problem(B=2, M=70, N=90, H=2, dh=8, kh=12, input_scale=0.3, seed=12))
    q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale = prob
    v = v * 64
    g2 = (g2[0], g2[1], g2[2] * 256, g2[3])
    prob = (q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale)
    # the second query tile's upstream gradient 2^-4 times the first's: another power of two
    out_ref, g_ref, out, grads, y_max, dy = _through_layer_norm(prob, half, grad_scale=2.0 ** -10, seed=1,
                                                                tail=(64, 2.0 ** -4))
    assert y_max > 65504, "the case should overflow fp16 if Y or C were rounded unscaled"
    assert dy.abs().max() < 2.0 ** -14, "dY should be below fp16's normal range"
    powers = _Rounding(half).tile_pow2(_heads(dy, 2), _token_tile(8))[0, 0, ::64, 0]
    assert powers[0] != powers[1], "the two query tiles should have different powers of two"
    tol = get_backend("cuda").tolerances[("cuda", half)]
    assert torch.isfinite(out).all(), "output has inf / NaN"
    err_out = ((out.double() - out_ref).abs().max() / out_ref.abs().max()).item()
    assert err_out < tol.out, f"output error {err_out:.2e} over the tolerance {tol.out}"
    names = ["dq", "dk", "dv", "dfc1", "db1", "dfc2", "db2", "dfc1_2", "db1_2", "dfc2_2", "db2_2"]
    for name, a, e in zip(names, grads, g_ref):
        assert torch.isfinite(a).all(), f"{name} has inf / NaN"
        err = ((a.double() - e).abs().max() / e.abs().max()).item()
        assert err < tol.grad, f"{name}: error {err:.2e} over the tolerance {tol.grad}"


# ---- mixing blocks (chunk-causal, packed sequences) -----------------------------------------------
# The blocked passes of csrc/hmx_cuda_forward.cu / hmx_cuda_backward.cu: token passes over the pieces
# of csrc/hmx_pieces.h (per-piece partials), block and window sums in the order of
# csrc/hmx_cuda_blocks.cu, finalize passes per (b, h, block), the mix / query / key passes reading
# their block's C_j, c0_j / R_i, r0_i, PE rows restarting at each packed sequence's first token.


def piece_plan(N, chunk_size, cu, piece_len):
    """csrc/hmx_pieces.h in Python: (pieces [(start, end, block, sequence start)], block_piece
    [nb + 1], seq_first [nb], seq_last [nb])."""
    cu = [0, N] if cu is None else list(cu)
    pieces, block_piece, seq_first, seq_last, nb = [], [], [], [], 0
    for start, stop in zip(cu[:-1], cu[1:]):
        n = stop - start
        step = chunk_size if chunk_size > 0 else max(n, 1)
        nbs = -(-n // step)
        for i in range(nbs):
            b0, b1 = start + i * step, min(start + (i + 1) * step, stop)
            block_piece.append(len(pieces))
            pieces += [(r, min(r + piece_len, b1), nb + i, start) for r in range(b0, b1, piece_len)]
            seq_first.append(nb)
            seq_last.append(nb + nbs - 1)
        nb += nbs
    block_piece.append(len(pieces))
    return pieces, block_piece, seq_first, seq_last


def window_sums(x, width, seq_first, seq_last, reverse=False):
    """block_window_kernel's windows on x [..., nb, *] (dimension 2 of [B, H, nb, ...]), in its
    order: suffix sums within segments of `width` blocks (from each sequence's first block), prefix
    sums, y_k = pre_k or suf_s + pre_k (width 0: unbounded; 1: x itself)."""
    nb = x.shape[2]
    if width == 1 or nb == 0:
        return x
    blk = (lambda k: nb - 1 - k) if reverse else (lambda k: k)
    first = (lambda k: nb - 1 - seq_last[nb - 1 - k]) if reverse else (lambda k: seq_first[k])
    y = [None] * nb
    if width > 1:
        run = None
        for k in range(nb - 1, -1, -1):
            f = first(k)
            seg_end = k == nb - 1 or first(k + 1) != f or (k + 1 - f) % width == 0
            xk = x[:, :, blk(k)]
            run = xk if seg_end else xk + run
            y[blk(k)] = run
    out = [None] * nb
    pre = None
    for k in range(nb):
        f = first(k)
        g = f + (k - f) // width * width if width > 0 else f
        xk = x[:, :, blk(k)]
        pre = xk if k == g else pre + xk
        s = max(f, k - width + 1) if width > 0 else f
        out[blk(k)] = pre if s == g else y[blk(s)] + pre
    return torch.stack(out, 2)


class _Blocks:
    """The blocked layout of one call: token -> block, token -> PE row, pieces and token tiles."""

    def __init__(self, N, chunk_size, left_context, cu, piece_len, tile):
        self.pieces, self.block_piece, self.seq_first, self.seq_last = piece_plan(N, chunk_size, cu, piece_len)
        self.nb = len(self.seq_first)
        self.width = 0 if left_context < 0 else left_context + 1
        self.block = torch.empty(N, dtype=torch.long)
        self.pe_row = torch.empty(N, dtype=torch.long)
        self.tiles = []  # token ranges of the token passes' tiles (each piece from its start)
        for a, b, j, s0 in self.pieces:
            self.block[a:b] = j
            self.pe_row[a:b] = torch.arange(a - s0, b - s0)
            self.tiles += [(r, min(r + tile, b)) for r in range(a, b, tile)]

    def block_sums(self, x):
        """x [B, H, N, ...] per token -> [B, H, nb, ...]: per-piece sums, added in piece order."""
        parts = [x[:, :, a:b].sum(2) for a, b, _, _ in self.pieces]
        out = []
        for j in range(self.nb):
            acc = parts[self.block_piece[j]]
            for q in range(self.block_piece[j] + 1, self.block_piece[j + 1]):
                acc = acc + parts[q]
            out.append(acc)
        return torch.stack(out, 2)

    def window(self, x, reverse=False):
        return window_sums(x, self.width, self.seq_first, self.seq_last, reverse)

    def tile_pow2(self, r, x):
        """_Rounding.pow2 of x [B, H, N, d_h] per (b, h, token tile), expanded to x's shape."""
        out = torch.ones_like(x)
        for a, b in self.tiles:
            out[:, :, a:b] = r.pow2(x[:, :, a:b], (2, 3))
        return out


def _per_token(mat, bl):  # [B, H, nb, ...] -> [B, H, N, ...]: each token's block's value
    return mat.index_select(2, bl.block)


def emulate_forward_blocked(q, k, v, pe, m_q, m_k, g1, g2, scale, r, bl, p_init=None):
    """pe: the PE table (row = token - sequence start); p_init: a carried state in P's layout,
    [B, H, k_h, d_h] (every block) or [B, H, nb, k_h, d_h] (one term per block), added to P in
    the finalize pass. Returns y and P [B, H, nb, k_h, d_h]."""
    H = g1[0].shape[0]
    mq = m_q[:, None, :, None]
    pe_tok = pe.index_select(0, bl.pe_row)
    _, _, hid = _token_hidden(k, m_k, pe_tok, g1, scale, H, r)
    vx = r.tok(_heads(_sel(v, m_k), H))
    S = bl.window(bl.block_sums(torch.einsum("bhlo,bhlc->bhloc", hid, vx)))
    sv = bl.window(bl.block_sums(vx))
    P = torch.einsum("hjo,bhnoc->bhnjc", r.fin(g1[2]), r.fin(S))
    if g1[3] is not None:
        P = P + g1[3][None, :, None, :, None] * sv[:, :, :, None, :]
    if p_init is not None:
        P = P + (p_init[:, :, None] if p_init.dim() == 4 else p_init)
    A = F.gelu(P)
    C = torch.einsum("hjo,bhnjc->bhnoc", r.fin(g2[2]), r.fin(A))
    c0 = 0.0 if g2[3] is None else _per_token(torch.einsum("hj,bhnjc->bhnc", g2[3], A), bl)
    _, _, hid2 = _token_hidden(q, m_q, pe_tok, g2, scale, H, r)
    cs = r.pow2(C, (-2, -1))  # per (b, h, block)
    Ct, cst = _per_token(r.tok(C / cs), bl), _per_token(cs, bl)[..., 0]
    y = mq * (torch.einsum("bhlo,bhloc->bhlc", hid2, Ct) * cst + c0)
    return _merge(y), P


def emulate_backward_blocked(dy, q, k, v, pe, m_q, m_k, g1, g2, P, scale, r, bl, dp_extra=None):
    """dp_extra: the gradient of the saved state [B, H, nb, k_h, d_h], added to dP in the mid pass.
    Returns the gradients of the binding's order and, last, every block's dP (what the kernels give
    the binding for the carried state's gradient)."""
    H = g1[0].shape[0]
    mk, mq = m_k[:, None, :, None], m_q[:, None, :, None]
    pe_tok = pe.index_select(0, bl.pe_row)
    # bwd_prep per block
    A = F.gelu(P)
    C = torch.einsum("hjo,bhnjc->bhnoc", r.fin(g2[2]), r.fin(A))
    # query pass over the pieces, each token with its block's C
    zq, u2, hid2 = _token_hidden(q, m_q, pe_tok, g2, scale, H, r)
    dyt = _heads(_sel(dy, m_q), H)
    g = bl.tile_pow2(r, dyt)
    cs = r.pow2(C, (-2, -1))
    Ct, cst = _per_token(r.tok(C / cs), bl), _per_token(cs, bl)[..., 0]
    dyx = r.tok(dyt / g)
    Tm = bl.block_sums(torch.einsum("bhlo,bhlc->bhloc", hid2, dyx * g))  # block j's own queries
    sdy = bl.block_sums(dyx * g)
    du2 = torch.einsum("bhlc,bhloc->bhlo", dyx, Ct) * gelu_grad(u2)  # units g cs
    unit = g[..., :1] * cst
    dfc1_2 = torch.einsum("bhlo,bhlc->hoc", r.tok(du2) * unit, zq)
    db1_2 = (du2 * unit).sum((0, 2))
    dq = r.tok(_merge(scale * mq * torch.einsum("bhlo,hoc->bhlc", r.tok(du2), r.tok(g2[0])) * unit))
    # bwd_mid per block
    dA = torch.einsum("hjo,bhnoc->bhnjc", r.fin(g2[2]), r.fin(Tm))
    if g2[3] is not None:
        dA = dA + g2[3][None, :, None, :, None] * sdy[:, :, :, None, :]
    dP = dA * gelu_grad(P)
    if dp_extra is not None:
        dP = dP + dp_extra
    dfc2_2 = torch.einsum("bhnjc,bhnoc->hjo", r.fin(A), r.fin(Tm))
    db2_2 = torch.einsum("bhnjc,bhnc->hj", A, sdy)
    # R_i, r0_i: the blocks j whose window holds i
    R = bl.window(torch.einsum("hjo,bhnjc->bhnoc", r.fin(g1[2]), r.fin(dP)), reverse=True)
    r0 = 0.0 if g1[3] is None else _per_token(bl.window(torch.einsum("hj,bhnjc->bhnc", g1[3], dP), reverse=True), bl)
    # key pass over the pieces, each token with its block's R
    zk, u, hid = _token_hidden(k, m_k, pe_tok, g1, scale, H, r)
    vx = r.tok(_heads(_sel(v, m_k), H))
    S = bl.window(bl.block_sums(torch.einsum("bhlo,bhlc->bhloc", hid, vx)))
    sv = bl.window(bl.block_sums(vx))
    rs = r.pow2(R, (-2, -1))
    Rt, rst = _per_token(r.tok(R / rs), bl), _per_token(rs, bl)[..., 0]
    dv = r.tok(_merge(mk * mk * (torch.einsum("bhlo,bhloc->bhlc", hid, Rt) * rst + r0)))
    du = torch.einsum("bhlc,bhloc->bhlo", vx, Rt) * gelu_grad(u)  # units rs
    dfc1 = torch.einsum("bhlo,bhlc->hoc", r.tok(du) * rst, zk)
    db1 = (du * rst).sum((0, 2))
    dk = r.tok(_merge(scale * mk * torch.einsum("bhlo,hoc->bhlc", r.tok(du), r.tok(g1[0])) * rst))
    # bwd_final per block: the window sums of the key pass's S, sv
    dfc2 = torch.einsum("bhnjc,bhnoc->hjo", r.fin(dP), r.fin(S))
    db2 = torch.einsum("bhnjc,bhnc->hj", dP, sv)
    return [dq, dk, dv, dfc1, db1 if g1[1] is not None else None, dfc2, db2 if g1[3] is not None else None,
            dfc1_2, db1_2 if g2[1] is not None else None, dfc2_2, db2_2 if g2[3] is not None else None, dP]


def direct_masked_form(q, k, v, pe, m_q, m_k, g1, g2, scale, blocks, p_init_tok=None):
    """O(N^2) definition: token t mixes with the tokens s of allowed[t, s] (hmx_kernels.blocks
    MixingBlocks.allowed_matrix), P_t = sum_s allowed[t, s] W1_s^T (v_s m_s), y_t = W2_t GELU(P_t);
    PE row of a token = its position in its packed sequence (from cu_seqlens); p_init_tok: a
    carried state [B, H, N, k_h, d_h] added to each token's P. Returns y and P [B, H, N, k_h, d_h]
    per token."""
    H = g1[0].shape[0]
    N = k.shape[1]
    cu = [0, N] if blocks.cu_seqlens is None else blocks.cu_seqlens.tolist()
    rows = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
    pe_tok = pe.index_select(0, rows)
    allowed = blocks.allowed_matrix(N).to(q.dtype)

    def mlp(x, m, gen):
        z = _heads(scale * (x * m[..., None]) + pe_tok, H)
        hid = F.gelu(torch.einsum("bhlc,hoc->bhlo", z, gen[0]) + _bias(gen[1], 1))
        w = torch.einsum("bhlo,hjo->bhlj", hid, gen[2]) + _bias(gen[3], 1)
        return w * m[:, None, :, None]

    w1, w2 = mlp(k, m_k, g1), mlp(q, m_q, g2)
    P = torch.einsum("ts,bhsj,bhsc->bhtjc", allowed, w1, _heads(v, H) * m_k[:, None, :, None])
    if p_init_tok is not None:
        P = P + p_init_tok
    return _merge(torch.einsum("bhtj,bhtjc->bhtc", w2, F.gelu(P))), P


BLOCK_CASES = {
    # name: (B, N, chunk_size, left_context, cu_seqlens)
    "chunk-causal-all": (2, 23, 4, -1, None),
    "chunk-causal-L2": (2, 23, 3, 2, None),
    "packed-noncausal-empty": (1, 21, 0, -1, [0, 7, 7, 16, 21]),
    "packed-chunk-L1-empty": (1, 22, 3, 1, [0, 10, 10, 11, 22]),
}


def _blocked_problem(case, dh=6, kh=10, H=2, bias=True, seed=0, input_scale=1.0, dtype=F64):
    """case (B, N, chunk_size, left_context, cu_seqlens) -> (problem, case, MixingBlocks)."""
    from hmx_kernels.blocks import MixingBlocks
    from hmx_kernels.causal import MixingMode

    B, N, C, L, cu = case
    prob = list(_problem(B=2, M=N, N=N, H=H, dh=dh, kh=kh, bias=bias, seed=seed, input_scale=input_scale,
                         dtype=dtype))
    if B == 1:  # packed: one row, padded tokens inside two of its sequences
        prob[:3] = [x[:1] for x in prob[:3]]
        prob[5], prob[6] = torch.ones(1, N, dtype=F64), torch.ones(1, N, dtype=F64)
        prob[5][0, 14:16] = 0
        prob[6][0, 3:5] = 0
    mode = None if C == 0 else MixingMode(C, None if L < 0 else L)
    blocks = MixingBlocks(mode, None if cu is None else torch.tensor(cu))
    return prob, case, blocks


@pytest.mark.parametrize("piece_len", [2, 5])
@pytest.mark.parametrize("name", list(BLOCK_CASES))
def test_blocked_passes_match_the_masked_direct_form_fp64(name, piece_len):
    """The blocked passes (pieces shorter than blocks, so block sums add several pieces) against
    autograd of the O(N^2) masked direct form, in fp64: output, P per block, every gradient."""
    prob, (_, N, C, L, cu), blocks = _blocked_problem(BLOCK_CASES[name])
    q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale = prob
    bl = _Blocks(N, C, L, cu, piece_len, tile=2)
    exact = _Rounding(None)
    y, P = emulate_forward_blocked(q, k, v, pe_k, m_q, m_k, g1, g2, scale, exact, bl)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    grads = emulate_backward_blocked(dy, q, k, v, pe_k, m_q, m_k, g1, g2, P, scale, exact, bl)

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, *g1, *g2)]
    y_ref, P_ref = direct_masked_form(*leaves[:3], pe_k, m_q, m_k, tuple(leaves[3:7]), tuple(leaves[7:]), scale,
                                      blocks)
    g_ref = torch.autograd.grad(y_ref, leaves, dy)
    first_token = torch.tensor([bl.pieces[bp][0] for bp in bl.block_piece[:-1]])
    P_ref = P_ref.detach().index_select(2, first_token)  # every token of block j has P_j
    names = ["y", "p", "dq", "dk", "dv", "dfc1", "db1", "dfc2", "db2", "dfc1_2", "db1_2", "dfc2_2", "db2_2"]
    for nm, a, e in zip(names, [y, P] + grads[:-1], [y_ref.detach(), P_ref] + list(g_ref)):
        err = (a - e).abs().max().item() / e.abs().max().item()
        assert err < 1e-12, f"{name}: {nm} relative error {err:.2e}"
    # the masks: padded tokens give nothing and get zero gradients
    for t, m in ((grads[1], m_k), (grads[2], m_k), (grads[0], m_q), (y, m_q)):
        assert t[m == 0].abs().max() == 0


def test_window_sums_are_the_window_definition():
    """window_sums (the kernel's segment algorithm) against the plain definition, forward and
    reverse, for widths 0 (unbounded), 1, 2, 3, 5 over sequences of 0, 1, 4 and 7 blocks: the
    sums are exact in fp64 on integers."""
    cu_blocks = [0, 4, 4, 5, 12]  # blocks per sequence 4, 0, 1, 7
    nb = cu_blocks[-1]
    seq_first = [a for a, b in zip(cu_blocks[:-1], cu_blocks[1:]) for _ in range(a, b)]
    seq_last = [b - 1 for a, b in zip(cu_blocks[:-1], cu_blocks[1:]) for _ in range(a, b)]
    x = torch.randint(-50, 50, (2, 3, nb, 4), generator=torch.Generator().manual_seed(1)).to(F64)
    for width in (0, 1, 2, 3, 5):
        want = torch.zeros_like(x)
        want_rev = torch.zeros_like(x)
        for j in range(nb):
            lo = seq_first[j] if width == 0 else max(seq_first[j], j - width + 1)
            want[:, :, j] = x[:, :, lo:j + 1].sum(2)
            for i in range(lo, j + 1):  # block j's window holds i
                want_rev[:, :, i] += x[:, :, j]
        assert torch.equal(window_sums(x, width, seq_first, seq_last), want), width
        assert torch.equal(window_sums(x, width, seq_first, seq_last, reverse=True), want_rev), width


BLOCK_HALF_CASES = {
    # name: (B, N, chunk_size, left_context, cu_seqlens): recipe-like lengths, several token tiles per block
    "chunk-causal-L2": (2, 300, 96, 2, None),
    "packed-chunk-causal": (1, 300, 80, -1, [0, 130, 130, 250, 300]),
}


@pytest.mark.parametrize("name", list(BLOCK_HALF_CASES))
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_blocked_half_rounding_points_fit_the_cuda_tolerances(half, name):
    """The blocked passes with the fp16 / bf16 roundings of _Rounding (per-block C / R powers of
    two, per-tile m dY powers of two with tiles cut from each piece's start) through LayerNorm,
    against the exact masked direct form on the same rounded inputs, in units of the "cuda"
    tolerances (d_h 18, k_h 72)."""
    prob, (_, N, C, L, cu), blocks = _blocked_problem(BLOCK_HALF_CASES[name], dh=18, kh=72, seed=3, input_scale=0.3)
    q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale = prob
    tile = _token_tile(18)
    bl = _Blocks(N, C, L, cu, piece_len=tile, tile=tile)  # piece_tokens: whole tiles
    g = torch.Generator().manual_seed(0)
    rd = lambda t: None if t is None else t.to(half).to(F64)  # noqa: E731  (inputs in T)
    qh, kh_, vh = rd(q), rd(k), rd(v)
    g1h, g2h = tuple(rd(t) for t in g1), tuple(rd(t) for t in g2)
    d = q.shape[2]
    ln_w = 1 + 0.1 * torch.randn(d, generator=g, dtype=F64)
    ln_b = 0.1 * torch.randn(d, generator=g, dtype=F64)
    grad_out = torch.randn(q.shape, generator=g, dtype=F64)

    leaves = [t.clone().requires_grad_(True) for t in (qh, kh_, vh, *g1h, *g2h)]
    y_ref, _ = direct_masked_form(*leaves[:3], pe_k, m_q, m_k, tuple(leaves[3:7]), tuple(leaves[7:]), scale, blocks)
    out_ref = F.layer_norm(y_ref, (d,), ln_w, ln_b, 1e-5)
    g_ref = torch.autograd.grad(out_ref, leaves, grad_out)

    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    r = _Rounding(half)
    q32, k32, v32, pe32, mq32, mk32 = (f32(t) for t in (qh, kh_, vh, pe_k, m_q, m_k))
    g1f, g2f = tuple(f32(t) for t in g1h), tuple(f32(t) for t in g2h)
    y, P = emulate_forward_blocked(q32, k32, v32, pe32, mq32, mk32, g1f, g2f, scale, r, bl)
    yl = y.detach().requires_grad_(True)
    out = F.layer_norm(yl, (d,), ln_w.float(), ln_b.float(), 1e-5)
    (dy,) = torch.autograd.grad(out, yl, grad_out.float())
    grads = emulate_backward_blocked(r.dy_in(dy), q32, k32, v32, pe32, mq32, mk32, g1f, g2f, P, scale, r, bl)[:-1]

    tol = get_backend("cuda").tolerances[("cuda", half)]
    used_out = ((r.tok(out).double() - out_ref).abs().max() / out_ref.abs().max()).item() / tol.out
    used_grad = max(((a.double() - e).abs().max() / e.abs().max()).item() / tol.grad
                    for a, e in zip(grads, g_ref))
    print(f"{name} {half}: output uses {used_out:.2f}, gradients {used_grad:.2f} of the tolerances")
    assert used_out < 0.5 and used_grad < 0.5


@pytest.mark.parametrize("N, chunk_size, left_context, cu", [
    (23, 4, -1, None), (23, 3, 2, None), (300, 0, -1, [0, 7, 7, 16, 300]), (300, 40, 1, [0, 10, 10, 11, 300]),
    (5000, 96, -1, [0, 3000, 5000]), (5000, 1, 3, None)])
def test_piece_table_of_the_binding(N, chunk_size, left_context, cu):
    """The binding's piece table (csrc/hmx_pieces.h through the extension's _piece_table, what the
    CUDA kernels receive) equals piece_plan, the table the emulation above runs on, and, at the
    Triton backend's piece length, the Triton backend's own table (hmx_kernels/triton/launch.py
    _Blocks): the same blocks, pieces and sequence starts."""
    from hmx_kernels.cpp.ops import extension, extension_reasons

    if extension_reasons("cpu"):
        pytest.skip("; ".join(extension_reasons("cpu")))
    ext = extension("cpu")
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int64)
    for piece_len in (64, 100, 4096):
        table, n_pieces, nb = ext._piece_table(N, chunk_size, cu_t, piece_len)
        pieces, block_piece, seq_first, seq_last = piece_plan(N, chunk_size, cu, piece_len)
        assert (n_pieces, nb) == (len(pieces), len(seq_first))
        want = [x for p in pieces for x in p] + block_piece + seq_first + seq_last
        assert table.dtype == torch.int32 and table.tolist() == want
    try:
        from hmx_kernels.triton.launch import _Blocks as TritonBlocks, _chunking
    except ImportError as e:  # triton not installed
        pytest.skip(str(e))
    tb = TritonBlocks(N, chunk_size, left_context, cu_t, "cpu")
    table, n_pieces, nb = ext._piece_table(N, chunk_size, cu_t, _chunking(N)[1])
    assert (n_pieces, nb) == (tb.n_pieces, tb.nb)
    assert torch.equal(table[:4 * n_pieces].view(n_pieces, 4), tb.table)


@pytest.mark.parametrize("name, per_block", [("chunk-causal-all", False), ("chunk-causal-L2", True)],
                         ids=["one-state-unbounded", "per-block-terms-L2"])
def test_blocked_carried_state_matches_the_direct_form_fp64(name, per_block):
    """Streaming on the CUDA kernels (hmx_params.h p_init / dp_extra / dp_init): a carried state
    added to P in the finalize pass (one state in every block's window with unbounded left
    context, or one term per block), the gradient of the saved state added to dP in the mid pass,
    and P_0's gradient = the sum of every block's dP (or each block's): against autograd of the
    masked direct form with the state added to every token's P and a loss that also weighs the
    saved state (block j's P), fp64."""
    prob, (_, N, C, L, cu), blocks = _blocked_problem(BLOCK_CASES[name])
    q, k, v, pe_q, pe_k, m_q, m_k, g1, g2, scale = prob
    bl = _Blocks(N, C, L, cu, 3, tile=2)
    B, H, kh, dh = q.shape[0], g1[0].shape[0], g1[2].shape[1], g1[2].shape[2]
    gen = torch.Generator().manual_seed(8)
    shape = (B, H, bl.nb, kh, dh) if per_block else (B, H, kh, dh)
    p_init = torch.randn(shape, generator=gen, dtype=F64) * 0.5
    exact = _Rounding(None)
    y, P = emulate_forward_blocked(q, k, v, pe_k, m_q, m_k, g1, g2, scale, exact, bl, p_init=p_init)
    dy = torch.randn(y.shape, generator=gen, dtype=F64)
    dp_extra = torch.randn(P.shape, generator=gen, dtype=F64)
    *grads, dP = emulate_backward_blocked(dy, q, k, v, pe_k, m_q, m_k, g1, g2, P, scale, exact, bl, dp_extra=dp_extra)
    dp_init = dP if per_block else dP.sum(2)

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, *g1, *g2, p_init)]
    init_tok = leaves[-1].index_select(2, bl.block) if per_block else leaves[-1][:, :, None].expand(B, H, N, kh, dh)
    y_ref, P_tok = direct_masked_form(*leaves[:3], pe_k, m_q, m_k, tuple(leaves[3:7]), tuple(leaves[7:11]), scale,
                                      blocks, p_init_tok=init_tok)
    first_token = torch.tensor([bl.pieces[bp][0] for bp in bl.block_piece[:-1]])
    P_ref = P_tok.index_select(2, first_token)
    loss = (y_ref * dy).sum() + (P_ref * dp_extra).sum()
    g_ref = torch.autograd.grad(loss, leaves)
    names = ["y", "p", "dq", "dk", "dv", "dfc1", "db1", "dfc2", "db2", "dfc1_2", "db1_2", "dfc2_2", "db2_2", "dp_init"]
    for nm, a, e in zip(names, [y, P] + grads + [dp_init], [y_ref.detach(), P_ref.detach()] + list(g_ref)):
        err = (a - e).abs().max().item() / e.abs().max().item()
        assert err < 1e-12, f"{name}: {nm} relative error {err:.2e}"
