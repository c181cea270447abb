// The bank's dispatch and combine on the CPU, one call each per MoE layer (quant/grouped_cpu.py):
//   route:   routed (token, slot) pairs -> per-expert counts, the pairs grouped by expert (a stable counting sort:
//            tokens ascending within an expert), each pair's token row gathered; the routing statistics added.
//   combine: each pair's output times its routing weight (rounded to the model dtype), then each token's K
//            products added in ascending expert order, rounding after every add: the very arithmetic of
//            transformers' per-expert `index_add_` loop, in one pass.
#include "simd.h"

static inline float load1(const void* p, long i, int dt) {
  if (dt == F32) return ((const float*)p)[i];
  const uint16_t h = ((const uint16_t*)p)[i];
  return dt == BF16 ? bf16_value(h) : _cvtsh_ss(h);
}

// idx [T*K] experts, w [T*K] weights (dtype wdt), hidden [T, H] (dtype dt) -> counts [E], order [T*K] (pair of
// each grouped row), x [T*K, H] (dtype dt); token_counts [E] += counts, mass [E] += the pairs' weights (fp32,
// in pair order). Returns 0, or -1 for an expert index outside [0, E).
extern "C" int dynaexq_route(int T, int K, int E, int H, const int64_t* idx, const void* w, int wdt,
                             const void* hidden, int dt, int64_t* counts, int64_t* token_counts, float* mass,
                             int64_t* order, void* x, int nthreads) {
#if ISA
  const long R = (long)T * K, es = dt == F32 ? 4 : 2;
  for (long i = 0; i < R; ++i)
    if (idx[i] < 0 || idx[i] >= E) return -1;
  std::vector<int64_t> next(E, 0);
  for (int e = 0; e < E; ++e) counts[e] = 0;
  for (long i = 0; i < R; ++i) counts[idx[i]]++;
  for (int e = 1; e < E; ++e) next[e] = next[e - 1] + counts[e - 1];
  for (long i = 0; i < R; ++i) {
    order[next[idx[i]]++] = i;
    mass[idx[i]] += load1(w, i, wdt);
  }
  for (int e = 0; e < E; ++e) token_counts[e] += counts[e];
#pragma omp parallel for num_threads(nthreads) schedule(static) if (R * H > 65536)
  for (long r = 0; r < R; ++r)
    memcpy((char*)x + r * H * es, (const char*)hidden + (order[r] / K) * H * es, H * es);
  return 0;
#else
  return -1;
#endif
}

static inline vf round_to(vf a, int dt) {
  if (dt == BF16) return vf_round_bf16(a);
  if (dt == F16) {
    alignas(64) uint16_t h[16];
    vf_store_ph(h, a);
    return vf_load_ph(h);
  }
  return a;
}

static inline vf load16(const void* p, long i, int dt) {
  if (dt == F32) return vf_load((const float*)p + i);
  return dt == BF16 ? vf_load_bf16((const uint16_t*)p + i) : vf_load_ph((const uint16_t*)p + i);
}

// ys [T*K, H] grouped rows (order [T*K]: the pair of each row), idx/w [T, K] -> out [T, H], all in dtype dt but
// w (wdt). H % 16 == 0. Returns 0, or -1 without a kernel.
extern "C" int dynaexq_combine(int T, int K, int H, const int64_t* idx, const int64_t* order, const void* ys,
                               const void* w, int wdt, int dt, void* out, int nthreads) {
#if ISA
  if (H % 16 || K > 64) return -1;
  const long R = (long)T * K;
  std::vector<int64_t> row(R);
  for (long r = 0; r < R; ++r) row[order[r]] = r;
  const int es = dt == F32 ? 4 : 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if ((long)T * K * H > 65536)
  for (int t = 0; t < T; ++t) {
    int js[64];
    for (int j = 0; j < K; ++j) {  // the token's pairs in ascending expert order (insertion sort: K is small)
      int a = j;
      while (a > 0 && idx[(long)t * K + js[a - 1]] > idx[(long)t * K + j]) { js[a] = js[a - 1]; --a; }
      js[a] = j;
    }
    for (int h = 0; h < H; h += 16) {
      vf acc = vf_zero();
      for (int a = 0; a < K; ++a) {
        const long p = (long)t * K + js[a];
        const vf y = round_to(vf_mul(load16(ys, row[p] * H + h, dt), vf_set1(load1(w, p, wdt))), dt);
        acc = a ? round_to(vf_fma(vf_set1(1.0f), acc, y), dt) : y;
      }
      char* dst = (char*)out + ((long)t * H + h) * es;
      if (dt == F32) vf_store((float*)dst, acc);
      else if (dt == BF16) vf_store_bf16(dst, acc);
      else vf_store_ph(dst, acc);
    }
  }
  return 0;
#else
  return -1;
#endif
}
