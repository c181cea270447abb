// Fused grouped low-bit matmul for the CPU: y[M, N] = x[M, K] @ W^T with W read as 2/3/4-bit codes and
// dequantized in registers. Plain C ABI, called through ctypes by dynaexq/quant/lowbit_cpu.py, which builds
// the weight blob (layout below) and compiles this file with -march=native; the ISA (AVX-512F, else
// AVX2+FMA+F16C, else none: dynaexq_lowbit_isa() == 0) is chosen at compile time.
//
// Blob layout: panels of 16 output rows (one 32-bit vector lane per row), panel-major; per panel a 6-byte
// header (fp16 ds, db, bmin: the ranges of the panel's scale and offset codes), then per group g of G inputs a
// record of the group's codes, 16 uint8 scale codes and 16 uint8 offset codes (one per row):
//   int4: G/8 chunks of 16 lanes; lane i bits 4j..4j+3 = code[row i, k = 8c + j]              (64 B a chunk)
//   int2: G/16 chunks of 16 lanes; lane i bits 2j..2j+1 = code[row i, k = 16c + j]            (64 B)
//   int3: G/32 chunks of 3 x 16 lanes A, B, C; lane i bits 3j..3j+2 = code[row i, k = 32c + 10w + j]
//         for j < 10 in word w = A, B, C; A bits 30-31 / C bits 30-31 = low two bits of k = 30 / 31,
//         B bits 30 / 31 = their third bits                                                     (192 B)
// Math per group: y += s * sum_k q[k] x[k] + b * sum_k x[k], s = ds * scale code, b = bmin + db * offset code,
// i.e. W = s * q + b exactly. A word shifted right by `bits` per k leaves the next code in its low bits; one
// vpermps on a table of code values (it reads only the low 4 index bits; AVX2: 3, so int4 masks and converts)
// turns 16 codes into floats, and one FMA per row of x accumulates them: 3 vector ops per 16 weights at M = 1.
// Tiles: MT rows of x x NV panels in registers; OpenMP over units of 4 panels (64 output rows).
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <algorithm>
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
template <int BITS> static inline vf decode(vf lut, vi cur) { return vf_perm(lut, cur); }
static inline vf vf_load_u8(const void* p) {  // 16 bytes -> 16 floats
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
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
  } else {  // permutevar8x32 reads 3 index bits: mask the nibble and convert
    const __m256i m = _mm256_set1_epi32(15);
    return {_mm256_cvtepi32_ps(_mm256_and_si256(cur.a, m)), _mm256_cvtepi32_ps(_mm256_and_si256(cur.b, m))};
  }
}
static inline vf vf_load_u8(const void* p) {
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
}
#else
#define ISA 0
#endif

constexpr int HEADER = 6;  // bytes of a panel's range header
constexpr int PF = 2;  // software prefetch distance, in groups (the hardware's alone is 10-25% slower)

extern "C" int dynaexq_lowbit_isa() { return ISA; }

// code i of the store's bit packing (quant/packing.py): int4 two per byte, int2 four per byte (low bits
// first), int3 eight per 3-byte little-endian word
static inline uint32_t store_code(const uint8_t* d, int bits, long i) {
  if (bits == 4) return (d[i >> 1] >> ((i & 1) * 4)) & 15;
  if (bits == 2) return (d[i >> 2] >> ((i & 3) * 2)) & 3;
  const uint8_t* w = d + 3 * (i >> 3);
  return ((w[0] | (w[1] << 8) | (w[2] << 16)) >> (3 * (i & 7))) & 7;
}

