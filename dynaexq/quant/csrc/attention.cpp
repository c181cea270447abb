// Decode attention over the SlotCache (engine/kv_cache.py): one query token per row, keys and values read in
// place from the cache's row buffers (strided views), each row over its own length; grouped-query heads share
// one read of each key and value. fp32 scores, softmax and sums; one rounding of the output into its dtype.
//   q [B, Hq, D] (dtype dt, contiguous), k / v: views [B, Hkv, L, D|Dv] (dtype kdt) given by a base pointer and
//   element strides (row, head, position; the last dim contiguous), lens [B] valid positions per row (<= L),
//   out [B, Hq, Dv] (dtype dt, contiguous). Parallel over (row, kv head).
#include <math.h>

#include "simd.h"

static inline void load_row(const void* p, int dt, float* dst, int n) {
#if ISA
  to_f32(p, dt, dst, n);
#endif
}

extern "C" int dynaexq_decode_attention(int B, int Hq, int Hkv, int D, int Dv, const void* q, int dt,
                                        const void* k, const void* v, int kdt, int64_t krs, int64_t khs, int64_t kps,
                                        int64_t vrs, int64_t vhs, int64_t vps, const int64_t* lens, float scale,
                                        void* out, int nthreads) {
#if ISA
  if (Hkv <= 0 || Hq % Hkv != 0 || D > 1024 || Dv > 1024) return -1;
  const int G = Hq / Hkv, es = dt == F32 ? 4 : 2, kes = kdt == F32 ? 4 : 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < Hkv; ++h) {
      const long L = lens[b];
      thread_local std::vector<float> buf;
      buf.resize((size_t)G * (D + Dv + L) + D + Dv);
      float* qf = buf.data();            // [G, D]
      float* acc = qf + (size_t)G * D;   // [G, Dv]
      float* s = acc + (size_t)G * Dv;   // [G, L] scores, then weights
      float* kf = s + (size_t)G * L;     // [D] one key in fp32
      float* vf = kf + D;                // [Dv] one value in fp32
      for (int g = 0; g < G; ++g)
        load_row((const char*)q + ((long)(b * Hq + h * G + g) * D) * es, dt, qf + (size_t)g * D, D);
      const char* kb = (const char*)k + (b * krs + h * khs) * kes;
      const char* vb = (const char*)v + (b * vrs + h * vhs) * kes;
      for (long j = 0; j < L; ++j) {  // scores: each key read once for the G heads
        load_row(kb + j * kps * kes, kdt, kf, D);
        for (int g = 0; g < G; ++g) {
          const float* qg = qf + (size_t)g * D;
          float t = 0;
#pragma omp simd reduction(+ : t)
          for (int d = 0; d < D; ++d) t += qg[d] * kf[d];
          s[(size_t)g * L + j] = t * scale;
        }
      }
      for (int g = 0; g < G; ++g) {  // softmax per head
        float* sg = s + (size_t)g * L;
        float m = -INFINITY, z = 0;
        for (long j = 0; j < L; ++j) m = std::max(m, sg[j]);
        for (long j = 0; j < L; ++j) { sg[j] = expf(sg[j] - m); z += sg[j]; }
        const float inv = 1.0f / z;
        for (long j = 0; j < L; ++j) sg[j] *= inv;
      }
      std::fill(acc, acc + (size_t)G * Dv, 0.0f);
      for (long j = 0; j < L; ++j) {  // sums: each value read once for the G heads
        load_row(vb + j * vps * kes, kdt, vf, Dv);
        for (int g = 0; g < G; ++g) {
          const float p = s[(size_t)g * L + j];
          float* ag = acc + (size_t)g * Dv;
#pragma omp simd
          for (int d = 0; d < Dv; ++d) ag[d] += p * vf[d];
        }
      }
      for (int g = 0; g < G; ++g) {
        char* o = (char*)out + ((long)(b * Hq + h * G + g) * Dv) * es;
        for (int d = 0; d < Dv; ++d) store1(o + (long)d * es, dt, acc[(size_t)g * Dv + d]);
      }
    }
  }
  return 0;
#else
  return -1;
#endif
}
