// Fused grouped low-bit matmul for the CPU: y[M, N] = x[M, K] @ W^T with W read as 2/3/4/6-bit codes and
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
//   int6: G/16 chunks of 3 x 16 lanes A, B, C; lane i bits 6j..6j+5 = code[row i, k = 16c + 5w + j] for j < 5
//         in word w = A, B, C; bits 30-31 of A / B / C = bits 0-1 / 2-3 / 4-5 of k = 15                 (192 B)
// Math per group: y += s * sum_k q[k] x[k] + b * sum_k x[k], s = ds * scale code, b = bmin + db * offset code,
// i.e. W = s * q + b exactly. A word shifted right by `bits` per k leaves the next code in its low bits; one
// vpermps on a table of code values (it reads only the low 4 index bits; AVX2: 3, so int4 masks and converts)
// turns 16 codes into floats (int6: a mask and a convert), and one FMA per row of x accumulates them: 3 vector
// ops per 16 weights at M = 1.
// Tiles: MT rows of x x NV panels in registers; OpenMP over units of 4 panels (64 output rows). AVX2 builds
// multiply bf16/fp16 x with 4/2-bit codes in the int8-activation tile instead (tile_int8_x below).
#include "simd.h"

constexpr int HEADER = 6;  // bytes of a panel's range header
constexpr int PF = 2;  // software prefetch distance, in groups (the hardware's alone is 10-25% slower)

extern "C" int dynaexq_lowbit_isa() { return ISA; }

// a chunk: k per chunk and codes per 32-bit word read by shifting (int3 / int6: three words, the last code(s)
// split over their top bits); 0 for a width without a kernel
constexpr int chunk_k(int bits) { return bits == 2 ? 16 : bits == 3 ? 32 : bits == 4 ? 8 : bits == 6 ? 16 : 0; }
constexpr int chunk_per(int bits) { return bits == 3 ? 10 : bits == 6 ? 5 : chunk_k(bits); }