// The kernel's blob (lowbit_cpu.pack_blob, its reference) straight from the store's bytes, without the GIL
// (ctypes releases it): per 16-row panel a 6-byte fp16 range header, then per group the code words
// [chunk][word][row] (uint32, code j of a chunk at bit bits*(j % per) of word j / per; int3's codes 30 and 31
// split over the top bits of the three words) and the 16 rows' scale and offset codes.
extern "C" int dynaexq_lowbit_pack(int bits, int N, int K, int G, const uint8_t* data, const uint8_t* scale,
                                   const uint8_t* zero, const uint8_t* ranges, uint8_t* out) {
  const int ck = bits == 2 ? 16 : bits == 3 ? 32 : bits == 4 ? 8 : 0, per = bits == 3 ? 10 : ck;
  if (!ck || N % 16 || K % G || G % ck) return -1;
  const int P = N / 16, ng = K / G, nw = ck / per, chunks = G / ck;
  const long code_bytes = 2L * G * bits, rec_bytes = code_bytes + 32, panel_bytes = HEADER + ng * rec_bytes;
  for (int p = 0; p < P; p++) {
    uint8_t* panel = out + p * panel_bytes;
    memcpy(panel, ranges + 6L * p, HEADER);
    for (int g = 0; g < ng; g++) {
      uint8_t* rec = panel + HEADER + g * rec_bytes;
      for (int row = 0; row < 16; row++) {
        const long n = 16L * p + row;
        for (int c = 0; c < chunks; c++) {
          const long base = n * K + (long)g * G + (long)c * ck;
          for (int w = 0; w < nw; w++) {
            uint32_t v = 0;
            for (int j = w * per; j < (w + 1) * per; j++) v |= store_code(data, bits, base + j) << (bits * (j % per));
            if (bits == 3) {
              const uint32_t c30 = store_code(data, 3, base + 30), c31 = store_code(data, 3, base + 31);
              v |= w == 0 ? (c30 & 3) << 30 : w == 1 ? ((c30 >> 2) << 30) | ((c31 >> 2) << 31) : (c31 & 3) << 30;
            }
            memcpy(rec + 4L * ((c * nw + w) * 16 + row), &v, 4);
          }
        }
        rec[code_bytes + row] = scale[n * ng + g];
        rec[code_bytes + 16 + row] = zero[n * ng + g];
      }
    }
  }
  return 0;
}

#if ISA
enum { F32 = 0, BF16 = 1, F16 = 2 };  // dtype codes of x and y

struct Args {
  int M, N, K, G;     // this block of rows: x [M, K], y [M, N]
  const uint8_t* w;   // blob
  long panel_bytes, rec_bytes, code_bytes;  // a panel: 6-byte header + ng records
  const float* x;     // [M, K] fp32
  const float* xsum;  // [M, K/G]: per-group sums of x
  char* y;            // [M, N] in dtype ydt
  int ydt;
};

