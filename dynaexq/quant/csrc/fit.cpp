// GPTQ's per-group fit (quant/quantize.py `_fit_torch`, the reference it is tested against), fused: per group of
// G weights w (a row of wg) and their weights a (diag H), the (s, b) of w ~ s * q + b, q = clamp(round((w - b) /
// s), 0, qmax), minimizing sum a (w - s q - b)^2: for each shrink factor of the grid, from the shrunk min/max
// range, `iters` rounds of alternating least squares (codes, then the weighted regression of w on them); the
// best by weighted error. The torch version makes ~10 passes over a [B, N, G] stack per round (memory-bound:
// most of GPTQ's time); here a group stays in registers. Sums are in fp32 in another order than torch's, so a
// code at a rounding boundary can differ (tests bound the difference in error).
//   wg [B, R, C, G] fp32 at element strides ws[4] (GPTQ reads its groups straight out of the transposed weights:
//   no copy), a [B, C, G] fp32 contiguous (the same for every r), grid [ngrid] -> s, b [B, R, C] fp32 contiguous.
//   G <= 256. Parallel over the groups.
#include <math.h>
#include <stdint.h>

#include <algorithm>

static inline float code(float w, float inv, float nb, float qmax) {
  return std::min(std::max(nearbyintf(w * inv + nb), 0.f), qmax);
}

extern "C" int dynaexq_fit(long B, long R, long C, int G, const float* w, const int64_t* ws, const float* a, int qmax,
                           int iters, const float* grid, int ngrid, float* s_out, float* b_out, int nthreads) {
  if (G <= 0 || G > 256 || ngrid <= 0) return -1;
  const long groups = B * R * C;
  const float fq = (float)qmax;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (long i = 0; i < groups; ++i) {
    const long bi = i / (R * C), r = i / C % R, c = i % C;
    const float* src = w + bi * ws[0] + r * ws[1] + c * ws[2];
    const float* ag = a + (bi * C + c) * G;
    float wg[256], aw[256];
    for (int k = 0; k < G; ++k) wg[k] = src[k * ws[3]];
    float mn = wg[0], mx = wg[0], sa = 0, saw = 0;
    for (int k = 0; k < G; ++k) {
      mn = std::min(mn, wg[k]);
      mx = std::max(mx, wg[k]);
      aw[k] = ag[k] * wg[k];
      sa += ag[k];
      saw += aw[k];
    }
    sa = std::max(sa, 1e-30f);
    const float mid = (mn + mx) / 2, mw = saw / sa;
    float best_s = 0, best_b = 0, best_err = 0;
    for (int t = 0; t < ngrid; ++t) {
      const float lo = mid + (mn - mid) * grid[t], hi = mid + (mx - mid) * grid[t];
      float s = std::max((hi - lo) / fq, 1e-12f), b = lo;
      for (int it = 0; it < iters; ++it) {
        const float inv = 1 / s, nb = -b * inv;
        float saq = 0, saqq = 0, sqaw = 0;
#pragma omp simd reduction(+ : saq, saqq, sqaw)
        for (int k = 0; k < G; ++k) {
          const float q = code(wg[k], inv, nb, fq), aq = ag[k] * q;
          saq += aq;
          saqq += aq * q;
          sqaw += q * aw[k];
        }
        const float mq = saq / sa, var = saqq - saq * mq, cov = sqaw - saq * mw;
        s = std::max(var > 1e-20f ? cov / var : s, 1e-12f);
        b = mw - s * mq;
      }
      const float inv = 1 / s, nb = -b * inv;
      float err = 0;
#pragma omp simd reduction(+ : err)
      for (int k = 0; k < G; ++k) {
        const float r = (wg[k] - b) - code(wg[k], inv, nb, fq) * s;
        err += ag[k] * r * r;
      }
      if (t == 0 || err < best_err) {
        best_s = s; best_b = b; best_err = err;
      }
    }
    s_out[i] = best_s;
    b_out[i] = best_b;
  }
  return 0;
}
