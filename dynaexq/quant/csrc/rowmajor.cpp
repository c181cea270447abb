// Grouped matmuls for row-major weights on the CPU: int8 codes with a per-row scale and offset correction
// (quant.kernels.Int8Cpu: W = scale * q + corr, so x @ W^T = scale * (x @ q^T) + sum(x) * corr) and plain
// fp32/bf16/fp16 weights. One call computes every routed row of every expert of one tier (the grouped driver
// of simd.h), accumulating in fp32 and rounding once into x's dtype. Tiles: MT rows of x x NR weight rows, the
// weights converted to floats in registers (int8: 2 ops per 16, bf16: 2) and FMA'd along K; a unit is 64
// output rows. Registered as torch.ops.dynaexq.rowmajor_grouped (ops.cpp), called by quant/grouped_cpu.py.
#include "simd.h"

#if ISA
enum { W_INT8 = 3 };  // weight kinds: the dtype codes F32 / BF16 / F16, or int8 codes
constexpr int NR = 4, MT = 4, UNIT = 64;

struct RArgs {
  int N, K, ydt;
  const char* w;          // [N, K] weights (their kind: rm_tile's WT)
  const uint16_t* scale;  // int8: [N] bf16
  const uint16_t* corr;   // int8: [N] fp16
};

template <int WT>
static inline vf load_w(const char* p) {
  if constexpr (WT == W_INT8) return vf_load_i8(p);
  else if constexpr (WT == BF16) return vf_load_bf16(p);
  else if constexpr (WT == F16) return vf_load_ph(p);
  else return vf_load((const float*)p);
}

// rows m0..m0+mt of x (fp32 [m, K], row sums xs) times weight rows n0..n0+NR -> y rows (dtype ydt)
template <int WT, int M>
static void rm_tile(const RArgs& a, const float* x, const float* xs, char* y, int n0, int m0) {
  constexpr int WB = WT == W_INT8 ? 1 : WT == F32 ? 4 : 2;  // bytes per weight
  vf acc[M][NR];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = vf_zero();
  const char* w = a.w + (long)n0 * a.K * WB;
  // the tile reads NR rows as NR short interleaved streams, which the hardware prefetcher follows poorly
  // (measured on Zen 4: 10.7 GB/s on one core): prefetch the next tile's bytes in address order, NR * WB / 4
  // lines per step, so they arrive as this tile ends (22.6 GB/s, 28.6 on two cores against 29.6 for a sum)
  constexpr int PF = NR * WB / 4;
  const char* next = w + (long)NR * a.K * WB;
  for (int k = 0; k < a.K; k += 16) {
    for (int l = 0; l < PF; ++l) _mm_prefetch(next + ((long)(k / 16) * PF + l) * 64, _MM_HINT_T0);
    vf wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = load_w<WT>(w + ((long)r * a.K + k) * WB);
    for (int m = 0; m < M; ++m) {
      const vf xv = vf_load(x + (long)(m0 + m) * a.K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = vf_fma(xv, wv[r], acc[m][r]);
    }
  }
  const int es = a.ydt == F32 ? 4 : 2;
  for (int r = 0; r < NR; ++r) {
    const int n = n0 + r;
    float s = 1, c = 0;
    if constexpr (WT == W_INT8) { s = bf16_value(a.scale[n]); c = _cvtsh_ss(a.corr[n]); }
    for (int m = 0; m < M; ++m) {
      float v = vf_hsum(acc[m][r]);
      if constexpr (WT == W_INT8) v = v * s + xs[m0 + m] * c;
      store1(y + ((long)(m0 + m) * a.N + n) * es, a.ydt, v);
    }
  }
}

#if defined(__AVX512BF16__)
// bf16 weights times a bf16 x of 1-2 rows (decode): the weights' natural pairs (k, k + 1) against x's, one
// vdpbf16ps per 32 weights (the fp32 tile: 4 converts and 2 FMAs), the products exact as in the fp32 tile (only
// the fp32 summation order differs). Same prefetch as rm_tile. Fewer instructions per byte: it pays where the
// bytes come fast (measured on a Xeon with AVX512-BF16, 2 threads, at 1 row: 4096 x 2048 from its 480 MiB L3
// 22-25 vs 17-19 GB/s; from DRAM, `bench/kernels.py --dense`, 670-750 vs 684-780 us: there both run at the
// memory's ~25 GB/s).
template <int M>
static void rm_tile_pairs(const RArgs& a, const uint16_t* x, char* y, int n0, int m0) {
  __m512 acc[M][NR];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const char* w = a.w + (long)n0 * a.K * 2;
  const char* next = w + (long)NR * a.K * 2;
  for (int k = 0; k < a.K; k += 32) {
    for (int l = 0; l < NR; ++l) _mm_prefetch(next + ((long)(k / 32) * NR + l) * 64, _MM_HINT_T0);
    __m512bh wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + ((long)r * a.K + k) * 2);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (long)(m0 + m) * a.K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) store1(y + ((long)(m0 + m) * a.N + n0 + r) * 2, a.ydt, _mm512_reduce_add_ps(acc[m][r]));
}
#endif