// The kernel's blob (lowbit_cpu.pack_blob, its reference) straight from the store's bytes, without the GIL
// (ctypes releases it): per 16-row panel a 6-byte fp16 range header, then per group the code words
// [chunk][word][row] (uint32, code j of a chunk at bit bits*(j % per) of word j / per; int3's codes 30 and 31
// and int6's code 15 split over the top bits of the three words) and the 16 rows' scale and offset codes.
extern "C" int dynaexq_lowbit_pack(int bits, int N, int K, int G, const uint8_t* data, const uint8_t* scale,
                                   const uint8_t* zero, const uint8_t* ranges, uint8_t* out) {
  const int ck = chunk_k(bits), per = chunk_per(bits);
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
          // the store packs codes as one little-endian bit stream (quant/packing.py: int2 / int4 four / two a
          // byte, int3 / int6 eight / four a 3-byte word, low bits first): code i at bit bits * i, so a chunk's
          // codes are its ck * bits / 8 bytes (base is a multiple of ck: whole bytes)
          if (nw == 1) {  // int2 / int4: the chunk's 4 bytes are the word
            memcpy(rec + 4L * (c * 16 + row), data + base * bits / 8, 4);
            continue;
          }
          unsigned __int128 x = 0;
          memcpy(&x, data + base * bits / 8, ck * bits / 8);
          const int span = bits * per;  // bits of a word's own codes: 30 for int3 / int6
          for (int w = 0; w < nw; w++) {
            uint32_t v = (uint32_t)((x >> (span * w)) & ((((unsigned __int128)1) << span) - 1));
            if (bits == 3) {  // codes 30 and 31 (bits 90-95) over the top bits
              const uint32_t c30 = (uint32_t)(x >> 90) & 7, c31 = (uint32_t)(x >> 93) & 7;
              v |= w == 0 ? (c30 & 3) << 30 : w == 1 ? ((c30 >> 2) << 30) | ((c31 >> 2) << 31) : (c31 & 3) << 30;
            }
            if (bits == 6) v |= (((uint32_t)(x >> 90) >> (2 * w)) & 3) << 30;  // code 15 (bits 90-95)
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

struct Args {
  int M, N, K, G;     // this block of rows: x [M, K], y [M, N]
  const uint8_t* w;   // blob
  long panel_bytes, rec_bytes, code_bytes;  // a panel: 6-byte header + ng records
  const float* x;     // [M, K] fp32
  const float* xsum;  // [M, K/G]: per-group sums of x
  char* y;            // [M, N] in dtype ydt
  int ydt;
  int xdt;            // the dtype x came in (BF16: a.x holds exact bf16 values)
  long epoch;         // which block of x a.x holds (a new value per converted block: tile caches key on it)
};


// The walk every tile shares: MT rows of x (from row m0) times NV panels (from panel p0), y[m0:m0+MT,
// 16*p0 : 16*(p0+NV)]. Per group g: the records of the NV panels (the record PF groups ahead prefetched; near the
// end, that of the next tile, panel v + NV), `group(g, rec, acc)` accumulates sum_k code[k] x[k] (a tile's codes
// may be centred: code - shift), then y += s * acc + (b + shift * s) * sum_k x[k].
template <int MT, int NV, class Group>
static void walk(const Args& a, int p0, int m0, float shift, Group group) {
  const int ng = a.K / a.G;
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
      const char* ahead = g + PF < ng ? (const char*)rec[v] + PF * a.rec_bytes
                                      : (const char*)(a.w + (p0 + v + NV) * a.panel_bytes + HEADER
                                                      + (g + PF - ng) * a.rec_bytes);
      for (int b = 0; b < a.rec_bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    group(g, rec, acc);
    for (int v = 0; v < NV; ++v) {
      const vf s = vf_mul(ds[v], vf_load_u8(rec[v] + a.code_bytes));
      const vf b = vf_fma(vf_set1(shift), s, vf_fma(db[v], vf_load_u8(rec[v] + a.code_bytes + 16), lo[v]));
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

// The codes of chunk c of the NV panels' records as floats: f(j, w) for k = j of the chunk, w[v] the 16 rows'
// codes of panel v (one vpermps each; int6: a mask and a convert; int3 / int6 assemble their split last codes).
template <int BITS, int NV, class F>
static inline void for_codes(const uint8_t* const* rec, int c, const vf& lut, F f) {
  constexpr int CK = chunk_k(BITS), CB = 2 * BITS * CK, PER = chunk_per(BITS);  // k, bytes per chunk; codes a word
  constexpr int SPLIT = BITS == 3 || BITS == 6 ? 3 * PER : CK;  // codes from here on: split over the words' tops
  const vi low2 = vi_set1(3);
  vi cur[NV], a30[NV], b30[NV];  // int3 / int6: A >> 30, B >> 30 (see the layout above)
#pragma GCC unroll 32
  for (int j = 0; j < CK; ++j) {
    vf w[NV];
    for (int v = 0; v < NV; ++v) {
      if (j < SPLIT) {
        if (j % PER == 0) {  // next word (int3 / int6: A, B, C)
          if (SPLIT < CK && j == PER) a30[v] = cur[v];
          if (SPLIT < CK && j == 2 * PER) b30[v] = cur[v];
          cur[v] = vi_load(rec[v] + c * CB + 64 * (j / PER));
        }
        w[v] = decode<BITS>(lut, cur[v]);
        cur[v] = vi_srl(cur[v], BITS);
      } else if (BITS == 6) {  // k = 15: bits 0-1 A >> 30, 2-3 B >> 30, 4-5 C >> 30
        w[v] = decode<BITS>(lut, vi_select(low2, a30[v], vi_select(vi_sll(low2, 2), vi_sll(b30[v], 2),
                                                                   vi_sll(cur[v], 4))));
      } else {  // int3, k = 30: low bits A >> 30, third bit B[30]; k = 31: C >> 30 and B[31]
        w[v] = vf_perm(lut, j == 30 ? vi_select(low2, a30[v], vi_sll(b30[v], 2))
                                    : vi_select(low2, cur[v], vi_sll(b30[v], 1)));
      }
    }
    f(j, w);
  }
}

// The fp32 tile: each code a float (for_codes), one FMA per row of x.
template <int BITS, int MT, int NV>
static void tile(const Args& a, int p0, int m0) {
  constexpr int CK = chunk_k(BITS);
  const int nchunk = a.G / CK;
  const vf lut = make_lut(BITS);
  walk<MT, NV>(a, p0, m0, 0.f, [&](int g, const uint8_t* const* rec, vf (&acc)[MT][NV]) {
    for (int c = 0; c < nchunk; ++c) {
      const float* xk[MT];
      for (int m = 0; m < MT; ++m) xk[m] = a.x + (long)(m0 + m) * a.K + g * a.G + c * CK;
      for_codes<BITS, NV>(rec, c, lut, [&](int j, const vf* w) {
        for (int m = 0; m < MT; ++m) {
          const vf xb = vf_set1(xk[m][j]);
          for (int v = 0; v < NV; ++v) acc[m][v] = vf_fma(xb, w[v], acc[m][v]);
        }
      });
    }
  });
}

// Panel p's 16 rows of W, transposed, in bf16: out[k * ldo + i] = s * q + b of row 16 p + i rounded to bf16
// (out: the panel's first column of W^T). A prefill's many rows multiply W^T with aten's bf16 GEMM.
template <int BITS>
static void decode_panel(const Args& a, int p, uint16_t* out, long ldo) {
  constexpr int CK = chunk_k(BITS);
  const int ng = a.K / a.G, nchunk = a.G / CK;
  const vf lut = make_lut(BITS);
  const uint8_t* panel = a.w + p * a.panel_bytes;
  uint16_t h[3];
  memcpy(h, panel, 6);
  const vf ds = vf_set1(_cvtsh_ss(h[0])), db = vf_set1(_cvtsh_ss(h[1])), lo = vf_set1(_cvtsh_ss(h[2]));
  for (int g = 0; g < ng; ++g) {
    const uint8_t* rec[1] = {panel + HEADER + g * a.rec_bytes};
    const vf s = vf_mul(ds, vf_load_u8(rec[0] + a.code_bytes));
    const vf b = vf_fma(db, vf_load_u8(rec[0] + a.code_bytes + 16), lo);
    for (int c = 0; c < nchunk; ++c)
      for_codes<BITS, 1>(rec, c, lut, [&](int j, const vf* w) {
        vf_store_bf16(out + ((long)g * a.G + c * CK + j) * ldo, vf_round_bf16(vf_fma(s, w[0], b)));
      });
  }
}

#if defined(__AVX512BF16__)
#define LOWBIT_BF16 1
// The tile for a bf16 x with 4- or 2-bit codes (x exact in bf16, so nothing is rounded that the fp32 tile
// keeps): two codes per 32-bit lane become a bf16 pair in one vpermw (code - MID from a table, exact), and one
// vdpbf16ps adds both products to the row's fp32 accumulator: 3 vector ops per 32 weights (the fp32 tile: 3 per
// 16). A word's low half holds codes 0..PER/2-1 and its high half the rest, so pair j is (code j, code j +
// PER/2) and x is laid out as the same pairs (xp).
template <int BITS, int MT, int NV>
static void tile_bf16(const Args& a, int p0, int m0) {
  constexpr int CK = chunk_k(BITS), CB = 2 * BITS * CK, HALF = CK / 2;
  const int nchunk = a.G / CK;
  thread_local std::vector<uint32_t> xpbuf;
  xpbuf.resize((long)MT * a.K / 2);
  for (int m = 0; m < MT; ++m) {  // x's bf16 bits as the code pairs: (x[k0 + j], x[k0 + j + HALF]) per chunk k0
    const uint32_t* xr = (const uint32_t*)(a.x + (long)(m0 + m) * a.K);
    uint32_t* xp = xpbuf.data() + (long)m * a.K / 2;
    for (int k0 = 0; k0 < a.K; k0 += CK)
      for (int j = 0; j < HALF; ++j) xp[k0 / 2 + j] = (xr[k0 + j] >> 16) | (xr[k0 + j + HALF] & 0xFFFF0000u);
  }
  constexpr int MID = 1 << (BITS - 1);  // codes centred: code - MID, small exact bf16 values
  alignas(64) uint16_t tab[32];
  for (int i = 0; i < 32; ++i) tab[i] = bf16_round((float)((i & ((1 << BITS) - 1)) - MID));
  const vi lut = _mm512_load_si512(tab);
  walk<MT, NV>(a, p0, m0, (float)MID, [&](int g, const uint8_t* const* rec, vf (&acc)[MT][NV]) {
    for (int c = 0; c < nchunk; ++c) {
      const uint32_t* xp[MT];
      for (int m = 0; m < MT; ++m) xp[m] = xpbuf.data() + (long)m * a.K / 2 + (g * a.G + c * CK) / 2;
      vi cur[NV];
      for (int v = 0; v < NV; ++v) cur[v] = vi_load(rec[v] + c * CB);
#pragma GCC unroll 8
      for (int j = 0; j < HALF; ++j) {
        __m512bh w[NV];
        for (int v = 0; v < NV; ++v) {
          w[v] = (__m512bh)_mm512_permutexvar_epi16(cur[v], lut);  // reads 5 index bits: the table repeats
          cur[v] = vi_srl(cur[v], BITS);
        }
        for (int m = 0; m < MT; ++m) {
          const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xp[m][j]);
          for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], w[v], xb);
        }
      }
    }
  });
}
#else
#define LOWBIT_BF16 0
#endif

extern "C" int dynaexq_lowbit_bf16_dot() { return LOWBIT_BF16; }

// The int8-activation tile (llama.cpp's Q8_0 scheme) for 4- and 2-bit codes on AVX2 builds: decoding a code into
// a float per weight (and + convert + FMA: 4 ops per 8 weights) is what bounds the fp32 tile, at decode's few rows
// ~half the read bandwidth per core. Here each block of XB inputs of a row of x is quantized once per call to
// int8 (xq = round(x / dx), dx = max|x| / 127) and the codes stay bytes: one vpmaddubsw multiplies 32 codes by 32
// xq, one vpmaddwd sums them into int32 (~8 ops per 64 weights), and a block's sum is dx * sum(q * xq). Not
// exact: x is rounded to 8 bits per block (the weights' offsets multiply the exact sum of x); bf16/fp16 x only
// (fp32 x keeps the fp32 tile), at every row count (a row's result does not depend on its batch), and
// dynaexq_lowbit_set_int8_x(0) keeps every tile exact.
#if ISA == 256
static int int8_x = 1;
#else
static int int8_x = 0;  // AVX-512 builds: the fp32 tile (or the exact bf16 pair tile) at every row count
#endif
extern "C" int dynaexq_lowbit_set_int8_x(int on) {
  const int was = int8_x;
  if (ISA == 256) int8_x = on;
  return was;
}
#if ISA == 256

constexpr int XB = 32;  // inputs per int8 block of x (llama.cpp's Q8_0): groups of 32 and 64 take 1 and 2

// Rows m0..m0+mt of a.x (fp32) quantized per block of XB inputs for BITS-bit codes, laid out as the tile's
// broadcasts read them: per chunk of CK inputs, int4: [x0 x2 x4 x6][x1 x3 x5 x7] (a byte's low / high nibble),
// int2: the four sets [x(t) x(4+t) x(8+t) x(12+t)], t = 0..3 (a byte's 2-bit field t), and each block's sum of
// the int8 values. All a.M rows are quantized at once, per thread, for one block of x (a.epoch): every tile of
// every unit of output rows of that block reuses them.
template <int BITS>
static void quantize_x(const Args& a, int m0, int mt, const int8_t** xq, const float** dx, const int** xqsum) {
  struct Cache { long epoch = -1; const float* x = nullptr; int M = 0, K = 0, bits = 0;
                 std::vector<int8_t> q; std::vector<float> d; std::vector<int> s; };
  thread_local Cache c;
  const int nb = a.K / XB;
  if (!(c.epoch == a.epoch && c.x == a.x && c.M == a.M && c.K == a.K && c.bits == BITS)) {
    c.epoch = a.epoch; c.x = a.x; c.M = a.M; c.K = a.K; c.bits = BITS;
    c.q.resize((long)a.M * a.K);
    c.d.resize((long)a.M * nb);
    c.s.resize((long)a.M * nb);
    constexpr int CK = chunk_k(BITS), SETS = BITS == 2 ? 4 : 2, PER = CK / SETS;
    for (int m = 0; m < a.M; ++m) {
      const float* xr = a.x + (long)m * a.K;
      int8_t* qr = c.q.data() + (long)m * a.K;
      for (int b = 0; b < nb; ++b) {
        float amax = 0;
        for (int k = b * XB; k < (b + 1) * XB; ++k) amax = std::max(amax, std::fabs(xr[k]));
        const float d = amax / 127.f;
        c.d[(long)m * nb + b] = d;
        int sum = 0;
        for (int k0 = b * XB; k0 < (b + 1) * XB; k0 += CK)
          for (int t = 0; t < SETS; ++t)
            for (int i = 0; i < PER; ++i) {
              const int q = d == 0 ? 0 : (int)std::nearbyint(xr[k0 + i * SETS + t] / d);
              qr[k0 + t * PER + i] = (int8_t)q;
              sum += q;
            }
        c.s[(long)m * nb + b] = sum;
      }
    }
  }
  for (int m = 0; m < mt; ++m) {
    const long r = m0 + m;
    xq[m] = c.q.data() + r * a.K; dx[m] = c.d.data() + r * nb; xqsum[m] = c.s.data() + r * nb;
  }
}

template <int BITS, int MT>
static void tile_int8_x(const Args& a, int p0, int m0) {
  constexpr int CK = chunk_k(BITS), CB = 2 * BITS * CK, SETS = BITS == 2 ? 4 : 2, BC = XB / CK;
  const int nblock = a.G / XB;
  constexpr int MID = 1 << (BITS - 1);  // the sums are of centred codes (code - MID): exact in int32, and the
  // rounding of x then weighs |W|'s scale, not that of the codes' offset (walk adds MID * s * sum(x) back)
  const int8_t* xq[MT];
  const float* dx[MT];
  const int* xqsum[MT];
  quantize_x<BITS>(a, m0, MT, xq, dx, xqsum);
  const __m256i mask = _mm256_set1_epi8(BITS == 4 ? 0x0F : 0x03), ones = _mm256_set1_epi16(1);
  walk<MT, 1>(a, p0, m0, (float)MID, [&](int g, const uint8_t* const* rec, vf (&acc)[MT][1]) {
    for (int m = 0; m < MT; ++m) acc[m][0] = vf_zero();
    for (int b = 0; b < nblock; ++b) {
      __m256i sum[MT][2];  // int32 per row: sum over the block of code * xq
      for (int m = 0; m < MT; ++m) sum[m][0] = sum[m][1] = _mm256_setzero_si256();
      for (int c = b * BC; c < (b + 1) * BC; ++c) {
        const __m256i w[2] = {_mm256_loadu_si256((const __m256i*)(rec[0] + c * CB)),
                              _mm256_loadu_si256((const __m256i*)(rec[0] + c * CB + 32))};  // rows 0-7, 8-15
        __m256i u[2][SETS];  // set t: each byte's code t as a byte
        for (int h = 0; h < 2; ++h)
          for (int t = 0; t < SETS; ++t) u[h][t] = _mm256_and_si256(_mm256_srli_epi16(w[h], BITS * t), mask);
        for (int m = 0; m < MT; ++m) {
          const int8_t* xc = xq[m] + g * a.G + c * CK;
          __m256i p[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};  // int16: <= SETS * 2 * 15 * 127
          for (int t = 0; t < SETS; ++t) {
            int32_t xs;
            memcpy(&xs, xc + 4 * t, 4);
            const __m256i xb = _mm256_set1_epi32(xs);
            for (int h = 0; h < 2; ++h) p[h] = _mm256_add_epi16(p[h], _mm256_maddubs_epi16(u[h][t], xb));
          }
          for (int h = 0; h < 2; ++h) sum[m][h] = _mm256_add_epi32(sum[m][h], _mm256_madd_epi16(p[h], ones));
        }
      }
      for (int m = 0; m < MT; ++m) {
        const int blk = (g * a.G) / XB + b;
        const __m256 d = _mm256_set1_ps(dx[m][blk]);
        const __m256i off = _mm256_set1_epi32(MID * xqsum[m][blk]);
        acc[m][0] = vf{_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sum[m][0], off)), d, acc[m][0].a),
                       _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sum[m][1], off)), d, acc[m][0].b)};
      }
    }
  });
}
#endif