static void store16(char* dst, int dt, const float* src) {  // 16 floats -> dst in dtype dt
  if (dt == F32) { memcpy(dst, src, 64); return; }
  if (dt == F16) { vf_store_ph(dst, vf_load(src)); return; }
  uint16_t* d = (uint16_t*)dst;
  for (int i = 0; i < 16; ++i) {  // bf16, round to nearest even
    uint32_t u; memcpy(&u, src + i, 4);
    d[i] = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
}

// MT rows of x (from row m0) times NV panels (from panel p0): y[m0:m0+MT, 16*p0 : 16*(p0+NV)].
template <int BITS, int MT, int NV>
static void tile(const Args& a, int p0, int m0) {
  constexpr int CK = BITS == 2 ? 16 : BITS == 3 ? 32 : 8, CB = 2 * BITS * CK;  // k per chunk, bytes per chunk
  constexpr int PER = BITS == 2 ? 16 : BITS == 3 ? 10 : 8;                       // codes per word read by shifting
  const int ng = a.K / a.G, nchunk = a.G / CK;
  const vf lut = make_lut(BITS);
  const vi low2 = vi_set1(3);
  float ybuf[MT][NV * 16] = {};
  vf ds[NV], db[NV], lo[NV];
  for (int v = 0; v < NV; ++v) {
    uint16_t h[3];
    memcpy(h, a.w + (p0 + v) * a.panel_bytes, 6);
    ds[v] = vf_set1(_cvtsh_ss(h[0])); db[v] = vf_set1(_cvtsh_ss(h[1])); lo[v] = vf_set1(_cvtsh_ss(h[2]));
  }
  for (int g = 0; g < ng; ++g) {
    vf acc[MT][NV];
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = vf_zero();
    const uint8_t* rec[NV];
    for (int v = 0; v < NV; ++v) {
      rec[v] = a.w + (p0 + v) * a.panel_bytes + HEADER + g * a.rec_bytes;
      // prefetch the record PF groups ahead; near the end, that of the next tile (panel v + NV)
      const char* ahead = g + PF < ng ? (const char*)rec[v] + PF * a.rec_bytes
                                      : (const char*)(a.w + (p0 + v + NV) * a.panel_bytes + HEADER
                                                      + (g + PF - ng) * a.rec_bytes);
      for (int b = 0; b < a.rec_bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    for (int c = 0; c < nchunk; ++c) {
      const float* xk[MT];
      for (int m = 0; m < MT; ++m) xk[m] = a.x + (long)(m0 + m) * a.K + g * a.G + c * CK;
      vi cur[NV], a30[NV], b30[NV];  // int3: A >> 30, B >> 30 (see the layout above)
#pragma GCC unroll 32
      for (int j = 0; j < CK; ++j) {
        vf w[NV];
        for (int v = 0; v < NV; ++v) {
          if (BITS != 3 || j < 30) {
            if (j % PER == 0) {  // next word (int3: A, B, C)
              if (BITS == 3 && j == 10) a30[v] = cur[v];
              if (BITS == 3 && j == 20) b30[v] = cur[v];
              cur[v] = vi_load(rec[v] + c * CB + 64 * (j / PER));
            }
            w[v] = decode<BITS>(lut, cur[v]);
            cur[v] = vi_srl(cur[v], BITS);
          } else {  // k = 30: low bits A >> 30, third bit B[30]; k = 31: C >> 30 and B[31]
            w[v] = vf_perm(lut, j == 30 ? vi_select(low2, a30[v], vi_sll(b30[v], 2))
                                        : vi_select(low2, cur[v], vi_sll(b30[v], 1)));
          }
        }
        for (int m = 0; m < MT; ++m) {
          const vf xb = vf_set1(xk[m][j]);
          for (int v = 0; v < NV; ++v) acc[m][v] = vf_fma(xb, w[v], acc[m][v]);
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      const vf s = vf_mul(ds[v], vf_load_u8(rec[v] + a.code_bytes));
      const vf b = vf_fma(db[v], vf_load_u8(rec[v] + a.code_bytes + 16), lo[v]);
      for (int m = 0; m < MT; ++m) {
        const vf xs = vf_set1(a.xsum[(long)(m0 + m) * ng + g]);
        vf_store(ybuf[m] + 16 * v, vf_fma(s, acc[m][v], vf_fma(b, xs, vf_load(ybuf[m] + 16 * v))));
      }
    }
  }
  const int es = a.ydt == F32 ? 4 : 2;
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < NV; ++v)
      store16(a.y + ((long)(m0 + m) * a.N + 16 * (p0 + v)) * es, a.ydt, ybuf[m] + 16 * v);
}

template <int BITS, int MT = 1>
static void run_rows(const Args& a, int p0, int np, int m0, int mt) {  // mt rows, panels p0..p0+np
  if (mt != MT) {
    if constexpr (MT < MT_MAX) run_rows<BITS, MT + 1>(a, p0, np, m0, mt);
    return;
  }
  constexpr int NV = nv_for(MT);
  int p = p0;
  for (; p + NV <= p0 + np; p += NV) tile<BITS, MT, NV>(a, p, m0);
  for (; p < p0 + np; ++p) tile<BITS, MT, 1>(a, p, m0);
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
#endif

// y[M, N] (dtype dt) = x[M, K] (dtype dt) @ W^T for the blob `w` of a [N, K] 2/3/4-bit weight with groups
// of G (N % 16 == 0, K % G == 0, G a multiple of the chunk: 8 / 16 / 32 for 4 / 2 / 3 bits). Returns 0, or -1
// when built without a kernel.
extern "C" int dynaexq_lowbit_mm(int bits, int G, int M, int N, int K, const void* x, int dt,
                                 const uint8_t* w, void* y, int nthreads) {
#if ISA
  constexpr int MB = 64;  // rows of x converted to fp32 at a time
  const int ng = K / G, P = N / 16, units = (P + 3) / 4, es = dt == F32 ? 4 : 2;
  thread_local std::vector<float> buf;  // per calling thread; grows once, reused across calls
  buf.resize((long)std::min(M, MB) * (K + ng));
  Args a;
  a.N = N; a.K = K; a.G = G; a.w = w; a.ydt = dt;
  a.code_bytes = 2L * G * bits;
  a.rec_bytes = a.code_bytes + 32;
  a.panel_bytes = HEADER + ng * a.rec_bytes;
  for (int r0 = 0; r0 < M; r0 += MB) {
    a.M = std::min(MB, M - r0);
    float* xf = buf.data();
    float* xs = xf + (long)a.M * K;
    to_f32((const char*)x + (long)r0 * K * es, dt, xf, (long)a.M * K);
    for (long i = 0; i < (long)a.M * ng; ++i) {
      float t = 0;
      for (int k = 0; k < G; ++k) t += xf[i * G + k];
      xs[i] = t;
    }
    a.x = xf; a.xsum = xs; a.y = (char*)y + (long)r0 * N * es;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int u = 0; u < units; ++u) {
      const int p0 = 4 * u, np = std::min(4, P - p0);
      for (int m0 = 0; m0 < a.M; m0 += MT_MAX) {
        const int mt = std::min(MT_MAX, a.M - m0);
        if (bits == 2) run_rows<2>(a, p0, np, m0, mt);
        else if (bits == 3) run_rows<3>(a, p0, np, m0, mt);
        else run_rows<4>(a, p0, np, m0, mt);
      }
    }
  }
  return 0;
#else
  return -1;
#endif
}
