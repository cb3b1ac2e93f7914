// The causal passes of the CPU twin, included by hmx_cpu.cpp inside its anonymous namespace after
// its helpers (Mm, Stream, BlockMap, hidden, ...), which they use: not a header to include anywhere else.
#pragma once

// ---- token-causal mixing as a scan (the direct form) ------------------------------------------
// Token-causal mixing (chunk_size 1, unbounded left context) gives every token its own state
// P_t = sum_{s <= t} W1_s^T V_s and applies GELU to all k_h x d_h of it, so the reassociated
// blocks would pay 7 [k_h, d_h] x [d_h, d_h] products per token on top of that element-wise
// work. The scan forms W1, W2 per token instead (one [T, d_h] x [d_h, k_h] product per tile and
// generator) and walks the tokens of a (b, h) in order:
//   P += W1_t^T v_t (rank 1), Y_t = W2_t GELU(P)  (one pass over P per token).
// The forward keeps P at the start of every tile of kCpuTile tokens (the op's state: one
// [k_h, d_h] slot per tile); the backward walks the tiles in reverse, recomputes the tile's P_t
// from that checkpoint, and runs the reverse scan with G = sum_{s >= t} dP_s:
//   dW2_t = GELU(P_t) dY_t, dP_t = (W2_t dY_t^T) * GELU'(P_t), G += dP_t,
//   dW1_t = G v_t, dV_t = G^T W1_t,
// then the generators' backward per tile (dhid = dW fc2, dfc2 += dW^T hid, the fc1 chain).
// Packed sequences restart P (and G) at each sequence's first (last) token. Work is parallel over
// (b, h) only: the scan is sequential along the tokens.
// Carried state (streaming): the forward may start from a state P_0 (ForwardParams::p_init) and
// writes the state after the last token into the last slot (P^T, as a block's); the backward
// starts G from that slot's gradient (BackwardParams::dp_extra) and returns G after the first
// token as P_0's gradient (dp_init).
// Padded tokens: a padded value row is selected away (a zero row is read instead), never
// multiplied by its zero weights: NaN * 0 = NaN.
// Blocked, compensated running sums: one fp32 sum of N rank-1 terms drifts (its rounding error
// grows with N: on steadily growing states the output was off from fp64 by 7.8e-7 at 1000 tokens,
// 8.7e-6 at 300k; now 3e-7 and 2e-7). So P_t = base + Q_t, with Q_t the sum over
// the tile's own tokens so far (at most kCpuTile terms) and base the sum of all earlier tiles,
// kept as a Kahan pair (hi, lo: TwoSum, one update per tile, not per token); the tile's base
// hi + lo is what the checkpoint holds, and the backward forms P_t from it with the same
// operations (its sub-tile checkpoints hold Q). G in the backward likewise. The price: one more
// add per element and token (next to a GELU) and a few [k_h, d_h] passes per tile.
// Cost: GELU of all k_h d_h entries of P_t per token in the forward, GELU and GELU' in the
// backward, is the floor (benchmarks/README.md, "Causal modes side by side"); the loops are laid
// out for it:
//   - P and G (each part of them) are kept transposed, [d_h, k_h]: the inner loops run over k_h (long vectors), and
//     the sums over d_h that give dW1_t, dW2_t accumulate as vectors over k_h; only Y_t and dV_t
//     (d_h values per token) need a sum across the vector lanes;
//   - the backward recomputes a tile's states in sub-tiles of kScanSub tokens from checkpoints
//     every kScanSub tokens, so the states it walks back over (kScanSub [d_h, k_h] matrices) stay
//     in L2 instead of a whole tile's (4 MiB at k_h 128, d_h 32) going through memory.
inline bool starts_sequence(const BlockMap& bm, int64_t t) { return t == bm.nb() || bm.seq0[t] == t; }

// out [cols, rows] = in^T, in [rows, cols]
template <typename T>
void transpose_rect(const T* in, int64_t rows, int64_t cols, T* out) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = in[i * cols + j];
}

// Tokens per sub-tile of the backward's recomputation (above).
constexpr int64_t kScanSub = 16;

// Q^T [d_h, k_h] += v w1^T: one token's rank-1 update of the transposed state's tile part.
template <typename T>
inline void scan_rank1(T* __restrict__ Q, const T* __restrict__ v, const T* __restrict__ w1, int64_t dh, int64_t kh) {
  for (int64_t c = 0; c < dh; ++c) {
    T* __restrict__ row = Q + c * kh;
    const T vc = v[c];
#pragma omp simd
    for (int64_t j = 0; j < kh; ++j) row[j] += vc * w1[j];
  }
}

// (hi, lo) += q elementwise, compensated (TwoSum: hi + lo is the exact sum up to lo's rounding).
// Plain IEEE arithmetic (the build has no -ffast-math, which would reassociate it away).
template <typename T>
void kahan_add(T* __restrict__ hi, T* __restrict__ lo, const T* __restrict__ q, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T s = hi[i] + q[i];
    const T bp = s - hi[i];
    lo[i] += (hi[i] - (s - bp)) + (q[i] - bp);
    hi[i] = s;
  }
}