template <int BITS, int MT = 1>
static void run_rows(const Args& a, int p0, int np, int m0, int mt) {  // mt rows, panels p0..p0+np
  if (mt != MT) {
    if constexpr (MT < MT_MAX) run_rows<BITS, MT + 1>(a, p0, np, m0, mt);
    return;
  }
  constexpr int NV = nv_for(MT);
  int p = p0;
#if LOWBIT_BF16
  // the pair tile wins where decoding the codes is the work (few rows); with more rows the products are, and
  // vdpbf16ps (half an FMA's rate here per pair of products) loses to the fp32 tile (measured on 1536 x 2048:
  // int4 224 vs 199 us at 4 rows, 1735 vs 1386 at 32; int2 238 vs 193 at 4, 680 vs 603 at 16; at 1-2 rows
  // int4 66 vs 75, int2 55 vs 73)
  if constexpr ((BITS == 2 || BITS == 4) && MT <= 2) {
    if (a.xdt == BF16) {
      for (; p + NV <= p0 + np; p += NV) tile_bf16<BITS, MT, NV>(a, p, m0);
      for (; p < p0 + np; ++p) tile_bf16<BITS, MT, 1>(a, p, m0);
      return;
    }
  }
#elif ISA == 256
  if constexpr (BITS == 2 || BITS == 4) {
    if (int8_x && a.xdt != F32 && a.G % XB == 0) {  // fp32 x asks for fp32 arithmetic: it keeps the exact tile
      for (; p < p0 + np; ++p) tile_int8_x<BITS, MT>(a, p, m0);
      return;
    }
  }
#endif
  for (; p + NV <= p0 + np; p += NV) tile<BITS, MT, NV>(a, p, m0);
  for (; p < p0 + np; ++p) tile<BITS, MT, 1>(a, p, m0);
}

