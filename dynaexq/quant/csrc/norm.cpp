// RMSNorm as transformers' MoE models compute it, one call for all rows: fp32 sum of squares per row,
// inv = 1 / sqrt(mean + eps), then either y = w * round(x * inv) (Llama, Qwen, Mixtral, OLMoE, DeepSeek:
// round_first = 1; round() = to the activation dtype) or y = round(w * x * inv) (GPT-OSS: round_first = 0).
//   x, out [R, H], w [H]: one dtype dt, contiguous. Parallel over rows when there are several.
#include <math.h>

#include "simd.h"

extern "C" int dynaexq_rms_norm(long R, int H, const void* x, const void* w, int dt, float eps, int round_first,
                                void* out, int nthreads) {
#if ISA
  if (H <= 0) return -1;
  const int es = dt == F32 ? 4 : 2;
  std::vector<float> wf(H);
  to_f32(w, dt, wf.data(), H);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (R >= 4)
  for (long r = 0; r < R; ++r) {
    thread_local std::vector<float> xf;
    xf.resize(H);
    to_f32((const char*)x + r * H * es, dt, xf.data(), H);
    float ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int h = 0; h < H; ++h) ss += xf[h] * xf[h];
    const float inv = 1.0f / sqrtf(ss / H + eps);
    char* o = (char*)out + r * H * es;
    for (int h = 0; h < H; ++h) {
      const float v = round_first ? wf[h] * round_to(dt, xf[h] * inv) : wf[h] * (xf[h] * inv);
      store1(o + (long)h * es, dt, v);
    }
  }
  return 0;
#else
  return -1;
#endif
}