// base = hi + lo (the running sum before this tile), q = 0 (the tile's own terms)
template <typename T>
void start_tile(const T* __restrict__ hi, const T* __restrict__ lo, T* __restrict__ base, T* __restrict__ q,
                int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) base[i] = hi[i] + lo[i];
  std::fill(q, q + n, T(0));
}

template <typename T>
void zero_all(std::initializer_list<T*> arrays, int64_t n) {
  for (T* a : arrays) std::fill(a, a + n, T(0));
}

// Per-thread buffers of the scan: both generators' tiles.
template <typename T>
struct ScanBuffers {
  TileBuffers<T> buf;
  Buffer<T> zk, zq, hid1, gd1, hid2, gd2, w1, w2, dw1, dw2;
  // running state P^T = base + Q [d_h, k_h]: hi, lo (sum of the finished tiles, compensated),
  // base (this tile's, hi + lo), Q (the tile's own tokens); the same four for the running
  // gradient G^T. Backward: the tile's base as checkpointed (Pt0), the sub-tile checkpoints of Q
  // (before every kScanSub-th token of the tile) and one sub-tile's states P_t^T
  Buffer<T> P, Plo, Pb, Pq, G, Glo, Gb, Gq, Pt0, ck, pt;
  Buffer<T> zero;  // [d_h] zeros: a padded token's value row (selected, not multiplied)
  std::vector<char> base_live;  // per sub-tile: the tile's base still holds at its start (no restart before)
  ScanBuffers(int64_t d, int64_t dh, int64_t kh, bool backward)
      : buf(d, dh), zk(kCpuTile * d), zq(kCpuTile * d), hid1(kCpuTile * dh), gd1(kCpuTile * dh),
        hid2(kCpuTile * dh), gd2(kCpuTile * dh), w1(kCpuTile * kh), w2(kCpuTile * kh),
        dw1(backward ? kCpuTile * kh : 1), dw2(backward ? kCpuTile * kh : 1), P(kh * dh), Plo(kh * dh),
        Pb(kh * dh), Pq(kh * dh), G(backward ? kh * dh : 1), Glo(backward ? kh * dh : 1),
        Gb(backward ? kh * dh : 1), Gq(backward ? kh * dh : 1), Pt0(backward ? kh * dh : 1),
        ck(backward ? num_tiles(kCpuTile, kScanSub) * kh * dh : 1), pt(backward ? kScanSub * kh * dh : 1),
        zero(dh), base_live(num_tiles(kCpuTile, kScanSub)) {
    zero.zero();
  }
};

// One generator on a tile: hid = m GELU(z fc1^T + b1) (and GELU' with grad) into hid / gd, and
// W = hid fc2^T + m b2 [T, k_h] into w.
template <typename T>
void scan_generator(const Mm<T>& mm, const HeadWeights<T>& w, const Stream<T>& st, const BlockMap& bm, int64_t t0,
                    int64_t tn, int64_t h, int64_t dh, int64_t kh, int64_t d, bool grad, T* z, TileBuffers<T>& buf,
                    T* hid, T* gd, T* wout) {
  load_z(st, bm, t0, tn, h * dh, (h + 1) * dh, d, z);
  hidden(mm, w, st, t0, tn, dh, z + h * dh, d, buf, grad);
  std::memcpy(hid, buf.hd.data(), tn * dh * sizeof(T));
  if (grad) std::memcpy(gd, buf.gd.data(), tn * dh * sizeof(T));
  // [T, d_h] @ [d_h, k_h] -> [T, k_h]
  mm(false, true, tn, kh, dh, hid, dh, w.fc2_w, dh, wout, kh, false);
  if (!w.fc2_b) return;
  for (int64_t t = 0; t < tn; ++t) {
    const T mt = st.m(t0 + t);
    T* wt = wout + t * kh;
#pragma omp simd
    for (int64_t j = 0; j < kh; ++j) wt[j] += mt * w.fc2_b[j];
  }
}

// Both generators on tile [t0, t0 + tn) of (b, h): W1 from the keys into sb.w1 (hidden layer in
// sb.hid1 / sb.gd1, z in sb.zk), W2 from the queries into sb.w2 (sb.hid2 / sb.gd2, sb.zq).
template <typename T>
void scan_generators(const Mm<T>& mm, const ProblemParams& pb, const BlockMap& bm, const Stream<T>& ks,
                     const Stream<T>& qs, int64_t h, int64_t t0, int64_t tn, bool grad, ScanBuffers<T>& sb) {
  const int64_t dh = pb.d_h, kh = pb.k_h, d = pb.d;
  scan_generator(mm, head_weights<T>(pb.g1, h, dh, kh), ks, bm, t0, tn, h, dh, kh, d, grad, sb.zk.data(), sb.buf,
                 sb.hid1.data(), sb.gd1.data(), sb.w1.data());
  scan_generator(mm, head_weights<T>(pb.g2, h, dh, kh), qs, bm, t0, tn, h, dh, kh, d, grad, sb.zq.data(), sb.buf,
                 sb.hid2.data(), sb.gd2.data(), sb.w2.data());
}