// every row of a.x times panels up*u .. up*u + up - 1
static void run_unit(const Args& a, int bits, int u, int P, int up = 4) {
  const int p0 = up * u, np = std::min(up, P - p0);
  for (int m0 = 0; m0 < a.M; m0 += MT_MAX) {
    const int mt = std::min(MT_MAX, a.M - m0);
    if (bits == 2) run_rows<2>(a, p0, np, m0, mt);
    else if (bits == 3) run_rows<3>(a, p0, np, m0, mt);
    else if (bits == 6) run_rows<6>(a, p0, np, m0, mt);
    else run_rows<4>(a, p0, np, m0, mt);
  }
}

#endif

// Rows n0..n0+nn-1 of the blob `w` of a [N, K] 2/3/4/6-bit weight with groups of G, transposed into bf16:
// out [K, nn] (n0, nn multiples of 16), OpenMP over panels. Returns 0, -1 when built without a kernel, -2 for
// rows outside the weight.
extern "C" int dynaexq_lowbit_decode(int bits, int G, int N, int K, const uint8_t* w, long n0, long nn,
                                     uint16_t* out, int nthreads) {
#if ISA
  if (n0 % 16 || nn % 16 || n0 < 0 || n0 + nn > N) return -2;
  Args a;
  a.N = N; a.K = K; a.G = G; a.w = w;
  a.code_bytes = 2L * G * bits;
  a.rec_bytes = a.code_bytes + 32;
  a.panel_bytes = HEADER + (K / G) * a.rec_bytes;
  const int p0 = (int)(n0 / 16), P = (int)(nn / 16);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int p = 0; p < P; ++p) {
    if (bits == 2) decode_panel<2>(a, p0 + p, out + 16L * p, nn);
    else if (bits == 3) decode_panel<3>(a, p0 + p, out + 16L * p, nn);
    else if (bits == 6) decode_panel<6>(a, p0 + p, out + 16L * p, nn);
    else decode_panel<4>(a, p0 + p, out + 16L * p, nn);
  }
  return 0;
