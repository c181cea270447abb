// The experts' SwiGLU activation as transformers computes it, in one call: a = round(round(silu(gate)) * up) with
// silu(x) = x / (1 + exp(-x)) in fp32 and round() into the activation dtype (aten's silu and mul on bf16/fp16
// tensors round after each op). h [R, 2I] holds gate | up per row (the halves of a fused gate_up); a [R, I].
// Parallel over rows only when the work is large (prefill): a decode step's few rows run serially.
#include <math.h>

#include "simd.h"

extern "C" int dynaexq_swiglu(long R, int I, const void* h, int dt, void* a, int nthreads) {
#if ISA
  if (I <= 0) return -1;
  const int es = dt == F32 ? 4 : 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (R * I >= (1L << 18))
  for (long r = 0; r < R; ++r) {
    thread_local std::vector<float> g, u;
    g.resize(I);
    u.resize(I);
    to_f32((const char*)h + r * 2L * I * es, dt, g.data(), I);
    to_f32((const char*)h + (r * 2L + 1) * I * es, dt, u.data(), I);
    char* o = (char*)a + r * (long)I * es;
    for (int i = 0; i < I; ++i) store1(o + (long)i * es, dt, round_to(dt, g[i] / (1.0f + expf(-g[i]))) * u[i]);
  }
  return 0;
#else
  return -1;
#endif
}
