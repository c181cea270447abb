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

#if ISA == 512
// AVX-512, at most 16 query heads per kv head, D and Dv multiples of 16: the same sums in registers. Scores: per
// key, its 16-wide chunks converted once and FMA'd into one accumulator per query head (q read from L1), then one
// horizontal sum per head; softmax vectorized (exp below); sums: per 16-wide chunk of Dv, one accumulator per head
// in registers over every key (the head's weight broadcast). ~2-4x the loop below at 512-4096 positions.
static inline __m512 load16(const char* p, int dt) {
  if (dt == F32) return _mm512_loadu_ps(p);
  if (dt == F16) return vf_load_ph(p);
  return vf_load_bf16(p);
}

// exp(x) for the softmax's x - max <= 0 (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n by
// vscalefps; within ~2 ulp of expf; below -87.3 it is 0, as expf's result is there to within its own rounding)
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

static void head_group(int G, int D, int Dv, const float* qf, const char* kb, const char* vb, int kdt, int kes,
                       int64_t kps, int64_t vps, long L, float scale, float* s, float* acc) {
  __m512 a[16];
  for (long j = 0; j < L; ++j) {  // scores
    for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_ps();
    const char* kp = kb + j * kps * kes;
    for (int c = 0; c < D; c += 16) {
      const __m512 kv = load16(kp + (long)c * kes, kdt);
      for (int g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + (size_t)g * D + c), kv, a[g]);
    }
    for (int g = 0; g < G; ++g) s[(size_t)g * L + j] = _mm512_reduce_add_ps(a[g]) * scale;
  }
  for (int g = 0; g < G; ++g) {  // softmax per head
    float* sg = s + (size_t)g * L;
    __m512 m = _mm512_set1_ps(-INFINITY), z = _mm512_setzero_ps();
    for (long j = 0; j < L; j += 16) {
      const __mmask16 k = L - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - j)) - 1);
      m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, sg + j));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    for (long j = 0; j < L; j += 16) {
      const __mmask16 k = L - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - j)) - 1);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sg + j), mx));
      _mm512_mask_storeu_ps(sg + j, k, e);
      z = _mm512_add_ps(z, _mm512_maskz_mov_ps(k, e));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(z));
    for (long j = 0; j < L; j += 16) {
      const __mmask16 k = L - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - j)) - 1);
      _mm512_mask_storeu_ps(sg + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sg + j), inv));
    }
  }
  for (int c = 0; c < Dv; c += 16) {  // sums, one 16-wide chunk of every head at a time
    for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_ps();
    for (long j = 0; j < L; ++j) {
      const __m512 vv = load16(vb + (j * vps + c) * kes, kdt);
      for (int g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(_mm512_set1_ps(s[(size_t)g * L + j]), vv, a[g]);
    }
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(acc + (size_t)g * Dv + c, a[g]);
  }
}
#endif

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
#if ISA == 512
      if (G <= 16 && D % 16 == 0 && Dv % 16 == 0) {
        head_group(G, D, Dv, qf, kb, vb, kdt, kes, kps, vps, L, scale, s, acc);
        for (int g = 0; g < G; ++g) {
          char* o = (char*)out + ((long)(b * Hq + h * G + g) * Dv) * es;
          for (int d = 0; d < Dv; ++d) store1(o + (long)d * es, dt, acc[(size_t)g * Dv + d]);
        }
        continue;
      }
#endif
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