#else
  return -1;
#endif
}

// y[M, N] (dtype dt) = x[M, K] (dtype dt) @ W^T for the blob `w` of a [N, K] 2/3/4/6-bit weight with groups
// of G (N % 16 == 0, K % G == 0, G a multiple of the chunk: 8 / 16 / 32 / 16 for 4 / 2 / 3 / 6 bits). Returns
// 0, or -1 when built without a kernel.
extern "C" int dynaexq_lowbit_mm(int bits, int G, int M, int N, int K, const void* x, int dt,
                                 const uint8_t* w, void* y, int nthreads) {
#if ISA
  constexpr int MB = 64;  // rows of x converted to fp32 at a time
  const int ng = K / G, P = N / 16, units = (P + 3) / 4, es = dt == F32 ? 4 : 2;
  thread_local std::vector<float> buf;  // per calling thread; grows once, reused across calls
  buf.resize((long)std::min(M, MB) * (K + ng));
  Args a;
  a.N = N; a.K = K; a.G = G; a.w = w; a.ydt = dt; a.xdt = dt;
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
    a.x = xf; a.xsum = xs; a.y = (char*)y + (long)r0 * N * es; a.epoch = ++x_epochs;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int u = 0; u < units; ++u) run_unit(a, bits, u, P);
  }
  return 0;