template <typename T>
void scan_forward_impl(const ForwardParams& fp, GemmFn<T> gemm, int nthreads) {
  const ProblemParams& pb = fp.pb;
  const int64_t B = pb.B, H = pb.H, N = pb.N, dh = pb.d_h, kh = pb.k_h, d = pb.d, psz = kh * dh;
  const int64_t tiles = num_tiles(N, kCpuTile), NB = pb.num_blocks;
  const Mm<T> mm{gemm};
  const BlockMap bm = make_blocks(pb);
  T* p = static_cast<T*>(fp.p);
  T* y = static_cast<T*>(fp.y);
#pragma omp parallel num_threads(nthreads)
  {
    ScanBuffers<T> sb(d, dh, kh, false);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const Stream<T> ks = make_stream<T>(pb, pb.k, pb.k_bstride, pb.k_rstride, pb.pe_k, pb.m_k, N, b);
      const Stream<T> qs = make_stream<T>(pb, pb.q, pb.q_bstride, pb.q_rstride, pb.pe_q, pb.m_q, N, b);
      const T* vx = static_cast<const T*>(pb.v) + b * pb.v_bstride + h * dh;
      T *P = sb.P.data(), *Plo = sb.Plo.data(), *Pb = sb.Pb.data(), *Pq = sb.Pq.data();  // [d_h, k_h]
      zero_all({P, Plo}, psz);
      // a carried state P_0^T [d_h, k_h] (streaming), already the scan's layout: the scan starts from it
      if (fp.p_init) std::memcpy(P, static_cast<const T*>(fp.p_init) + bh * psz, psz * sizeof(T));
      std::fill(p + (bh * NB + tiles) * psz, p + (bh + 1) * NB * psz, T(0));  // unused slots
      for (int64_t ti = 0; ti < tiles; ++ti) {
        const int64_t t0 = ti * kCpuTile, tn = std::min(kCpuTile, N - t0);
        start_tile(P, Plo, Pb, Pq, psz);
        transpose_rect(Pb, dh, kh, p + (bh * NB + ti) * psz);  // checkpoint: P [k_h, d_h] before t0
        scan_generators(mm, pb, bm, ks, qs, h, t0, tn, false, sb);
        for (int64_t t = t0; t < t0 + tn; ++t) {
          if (starts_sequence(bm, t) && !(t == 0 && fp.p_init)) zero_all({P, Plo, Pb, Pq}, psz);
          const T* __restrict__ v = ks.m(t) == T(0) ? sb.zero.data() : vx + t * pb.v_rstride;  // select
          const T* __restrict__ w1 = sb.w1.data() + (t - t0) * kh;
          const T* __restrict__ w2 = sb.w2.data() + (t - t0) * kh;
          T* __restrict__ yt = y + (b * N + t) * d + h * dh;
          for (int64_t c = 0; c < dh; ++c) {  // Y_t[c] = sum_j W2_t[j] GELU(P_t[j, c])
            T* __restrict__ qrow = Pq + c * kh;
            const T* __restrict__ brow = Pb + c * kh;
            const T vc = v[c];
            T acc = T(0);
#pragma omp simd reduction(+ : acc)
            for (int64_t j = 0; j < kh; ++j) {
              qrow[j] += vc * w1[j];
              acc += w2[j] * gelu(brow[j] + qrow[j]);
            }
            yt[c] = acc;
          }
        }
        kahan_add(P, Plo, Pq, psz);
      }
      T* fin = p + (bh * NB + NB - 1) * psz;  // the last slot: the state after the last token, P^T
#pragma omp simd
      for (int64_t i = 0; i < psz; ++i) fin[i] = P[i] + Plo[i];
    }
  }
}

