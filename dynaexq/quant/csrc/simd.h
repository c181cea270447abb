// SIMD abstraction shared by the CPU kernels (lowbit.cpp, rowmajor.cpp, route.cpp): 16 float lanes as one zmm
// (AVX-512F) or two ymm (AVX2+FMA+F16C), chosen at compile time (-march=native); ISA 0: no kernel.
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#if defined(__AVX512F__)
#define ISA 512
constexpr int MT_MAX = 8;  // rows of x per tile: accumulators MT*NV <= 16 of 32 zmm
constexpr int nv_for(int mt) { return mt <= 2 ? 4 : 2; }
typedef __m512 vf;
typedef __m512i vi;
static inline vi vi_load(const void* p) { return _mm512_loadu_si512(p); }
static inline vi vi_set1(int a) { return _mm512_set1_epi32(a); }
static inline vi vi_srl(vi a, int n) { return _mm512_srli_epi32(a, n); }
static inline vi vi_sll(vi a, int n) { return _mm512_slli_epi32(a, n); }
static inline vi vi_select(vi m, vi a, vi b) { return _mm512_ternarylogic_epi32(m, a, b, 0xCA); }  // m ? a : b
static inline vf vf_perm(vf lut, vi idx) { return _mm512_permutexvar_ps(idx, lut); }
static inline vf vf_zero() { return _mm512_setzero_ps(); }
static inline vf vf_set1(float a) { return _mm512_set1_ps(a); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_load(const float* p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float* p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vf_load_ph(const void* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline void vf_store_ph(void* p, vf a) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
}
static inline vf make_lut(int bits) {  // index -> its low `bits` bits, as a float
  return bits == 2 ? _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3)
       : bits == 3 ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7)
                   : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
template <int BITS> static inline vf decode(vf lut, vi cur) {  // the low BITS bits of each lane as a float
  if constexpr (BITS <= 4) return vf_perm(lut, cur);  // vpermps reads the low 4 index bits
  else return _mm512_cvtepi32_ps(_mm512_and_si512(cur, _mm512_set1_epi32((1 << BITS) - 1)));
}
static inline vf vf_load_u8(const void* p) {  // 16 bytes -> 16 floats
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline float vf_hsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf vf_load_i8(const void* p) {  // 16 int8 -> 16 floats
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline vf vf_load_bf16(const void* p) {  // 16 bf16 -> 16 floats (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline vf vf_round_bf16(vf a) {  // to the nearest bf16 (ties to even), kept as a float
  const vi u = _mm512_castps_si512(a);
  const vi r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(vi_srl(u, 16), vi_set1(1))));
  return _mm512_castsi512_ps(_mm512_and_si512(r, vi_set1((int)0xFFFF0000u)));
}
static inline void vf_store_bf16(void* p, vf a) {  // a already rounded: keep the high halves
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(vi_srl(_mm512_castps_si512(a), 16)));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ISA 256
constexpr int MT_MAX = 4;  // 16 ymm: 2 per 16-lane vector
constexpr int nv_for(int) { return 1; }
struct vf { __m256 a, b; };
struct vi { __m256i a, b; };
static inline vi vi_load(const void* p) {
  return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)p + 1)};
}
static inline vi vi_set1(int a) { return {_mm256_set1_epi32(a), _mm256_set1_epi32(a)}; }
static inline vi vi_srl(vi x, int n) { return {_mm256_srli_epi32(x.a, n), _mm256_srli_epi32(x.b, n)}; }
static inline vi vi_sll(vi x, int n) { return {_mm256_slli_epi32(x.a, n), _mm256_slli_epi32(x.b, n)}; }
static inline vi vi_select(vi m, vi a, vi b) {
  return {_mm256_or_si256(_mm256_and_si256(m.a, a.a), _mm256_andnot_si256(m.a, b.a)),
          _mm256_or_si256(_mm256_and_si256(m.b, a.b), _mm256_andnot_si256(m.b, b.b))};
}
static inline vf vf_perm(vf lut, vi i) {  // 8-entry table: reads the low 3 index bits
  return {_mm256_permutevar8x32_ps(lut.a, i.a), _mm256_permutevar8x32_ps(lut.a, i.b)};
}
static inline vf vf_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline vf vf_set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
static inline vf vf_fma(vf x, vf y, vf z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
static inline vf vf_mul(vf x, vf y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
static inline vf vf_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void vf_store(float* p, vf x) { _mm256_storeu_ps(p, x.a); _mm256_storeu_ps(p + 8, x.b); }
static inline vf vf_load_ph(const void* p) {
  const __m128i* q = (const __m128i*)p;
  return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
}
static inline void vf_store_ph(void* p, vf x) {
  _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(x.a, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128((__m128i*)p + 1, _mm256_cvtps_ph(x.b, _MM_FROUND_TO_NEAREST_INT));
}
static inline vf make_lut(int bits) {
  __m256 t = bits == 2 ? _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3) : _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  return {t, t};
}
template <int BITS> static inline vf decode(vf lut, vi cur) {
  if constexpr (BITS < 4) {
    return vf_perm(lut, cur);
  } else {  // permutevar8x32 reads 3 index bits: mask the code and convert
    const __m256i m = _mm256_set1_epi32((1 << BITS) - 1);
    return {_mm256_cvtepi32_ps(_mm256_and_si256(cur.a, m)), _mm256_cvtepi32_ps(_mm256_and_si256(cur.b, m))};
  }
}
static inline vf vf_load_u8(const void* p) {
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
}
static inline float vf_hsum(vf x) {
  const __m256 s = _mm256_add_ps(x.a, x.b);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
static inline vf vf_load_i8(const void* p) {
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
static inline vf vf_load_bf16(const void* p) {
  const __m128i* q = (const __m128i*)p;
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q)), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q + 1)), 16))};
}
static inline vf vf_round_bf16(vf x) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), hi = _mm256_set1_epi32((int)0xFFFF0000u);
  __m256i a = _mm256_castps_si256(x.a), b = _mm256_castps_si256(x.b);
  a = _mm256_and_si256(_mm256_add_epi32(a, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(a, 16), one))), hi);
  b = _mm256_and_si256(_mm256_add_epi32(b, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(b, 16), one))), hi);
  return {_mm256_castsi256_ps(a), _mm256_castsi256_ps(b)};
}
static inline void vf_store_bf16(void* p, vf x) {
  const __m256i a = _mm256_srli_epi32(_mm256_castps_si256(x.a), 16), b = _mm256_srli_epi32(_mm256_castps_si256(x.b), 16);
  _mm256_storeu_si256((__m256i*)p, _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8));  // lanes back in order
}
#else
#define ISA 0
#endif
#if ISA
enum { F32 = 0, BF16 = 1, F16 = 2 };  // dtype codes of x and y
inline std::atomic<long> x_epochs{0};  // numbers each block of x a kernel converts (tiles' caches key on it)
static inline uint16_t bf16_round(float f) {  // round to nearest even
  uint32_t u; memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
static inline float bf16_value(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float round_to(int dt, float v) {  // v rounded to dtype dt, kept as a float
  if (dt == BF16) return bf16_value(bf16_round(v));
  if (dt == F16) return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
  return v;
}
static inline void store1(char* dst, int dt, float v) {  // one float -> dst in dtype dt
  if (dt == F32) memcpy(dst, &v, 4);
  else if (dt == F16) { uint16_t h = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); memcpy(dst, &h, 2); }
  else { uint16_t h = bf16_round(v); memcpy(dst, &h, 2); }
}

static void store16(char* dst, int dt, const float* src) {  // 16 floats -> dst in dtype dt
  if (dt == F32) { memcpy(dst, src, 64); return; }
  if (dt == F16) { vf_store_ph(dst, vf_load(src)); return; }
  uint16_t* d = (uint16_t*)dst;
  for (int i = 0; i < 16; ++i) d[i] = bf16_round(src[i]);  // bf16, round to nearest even
}
static void to_f32(const void* src, int dt, float* dst, long n) {
  if (dt == F32) { memcpy(dst, src, n * 4); return; }
  const uint16_t* s = (const uint16_t*)src;
  if (dt == BF16) {
    for (long i = 0; i < n; ++i) { uint32_t u = (uint32_t)s[i] << 16; memcpy(dst + i, &u, 4); }
    return;
  }
  long i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
}


// The grouped driver: one call computes every routed row of every expert of one tier. x [R, K] (dtype dt)
// holds the rows grouped by expert (counts[e] rows for expert e, e ascending); experts with weights[e] == 0
// are not of this tier and are skipped. Rows are cut into segments of <= SEG rows of one expert, segments
// into batches of <= RB rows converted to fp32 at once (with `nsum` sums of `sumlen` inputs per row), and
// `run(e, first row, rows, unit, x fp32, sums, epoch)` computes one unit of output columns of one segment (epoch:
// this batch's number, a new one per batch: the buffer is reused); the (segment, unit) items of a batch share one
// OpenMP loop.
template <class Run>
static void grouped_rows(int E, const int64_t* counts, const int64_t* weights, int K, int nsum, int sumlen,
                         const void* x, int dt, int units, int nthreads, Run run) {
  constexpr long SEG = 256, RB = 1024;
  struct Seg { int e; long r0, m, off; };
  std::vector<Seg> segs;
  long r = 0;
  for (int e = 0; e < E; r += counts[e], ++e)
    if (weights[e])
      for (long i = 0; i < counts[e]; i += SEG) segs.push_back({e, r + i, std::min(SEG, counts[e] - i), 0});
  const int es = dt == F32 ? 4 : 2;
  thread_local std::vector<float> buf;  // per calling thread; grows once, reused across calls
  for (size_t s0 = 0; s0 < segs.size();) {
    size_t s1 = s0;
    long rows = 0;
    while (s1 < segs.size() && (s1 == s0 || rows + segs[s1].m <= RB)) { segs[s1].off = rows; rows += segs[s1++].m; }
    buf.resize(rows * (K + nsum));
    float* xf = buf.data();
    float* xs = xf + rows * K;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long i = s0; i < (long)s1; ++i) {
      const Seg& s = segs[i];
      to_f32((const char*)x + s.r0 * K * es, dt, xf + s.off * K, s.m * K);
      for (long j = s.off * nsum; j < (s.off + s.m) * nsum; ++j) {
        float t = 0;
        for (int k = 0; k < sumlen; ++k) t += xf[j * sumlen + k];
        xs[j] = t;
      }
    }
    const long items = (long)(s1 - s0) * units, epoch = ++x_epochs;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic)
    for (long it = 0; it < items; ++it) {
      const Seg& s = segs[s0 + it / units];
      run(s.e, s.r0, s.m, (int)(it % units), xf + s.off * K, xs + s.off * nsum, epoch);
    }
    s0 = s1;
  }
}
#endif