#else
  return -1;
#endif
}

// Every expert of one 2/3/4/6-bit tier in one call (the grouped driver of simd.h): x [R, K] holds the routed
// rows grouped by expert, counts[e] of them for expert e (e ascending, all E experts); ptrs [E, 3] holds expert
// e's blob in ptrs[e, 0], or 0 when e is not of this tier (its rows of y are left alone). y [R, N], x's dtype.
extern "C" int dynaexq_lowbit_grouped(int bits, int G, int N, int K, int E, const int64_t* counts,
                                      const int64_t* ptrs, const void* x, int dt, void* y, int nthreads) {
#if ISA
  std::vector<int64_t> blobs(E);
  for (int e = 0; e < E; ++e) blobs[e] = ptrs[3 * e];
  const int ng = K / G, P = N / 16, es = dt == F32 ? 4 : 2;
  Args base;
  base.N = N; base.K = K; base.G = G; base.ydt = dt; base.xdt = dt;
  base.code_bytes = 2L * G * bits;
  base.rec_bytes = base.code_bytes + 32;
  base.panel_bytes = HEADER + ng * base.rec_bytes;
  // a unit (one scheduling step): about 4 per thread over the call's panels, in multiples of 4 panels, at most
  // an expert's. Long units stream better: each starts cold (its first records unprefetched) and its last
  // prefetch is another unit's. Against units of 4 panels, on 2 threads of a Xeon: 8 experts x 1 row, int4
  // 1536 x 2048 724 -> ~630 us, 2048 x 768 485 -> ~330 us; `bench/generate.py --layers 2 --batches 1,8
  // --policies uniform:int4+bf16,uniform:int2+bf16` int4 1.05x at B = 1, 1.15x at 8, int2 1.0x / 1.07x
  long panels = 0;
  for (int e = 0; e < E; ++e) panels += blobs[e] && counts[e] ? P : 0;
  const int up = (int)std::min<long>((P + 3) / 4 * 4, std::max<long>(4, panels / (4L * nthreads) / 4 * 4));
  grouped_rows(E, counts, blobs.data(), K, ng, G, x, dt, (P + up - 1) / up, nthreads,
               [&](int e, long r0, long m, int u, const float* xf, const float* xs, long epoch) {
    Args a = base;
    a.M = (int)m; a.epoch = epoch; a.w = (const uint8_t*)blobs[e];
    a.x = xf; a.xsum = xs; a.y = (char*)y + r0 * N * es;
    run_unit(a, bits, u, P, up);
  });
  return 0;
#else
  return -1;
#endif
}