template <typename T>
void scan_backward_impl(const BackwardParams& bp, GemmFn<T> gemm, int nthreads) {
  const ProblemParams& pb = bp.pb;
  const int64_t B = pb.B, H = pb.H, N = pb.N, dh = pb.d_h, kh = pb.k_h, d = pb.d, psz = kh * dh;
  const int64_t tiles = num_tiles(N, kCpuTile), NB = pb.num_blocks, gsq = dh * dh, fsz = kh * dh + kh;
  const int64_t f1sz = Fc1Partial<T>::size(dh);
  const Mm<T> mm{gemm};
  const BlockMap bm = make_blocks(pb);
  const T* p = static_cast<const T*>(bp.p);
  const T* dy = static_cast<const T*>(bp.dy);
  T* dq = static_cast<T*>(bp.dq);
  T* dk = static_cast<T*>(bp.dk);
  T* dv = static_cast<T*>(bp.dv);
  const bool carried = bp.dp_init != nullptr;  // the forward started from a carried state
  // per (b, h): fc1 partials (one "chunk") and fc2 gradients of each generator; summed over b after
  std::vector<T> fc1_1(B * H * f1sz, T(0)), fc1_2(B * H * f1sz, T(0));
  std::vector<T> fc2_1(B * H * fsz, T(0)), fc2_2(B * H * fsz, T(0));
  const std::vector<T> fc1t_1 = fc1_transposed<T>(pb.g1, H, dh), fc1t_2 = fc1_transposed<T>(pb.g2, H, dh);
#pragma omp parallel num_threads(nthreads)
  {
    ScanBuffers<T> sb(d, dh, kh, true);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const Stream<T> ks = make_stream<T>(pb, pb.k, pb.k_bstride, pb.k_rstride, pb.pe_k, pb.m_k, N, b);
      const Stream<T> qs = make_stream<T>(pb, pb.q, pb.q_bstride, pb.q_rstride, pb.pe_q, pb.m_q, N, b);
      const T* vx = static_cast<const T*>(pb.v) + b * pb.v_bstride + h * dh;
      const HeadWeights<T> g1 = head_weights<T>(pb.g1, h, dh, kh), g2 = head_weights<T>(pb.g2, h, dh, kh);
      // G^T [d_h, k_h]: hi, lo, base, tile terms; P^T's base and tile terms
      T *G = sb.G.data(), *Glo = sb.Glo.data(), *Gb = sb.Gb.data(), *Gq = sb.Gq.data();
      T *Pb = sb.Pb.data(), *Pq = sb.Pq.data(), *Pt0 = sb.Pt0.data();
      auto value_row = [&](int64_t t) -> const T* {  // select: a padded token reads a zero row
        return ks.m(t) == T(0) ? sb.zero.data() : vx + t * pb.v_rstride;
      };
      // the gradient of the last slot (the state after the last token, P^T) starts the reverse
      // scan; the checkpoints' own gradients are not used (they are saved intermediates)
      const T* dfin = bp.dp_extra ? static_cast<const T*>(bp.dp_extra) + (bh * NB + NB - 1) * psz : nullptr;
      auto reset_g = [&]() {  // G (= hi + lo = base + tile terms) restarts from the last slot's gradient
        zero_all({G, Glo, Gq}, psz);
        if (dfin) std::memcpy(G, dfin, psz * sizeof(T));
        std::memcpy(Gb, G, psz * sizeof(T));
      };
      reset_g();
      for (int64_t ti = tiles - 1; ti >= 0; --ti) {
        const int64_t t0 = ti * kCpuTile, tn = std::min(kCpuTile, N - t0);
        scan_generators(mm, pb, bm, ks, qs, h, t0, tn, true, sb);
        // the tile's base from its checkpoint; checkpoints of Q every kScanSub tokens of the tile
        // (with whether a sequence restart before them zeroed the base), the forward's operations
        transpose_rect(p + (bh * NB + ti) * psz, kh, dh, Pt0);
        std::fill(Pq, Pq + psz, T(0));
        bool live = true;
        const int64_t subs = num_tiles(tn, kScanSub);
        for (int64_t si = 0; si < subs; ++si) {
          std::memcpy(sb.ck.data() + si * psz, Pq, psz * sizeof(T));
          sb.base_live[si] = live;
          if (si + 1 == subs) break;
          for (int64_t t = t0 + si * kScanSub; t < t0 + (si + 1) * kScanSub; ++t) {
            if (starts_sequence(bm, t) && !(t == 0 && carried)) {
              std::fill(Pq, Pq + psz, T(0));
              live = false;
            }
            scan_rank1(Pq, value_row(t), sb.w1.data() + (t - t0) * kh, dh, kh);
          }
        }
        // reverse scan: G_t = base + Q_t likewise (base: the later tiles' sum)
        start_tile(G, Glo, Gb, Gq, psz);
        for (int64_t si = subs - 1; si >= 0; --si) {
          const int64_t s0 = t0 + si * kScanSub, s1 = std::min(t0 + tn, s0 + kScanSub);
          // the sub-tile's states P_t = base + Q_t, from its checkpoint
          std::memcpy(Pq, sb.ck.data() + si * psz, psz * sizeof(T));
          if (sb.base_live[si])
            std::memcpy(Pb, Pt0, psz * sizeof(T));
          else
            std::fill(Pb, Pb + psz, T(0));
          for (int64_t t = s0; t < s1; ++t) {
            if (starts_sequence(bm, t) && !(t == 0 && carried)) zero_all({Pb, Pq}, psz);
            const T* __restrict__ v = value_row(t);
            const T* __restrict__ w1 = sb.w1.data() + (t - t0) * kh;
            T* __restrict__ ps = sb.pt.data() + (t - s0) * psz;
            for (int64_t c = 0; c < dh; ++c) {
              T* __restrict__ qrow = Pq + c * kh;
              const T* __restrict__ brow = Pb + c * kh;
              T* __restrict__ prow = ps + c * kh;
              const T vc = v[c];
#pragma omp simd
              for (int64_t j = 0; j < kh; ++j) {
                qrow[j] += vc * w1[j];
                prow[j] = brow[j] + qrow[j];
              }
            }
          }
          for (int64_t t = s1 - 1; t >= s0; --t) {
            if (starts_sequence(bm, t + 1)) {  // t ends its sequence
              if (t + 1 == N)
                reset_g();  // the row's last token: G starts from the last slot's gradient
              else
                zero_all({G, Glo, Gb, Gq}, psz);
            }
            const T* __restrict__ v = value_row(t);
            const T* __restrict__ g = dy + (b * N + t) * d + h * dh;
            const T* __restrict__ w1 = sb.w1.data() + (t - t0) * kh;
            const T* __restrict__ w2 = sb.w2.data() + (t - t0) * kh;
            T* __restrict__ dw1 = sb.dw1.data() + (t - t0) * kh;
            T* __restrict__ dw2 = sb.dw2.data() + (t - t0) * kh;
            const T* pt = sb.pt.data() + (t - s0) * psz;
            T* __restrict__ dvt = dv + (b * N + t) * d + h * dh;
            std::fill(dw1, dw1 + kh, T(0));
            std::fill(dw2, dw2 + kh, T(0));
            for (int64_t c = 0; c < dh; ++c) {
              const T* __restrict__ prow = pt + c * kh;
              T* __restrict__ qrow = Gq + c * kh;
              const T* __restrict__ brow = Gb + c * kh;
              const T gc = g[c], vc = v[c];
              T dvc = T(0);
#pragma omp simd reduction(+ : dvc)
              for (int64_t j = 0; j < kh; ++j) {
                T a, ad;
                gelu_both(prow[j], &a, &ad);
                dw2[j] += a * gc;                // dW2_t = GELU(P_t) dY_t
                qrow[j] += w2[j] * gc * ad;      // G += dP_t
                const T gj = brow[j] + qrow[j];  // G_t
                dw1[j] += gj * vc;               // dW1_t = G v_t
                dvc += w1[j] * gj;               // dV_t = G^T W1_t
              }
              dvt[c] = dvc;
            }
          }
        }
        kahan_add(G, Glo, Gq, psz);
        // the generators' backward: dW masked (W = m (hid fc2^T + b2)), dhid = dW fc2,
        // dfc2 += dW^T hid, db2 += sum dW, then the fc1 chain
        struct Side {
          const HeadWeights<T>& w;
          const Stream<T>& st;
          T* dw;
          const T* hid;
          const T* gd;
          const T* z;
          const T* fc1t;
          T* fc1p;
          T* fc2p;
          T* dx;
        };
        const Side sides[2] = {
            {g1, ks, sb.dw1.data(), sb.hid1.data(), sb.gd1.data(), sb.zk.data(), fc1t_1.data() + h * gsq,
             fc1_1.data() + bh * f1sz, fc2_1.data() + bh * fsz, dk + (b * N + t0) * d + h * dh},
            {g2, qs, sb.dw2.data(), sb.hid2.data(), sb.gd2.data(), sb.zq.data(), fc1t_2.data() + h * gsq,
             fc1_2.data() + bh * f1sz, fc2_2.data() + bh * fsz, dq + (b * N + t0) * d + h * dh}};
        for (const Side& sd : sides) {
          if (sd.st.mask)
            for (int64_t t = 0; t < tn; ++t) {
              const T mt = sd.st.m(t0 + t);
#pragma omp simd
              for (int64_t j = 0; j < kh; ++j) sd.dw[t * kh + j] *= mt;
            }
          // dhid = dW fc2: [T, k_h] @ [k_h, d_h] -> [T, d_h]
          mm(false, false, tn, dh, kh, sd.dw, kh, sd.w.fc2_w, dh, sb.buf.dhd.data(), dh, false);
          // dfc2 += dW^T hid: [k_h, T] @ [T, d_h] -> [k_h, d_h]; db2 += sum_t dW_t
          mm(true, false, kh, dh, tn, sd.dw, kh, sd.hid, dh, sd.fc2p, dh, true);
          add_rows(sd.dw, kh, tn, kh, static_cast<const T*>(nullptr), sd.fc2p + kh * dh);
          std::memcpy(sb.buf.gd.data(), sd.gd, tn * dh * sizeof(T));
          Fc1Partial<T> f1(sd.fc1p, dh);
          fc1_backward(mm, sd.fc1t, tn, dh, sd.st.scale, sd.z + h * dh, d, sb.buf, f1, sd.dx, d);
        }
      }
      if (carried) {  // the carried state entered every P_t: its gradient is G after the first token
        T* di = static_cast<T*>(bp.dp_init) + bh * psz;
#pragma omp simd
        for (int64_t i = 0; i < psz; ++i) di[i] = G[i] + Glo[i];
      }
    }
  }
  reduce_generator_grads<T>(fc1_1, fc2_1, B, H, 1, dh, kh, bp.dg1, nthreads);
  reduce_generator_grads<T>(fc1_2, fc2_2, B, H, 1, dh, kh, bp.dg2, nthreads);
}
// ---- chunked mixing: the per-(b, h) block stages, in groups of blocks ---------------------------
// Everything k_h-wide of a (b, h) (P_j^T, A_j^T, dA_j^T, dP_j^T: [d_h, k_h] per block) runs over
// groups of block_group() consecutive blocks, in block order, each group's products and GELU
// reading and writing stacks of the group only. All blocks at once, those stacks grew with N (4 MiB
// per head and stack at N 8192, C 32, d_h 32, k_h 128) and every pass over them (the product, the
// bias, GELU, the c0 product) went to memory: the chunked modes' time over the non-causal one grew
// with N. A group's stacks fit the core's L2, so only the op's state P (written once, read once)
// and dP (the same) stream through memory. The group size depends on d_h, k_h and the type only,
// never on the thread count: the products and their sums are the same for any thread count.
template <typename T>
int64_t block_group(int64_t dh, int64_t kh) {
  constexpr int64_t kGroupBytes = int64_t(128) << 10;  // per [G * d_h, k_h] stack
  return std::max<int64_t>(1, kGroupBytes / (static_cast<int64_t>(sizeof(T)) * dh * kh));
}

