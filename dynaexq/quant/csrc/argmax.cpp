// Greedy sampling's argmax over a vocabulary, one call for all rows (aten's takes ~0.6 ms for one bf16 row of
// 152k here): out[r] = the first index of the largest value of row r, a NaN counting as the largest (as aten's).
//   x [R, V] (dtype dt, contiguous) -> out [R] int64.
#include <math.h>

#include "simd.h"

extern "C" int dynaexq_argmax(long R, long V, const void* x, int dt, int64_t* out, int nthreads) {
#if ISA
  if (V <= 0) return -1;
  const int es = dt == F32 ? 4 : 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (R >= 4)
  for (long r = 0; r < R; ++r) {
    constexpr long C = 4096;  // converted to fp32 a chunk at a time
    thread_local std::vector<float> buf;
    buf.resize(C);
    float best = -INFINITY;
    long at = 0;
    bool nan = false;
    for (long c0 = 0; c0 < V && !nan; c0 += C) {
      const long n = std::min(C, V - c0);
      to_f32((const char*)x + (r * V + c0) * es, dt, buf.data(), n);
      const float* v = buf.data();
      float m = -INFINITY;  // the chunk's max first (vectorized: NaNs are looked for apart), then its first
      int has_nan = 0;      // position only if it wins
#pragma omp simd reduction(max : m) reduction(| : has_nan)
      for (long i = 0; i < n; ++i) {
        m = v[i] > m ? v[i] : m;
        has_nan |= v[i] != v[i];
      }
      if (has_nan) {
        for (long i = 0; i < n; ++i)
          if (buf[i] != buf[i]) { at = c0 + i; nan = true; break; }
      } else if (m > best || (c0 == 0 && m == best)) {
        best = m;
        for (long i = 0; i < n; ++i)
          if (buf[i] == m) { at = c0 + i; break; }
      }
    }
    out[r] = at;
  }
  return 0;
#else
  return -1;
#endif
}
