// A decode step's queries and keys as transformers' Llama-family attention computes them, in one call: the
// per-head RMSNorm (Qwen3: q_norm / k_norm, round-first form, optional), the rotary embedding
// (x * cos + rotate_half(x) * sin), and the step's keys and values written into the KV cache at each row's
// position. Every operation rounds into the activation dtype where transformers' eager ops do (norm: round(x *
// inv), then round(w * that); rotary: round(x * cos), round(rotate_half(x) * sin), round(their sum)), so the
// results are the same bits; transformers' version is ~15 small ops, each paying a dispatch and, in a real
// decode step whose weight stream has just evicted their code and data from the caches, tens of microseconds.
//   q [B, Hq, D], k and v [B, Hkv, D]: contiguous, dtype dt; qn, kn: [D] norm weights or null; cos, sin [B, D];
//   keys, values [R, Hkv, C, D] contiguous buffers; rows, pos [B]: row b's cache row and position.
//   qo [B, Hq, D] receives the queries. Serial: the work is a few thousand elements a row.
#include <math.h>

#include "simd.h"

#if ISA
// one head x [D] (floats) -> normed (if w) and rotated, rounded as transformers does, into out (dtype dt)
__attribute__((optimize("fp-contract=off")))  // the rotary sum rounds its products first, as aten does
static void head(float* x, int D, int dt, const float* w, float eps, const float* c, const float* s, char* out) {
  if (w) {
    float ss = 0;
    for (int d = 0; d < D; ++d) ss += x[d] * x[d];
    const float inv = 1.0f / sqrtf(ss / D + eps);
    for (int d = 0; d < D; ++d) x[d] = round_to(dt, w[d] * round_to(dt, x[d] * inv));
  }
  const int h = D / 2, es = dt == F32 ? 4 : 2;
  for (int d = 0; d < D; ++d) {
    const float rot = d < h ? -x[d + h] : x[d - h];
    store1(out + (long)d * es, dt, round_to(dt, x[d] * c[d]) + round_to(dt, rot * s[d]));
  }
}
#endif

extern "C" int dynaexq_qk_rope_cache(int B, int Hq, int Hkv, int D, int dt, const void* q, const void* k,
                                     const void* v, const void* qn, const void* kn, float eps, const void* cos,
                                     const void* sin, void* keys, void* values, long R, long C, const int64_t* rows,
                                     const int64_t* pos, void* qo) {
#if ISA
  if (D <= 0 || D % 2) return -1;
  const int es = dt == F32 ? 4 : 2;
  std::vector<float> x(D), c(D), s(D), wq(qn ? D : 0), wk(kn ? D : 0);
  if (qn) to_f32(qn, dt, wq.data(), D);
  if (kn) to_f32(kn, dt, wk.data(), D);
  for (int b = 0; b < B; ++b) {
    if (rows[b] < 0 || rows[b] >= R || pos[b] < 0 || pos[b] >= C) return -2;
    to_f32((const char*)cos + (long)b * D * es, dt, c.data(), D);
    to_f32((const char*)sin + (long)b * D * es, dt, s.data(), D);
    for (int hq = 0; hq < Hq; ++hq) {
      const long at = ((long)b * Hq + hq) * D * es;
      to_f32((const char*)q + at, dt, x.data(), D);
      head(x.data(), D, dt, qn ? wq.data() : nullptr, eps, c.data(), s.data(), (char*)qo + at);
    }
    for (int hk = 0; hk < Hkv; ++hk) {
      const long at = ((long)b * Hkv + hk) * D * es, slot = (((long)rows[b] * Hkv + hk) * C + pos[b]) * D * es;
      to_f32((const char*)k + at, dt, x.data(), D);
      head(x.data(), D, dt, kn ? wk.data() : nullptr, eps, c.data(), s.data(), (char*)keys + slot);
      memcpy((char*)values + slot, (const char*)v + at, (size_t)D * es);
    }
  }
  return 0;
#else
  return -1;
#endif
}