// Per-thread buffers of the block stages: window sums of every block of one (b, h) (d_h^2 + d_h
// values per block: a quarter of a k_h-wide stack at d_h 32, k_h 128) and one group's stacks.
template <typename T>
struct BlockStageBuffers {
  int64_t G;
  Buffer<T> win, rb, rtp, r0p;   // [nb][...] of one (b, h)
  Buffer<T> st, sv, at, ct;      // one group
  BlockStageBuffers(int64_t nb, int64_t dh, int64_t kh)
      : G(block_group<T>(dh, kh)), win(nb * state_size(dh)), rb(nb * state_size(dh)), rtp(nb * dh * dh),
        r0p(nb * dh), st(G * dh * dh), sv(G * dh), at(G * kh * dh), ct(G * dh * dh) {}
};

// Own partial states (ForwardParams::p_init, one term per block): out = sum of q_i over block j's
// window (i = first[j] .. j, in block order) + term, n values each; q [nb][n].
template <typename T>
void own_window(const T* q, const BlockMap& bm, int64_t j, int64_t n, const T* term, T* out) {
  std::memcpy(out, q + bm.first[j] * n, n * sizeof(T));
  for (int64_t i = bm.first[j] + 1; i <= j; ++i) {
    const T* __restrict__ qi = q + i * n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) out[c] += qi[c];
  }
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] += term[c];
}