// Rows of the weight itself, decoded from the blob: out[i, :] = W[rows[i], :] in dtype dt (an embedding read
// by rows from the same resident bytes its tied output head multiplies with). Scalar: a step reads few rows.
extern "C" int dynaexq_lowbit_rows(int bits, int N, int K, int G, const uint8_t* w, const int64_t* rows, long R,
                                   void* out, int dt) {
#if ISA
  const int ck = chunk_k(bits), per = chunk_per(bits);
  if (!ck || N % 16 || K % G || G % ck) return -1;
  const int ng = K / G, nw = ck / per, chunks = G / ck, es = dt == F32 ? 4 : 2;
  const long code_bytes = 2L * G * bits, rec_bytes = code_bytes + 32, panel_bytes = HEADER + ng * rec_bytes;
  const uint32_t mask = (1u << bits) - 1;
  for (long i = 0; i < R; ++i) {
    const long n = rows[i];
    if (n < 0 || n >= N) return -2;
    const uint8_t* panel = w + (n / 16) * panel_bytes;
    const int lane = (int)(n % 16);
    uint16_t h[3];
    memcpy(h, panel, 6);
    const float ds = _cvtsh_ss(h[0]), db = _cvtsh_ss(h[1]), bmin = _cvtsh_ss(h[2]);
    char* o = (char*)out + i * (long)K * es;
    for (int g = 0; g < ng; ++g) {
      const uint8_t* rec = panel + HEADER + g * rec_bytes;
      const float s = ds * rec[code_bytes + lane], b = bmin + db * rec[code_bytes + 16 + lane];
      for (int c = 0; c < chunks; ++c) {
        uint32_t word[3] = {0, 0, 0};
        for (int wi = 0; wi < nw; ++wi) memcpy(&word[wi], rec + 4L * ((c * nw + wi) * 16 + lane), 4);
        for (int j = 0; j < ck; ++j) {
          uint32_t q;
          if (j < per * nw) q = (word[j / per] >> (bits * (j % per))) & mask;
          else if (bits == 6) q = (word[0] >> 30) | ((word[1] >> 30) << 2) | ((word[2] >> 30) << 4);
          else if (j == 30) q = (word[0] >> 30) | (((word[1] >> 30) & 1) << 2);
          else q = (word[2] >> 30) | ((word[1] >> 31) << 2);
          store1(o + ((long)g * G + (long)c * ck + j) * es, dt, s * (float)q + b);
        }
      }
    }
  }
  return 0;
#else
  return -1;
#endif
}