template <int WT>
static void rm_unit(const RArgs& a, const float* x, const float* xs, char* y, long rows, int u,
                    const uint16_t* xb = nullptr) {
#if defined(__AVX512BF16__)
  if constexpr (WT == BF16) {
    if (xb && rows <= 2 && a.K % 32 == 0) {  // x bf16: exact as pairs
      for (int n0 = u * UNIT; n0 < std::min(a.N, (u + 1) * UNIT); n0 += NR)
        if (rows == 2) rm_tile_pairs<2>(a, xb, y, n0, 0);
        else rm_tile_pairs<1>(a, xb, y, n0, 0);
      return;
    }
  }
#endif
  for (int n0 = u * UNIT; n0 < std::min(a.N, (u + 1) * UNIT); n0 += NR)
    for (long m0 = 0; m0 < rows; m0 += MT) {
      const long mt = std::min<long>(MT, rows - m0);
      if (mt == 4) rm_tile<WT, 4>(a, x, xs, y, n0, (int)m0);
      else if (mt == 3) rm_tile<WT, 3>(a, x, xs, y, n0, (int)m0);
      else if (mt == 2) rm_tile<WT, 2>(a, x, xs, y, n0, (int)m0);
      else rm_tile<WT, 1>(a, x, xs, y, n0, (int)m0);
    }
}
#endif

// Every expert of one tier: x [R, K] (dtype dt) holds the rows grouped by expert, counts[e] for expert e (e
// ascending, all E); ptrs [E, 3] holds per expert (weights, int8 scales, int8 corrections), weights 0 when e is
// not of this tier (its rows of y are left alone). wt: 3 int8 codes, else the weights' dtype code. N % 4 == 0,
// K % 16 == 0. y [R, N] in x's dtype. Returns 0, or -1 without a kernel or for a shape it does not take.
extern "C" int dynaexq_rowmajor_grouped(int wt, int N, int K, int E, const int64_t* counts, const int64_t* ptrs,
                                        const void* x, int dt, void* y, int nthreads) {
#if ISA
  if (N % NR || K % 16) return -1;
  std::vector<int64_t> weights(E);
  for (int e = 0; e < E; ++e) weights[e] = ptrs[3 * e];
  const int es = dt == F32 ? 4 : 2;
  grouped_rows(E, counts, weights.data(), K, 1, K, x, dt, (N + UNIT - 1) / UNIT, nthreads,
               [&](int e, long r0, long m, int u, const float* xf, const float* xs, long) {
    const RArgs a{N, K, dt, (const char*)ptrs[3 * e], (const uint16_t*)ptrs[3 * e + 1],
                  (const uint16_t*)ptrs[3 * e + 2]};
    char* yr = (char*)y + r0 * N * es;
    if (wt == W_INT8) rm_unit<W_INT8>(a, xf, xs, yr, m, u);
    else if (wt == BF16) rm_unit<BF16>(a, xf, xs, yr, m, u, dt == BF16 ? (const uint16_t*)x + r0 * K : nullptr);
    else if (wt == F16) rm_unit<F16>(a, xf, xs, yr, m, u);
    else rm_unit<F32>(a, xf, xs, yr, m, u);
  });
  return 0;
#else
  return -1;
#endif
}