// Forward, one (b, h): from the block token sums blk ([nb][d_h^2 + d_h] of this (b, h)), per
// block j: P_j^T = (fc2 S_j + b2 sv_j^T)^T over the window sums, plus a carried state pi (or
// nullptr; ForwardParams::p_init of this (b, h): n_init 0, one [d_h, k_h] term for every block,
// else one per block), written to pt ([NB][d_h, k_h], the op's state; slots past nb zeroed),
// A = GELU(P), C_j^T = A^T fc2_2 into cmt [nb][d_h, d_h] and c0_j = A^T b2_2 into c0 [nb][d_h].
// With one term per block (n_init > 0) pt gets each block's own Q_j^T instead, and P_j^T =
// own_window(Q) + E_j is formed in the group's stack (hmx_params.h, ForwardParams::p_init).
template <typename T>
void forward_block_stage(const ProblemParams& pb, const Mm<T>& mm, const BlockMap& bm, int64_t h, const T* blk,
                         const T* pi, int64_t n_init, T* pt, T* cmt, T* c0, BlockStageBuffers<T>& sb) {
  const int64_t dh = pb.d_h, kh = pb.k_h, nb = bm.nb(), psz = kh * dh, gsq = dh * dh, ssz = state_size(dh);
  const HeadWeights<T> w1 = head_weights<T>(pb.g1, h, dh, kh), w2 = head_weights<T>(pb.g2, h, dh, kh);
  const bool own = pi && n_init > 0;
  if (!own) window_sums(blk, bm, ssz, false, sb.win.data());
  std::fill(pt + nb * psz, pt + pb.num_blocks * psz, T(0));  // unused block slots
  for (int64_t j0 = 0; j0 < nb; j0 += sb.G) {
    const int64_t g = std::min(sb.G, nb - j0), n = g * psz;
    stack_rows((own ? blk : sb.win.data()) + j0 * ssz, g, dh, sb.st.data(), sb.sv.data());
    T* __restrict__ pj = pt + j0 * psz;
    expand_fc2(mm, w1, sb.st.data(), sb.sv.data(), g * dh, dh, kh, pj);  // P_j^T, or own: Q_j^T
    T* __restrict__ a = sb.at.data();
    if (own) {  // P_j^T = the window's Q^T (earlier groups' and this one's) + E_j, then GELU in place
      for (int64_t j = 0; j < g; ++j) own_window(pt, bm, j0 + j, psz, pi + (j0 + j) * psz, a + j * psz);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) a[i] = gelu(a[i]);
    } else {
      for (int64_t j = 0; pi && j < g; ++j) {  // a carried state in every block's window
        T* __restrict__ pjj = pj + j * psz;
#pragma omp simd
        for (int64_t i = 0; i < psz; ++i) pjj[i] += pi[i];
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) a[i] = gelu(pj[i]);
    }
    fold_fc2(mm, w2, a, g * dh, dh, kh, cmt + j0 * gsq, c0 + j0 * dh);
  }
}

