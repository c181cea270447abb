// A router's top-k as transformers' softmax routers compute it (Qwen2/3-MoE, OLMoE, Mixtral), in one call: per
// row p = softmax(logits) in fp32 (max subtracted, exp, divided by the sum), the k largest in descending order,
// their values w (renormalized by their fp32 sum if asked). Transformers' version is five eager ops, each costly in
// a decode step whose weight stream has just evicted their code and data from the caches.
//   logits [T, E] (dtype dt) -> p [T, E], w [T, K] fp32, idx [T, K]; tie[t] = 1 when row t has two equal values
//   among its top k or at its k-th place (equal bf16 logits): the caller then takes aten's own top-k of that row,
//   so a tie goes where transformers' goes. Parallel over rows for large T.
#include <math.h>

#include "simd.h"

extern "C" int dynaexq_softmax_topk(long T, int E, int K, const void* logits, int dt, int renorm, float* p,
                                    float* w, int64_t* idx, uint8_t* tie, int nthreads) {
#if ISA
  if (E <= 0 || K <= 0 || K > E) return -1;
  const int es = dt == F32 ? 4 : 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (T >= 64)
  for (long t = 0; t < T; ++t) {
    float* r = p + t * E;
    to_f32((const char*)logits + t * E * es, dt, r, E);
    float m = r[0], z = 0;
    for (int e = 1; e < E; ++e) m = std::max(m, r[e]);
    for (int e = 0; e < E; ++e) z += (r[e] = expf(r[e] - m));
    for (int e = 0; e < E; ++e) r[e] /= z;
    int64_t* ix = idx + t * K;
    float* wt = w + t * K;
    float sum = 0;
    tie[t] = 0;
    for (int j = 0; j < K; ++j) {  // k passes over E (K is small); the k-th value's equals are a tie
      int best = -1;
      for (int e = 0; e < E; ++e) {
        bool taken = false;
        for (int i = 0; i < j && !taken; ++i) taken = ix[i] == e;
        if (taken) continue;
        if (best >= 0 && r[e] == r[best]) tie[t] = 1;
        if (best < 0 || r[e] > r[best]) best = e;
      }
      ix[j] = best;
      sum += (wt[j] = r[best]);
    }
    for (int e = 0; e < E && !tie[t]; ++e) {  // a value equal to the k-th outside the top k
      bool taken = false;
      for (int i = 0; i < K && !taken; ++i) taken = ix[i] == e;
      if (!taken && r[e] == wt[K - 1]) tie[t] = 1;
    }
    if (renorm)
      for (int j = 0; j < K; ++j) wt[j] /= sum;
  }
  return 0;
#else
  return -1;
#endif
}