// Backward, one (b, h): C_j from the saved P_j^T (pt), transposed into cm [nb][d_h, d_h] (the
// query pass's right operand of dY C^T).
template <typename T>
void backward_block_c(const ProblemParams& pb, const Mm<T>& mm, int64_t nb, int64_t h, const T* pt, T* cm,
                      BlockStageBuffers<T>& sb) {
  const int64_t dh = pb.d_h, kh = pb.k_h, psz = kh * dh, gsq = dh * dh;
  const HeadWeights<T> w2 = head_weights<T>(pb.g2, h, dh, kh);
  for (int64_t j0 = 0; j0 < nb; j0 += sb.G) {
    const int64_t g = std::min(sb.G, nb - j0), n = g * psz;
    const T* __restrict__ pj = pt + j0 * psz;
    T* __restrict__ a = sb.at.data();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) a[i] = gelu(pj[i]);
    fold_fc2(mm, w2, a, g * dh, dh, kh, sb.ct.data(), static_cast<T*>(nullptr));
    for (int64_t j = 0; j < g; ++j) transpose(sb.ct.data() + j * gsq, dh, cm + (j0 + j) * gsq);
  }
}

// Backward, one (b, h), from the query sums tsum ([nb][d_h^2 + d_h]: T_j^T, sdy_j, summed over
// the ranks) and town (this rank's own, the same pointer without sequence parallelism): per block
// dA_j^T = T_j^T fc2_2^T + sdy_j b2_2^T, dP_j^T = dA_j^T * GELU'(P_j^T) (+ de_j, the saved state's
// own gradient, BackwardParams::dp_extra of this (b, h), or nullptr) into dpt [nb][d_h, k_h];
// with di (BackwardParams::dp_init of this (b, h)) the carried state's gradient: n_init 0, the
// sum of dP_j^T over the blocks in block order, else each block's own;
// generator-2 fc2 gradients g2 (dfc2_2 = sum_j A_j T_j^T, then db2_2 = sum_j A_j sdy_j, own
// queries); R'_j^T = dP_j^T fc2, r0'_j = dP_j^T b2 (with a bias); then R_j, r0_j = the reverse
// window sums of R', r0', into rk [nb][d_h^2 + d_h] (R^T, r0) and cm [nb][d_h, d_h] (R).
template <typename T>
void backward_block_grads(const ProblemParams& pb, const Mm<T>& mm, const BlockMap& bm, int64_t h, const T* pt,
                          const T* tsum, const T* town, const T* de, T* di, int64_t n_init, T* dpt, T* g2, T* rk,
                          T* cm, BlockStageBuffers<T>& sb) {
  const int64_t dh = pb.d_h, kh = pb.k_h, nb = bm.nb(), psz = kh * dh, gsq = dh * dh, ssz = state_size(dh);
  const HeadWeights<T> w2 = head_weights<T>(pb.g2, h, dh, kh), w1 = head_weights<T>(pb.g1, h, dh, kh);
  T* rtp = sb.rtp.data();
  T* r0p = sb.r0p.data();
  if (!w1.fc2_b) std::fill(r0p, r0p + nb * dh, T(0));  // fold_fc2 leaves r0' alone then
  for (int64_t j0 = 0; j0 < nb; j0 += sb.G) {
    const int64_t g = std::min(sb.G, nb - j0), n = g * psz, rows = g * dh;
    const bool acc = j0 > 0;  // generator-2 fc2 gradients: summed over the groups in order
    stack_rows(tsum + j0 * ssz, g, dh, sb.st.data(), sb.sv.data());
    T* __restrict__ dp = dpt + j0 * psz;
    expand_fc2(mm, w2, sb.st.data(), sb.sv.data(), rows, dh, kh, dp);  // dA^T
    const T* __restrict__ pj = pt + j0 * psz;
    T* __restrict__ a = sb.at.data();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      T ga, gd;
      gelu_both(pj[i], &ga, &gd);
      a[i] = ga;
      dp[i] *= gd;
    }
    if (de && n_init == 0) {  // the saved state's own gradient (streaming: the next piece's carried state)
      const T* __restrict__ dej = de + j0 * psz;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dp[i] += dej[i];
    }
    if (town != tsum) stack_rows(town + j0 * ssz, g, dh, sb.st.data(), sb.sv.data());
    // dfc2_2 (+)= A^T-stack^T T-stack: [k_h, rows] @ [rows, d_h]; db2_2 (+)= [k_h, rows] @ [rows]
    mm(true, false, kh, dh, rows, a, kh, sb.st.data(), dh, g2, dh, acc);
    mm(true, false, kh, 1, rows, a, kh, sb.sv.data(), 1, g2 + kh * dh, 1, acc);
    fold_fc2(mm, w1, dp, rows, dh, kh, rtp + j0 * gsq, r0p + j0 * dh);  // R'^T, r0'
  }
  if (di) {  // the carried state's gradient: per block its dP, or the sum over the blocks in block order
    std::copy(dpt, dpt + (n_init == 0 ? psz : nb * psz), di);
    for (int64_t j = 1; n_init == 0 && j < nb; ++j) {
      const T* __restrict__ dj = dpt + j * psz;
#pragma omp simd
      for (int64_t i = 0; i < psz; ++i) di[i] += dj[i];
    }
  }
  T* rb = sb.rb.data();
  for (int64_t j = 0; j < nb; ++j) {
    std::memcpy(rb + j * ssz, rtp + j * gsq, gsq * sizeof(T));
    std::memcpy(rb + j * ssz + gsq, r0p + j * dh, dh * sizeof(T));
  }
  window_sums(rb, bm, ssz, true, rk);
  if (de && n_init > 0) {  // own partial states: their gradient enters block j's own sums only
    for (int64_t j0 = 0; j0 < nb; j0 += sb.G) {
      const int64_t g = std::min(sb.G, nb - j0);
      fold_fc2(mm, w1, de + j0 * psz, g * dh, dh, kh, sb.ct.data(), sb.sv.data());
      for (int64_t j = 0; j < g; ++j) {
        T* __restrict__ r = rk + (j0 + j) * ssz;
        const T* __restrict__ x = sb.ct.data() + j * gsq;
#pragma omp simd
        for (int64_t i = 0; i < gsq; ++i) r[i] += x[i];
        if (!w1.fc2_b) continue;
        const T* __restrict__ x0 = sb.sv.data() + j * dh;
#pragma omp simd
        for (int64_t i = 0; i < dh; ++i) r[gsq + i] += x0[i];
      }
    }
  }
  for (int64_t j = 0; j < nb; ++j) transpose(rk + j * ssz, dh, cm + j * gsq);  // R_j (C is no longer needed)
}

// Backward, one (b, h): generator-1 fc2 gradients g1 = (dfc2 = sum_j dP_j S_j^T, db2 = sum_j
// dP_j sv_j) from dpt [nb][d_h, k_h] and the window sums of the key pass's token sums (pieces).
// With own partial states (de: their gradient [nb][d_h, k_h], or nullptr) also + sum_j de_j Sblk_j^T,
// + sum_j de_j svblk_j over the blocks' own token sums.
template <typename T>
void backward_block_fc2(const ProblemParams& pb, const Mm<T>& mm, const BlockMap& bm, const Pieces& pc,
                        const T* part, const T* dpt, const T* de, T* g1, BlockStageBuffers<T>& sb, T* blk, T* st,
                        T* sv) {
  const int64_t dh = pb.d_h, kh = pb.k_h, nb = bm.nb(), psz = kh * dh, gsq = dh * dh;
  state_windows(part, pc, bm, dh, blk, sb.win.data(), st, sv);
  for (int64_t j0 = 0; j0 < nb; j0 += sb.G) {
    const int64_t g = std::min(sb.G, nb - j0), rows = g * dh;
    const bool acc = j0 > 0;
    mm(true, false, kh, dh, rows, dpt + j0 * psz, kh, st + j0 * gsq, dh, g1, dh, acc);
    mm(true, false, kh, 1, rows, dpt + j0 * psz, kh, sv + j0 * dh, 1, g1 + kh * dh, 1, acc);
  }
  if (!de) return;
  stack_rows(blk, nb, dh, st, sv);  // the blocks' own token sums
  for (int64_t j0 = 0; j0 < nb; j0 += sb.G) {
    const int64_t g = std::min(sb.G, nb - j0), rows = g * dh;
    mm(true, false, kh, dh, rows, de + j0 * psz, kh, st + j0 * gsq, dh, g1, dh, true);
    mm(true, false, kh, 1, rows, de + j0 * psz, kh, sv + j0 * dh, 1, g1 + kh * dh, 1, true);
  }
}
