// The kernels of this directory as PyTorch operators (torch.ops.dynaexq.*): each checks its tensors' device,
// dtype, shape and layout with TORCH_CHECK (a Python RuntimeError naming the problem), allocates its output
// with ATen and runs the C kernel with at::get_num_threads() threads. Registered through the dispatcher, they
// cost ~1 us a call from Python (ctypes plus Python-side checks cost ~8) and compose with torch.compile: their
// fake (meta) implementations, which give output shapes without computing, live in lowbit_cpu._register_fakes.
// The namespace is DYNAEXQ_NS: a variant build (lowbit_cpu.build(extra_cflags)) registers its own, since two
// libraries cannot register one namespace in a process.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifndef DYNAEXQ_NS
#define DYNAEXQ_NS dynaexq
#endif

extern "C" {
int dynaexq_lowbit_isa();
int dynaexq_lowbit_bf16_dot();
int dynaexq_lowbit_set_int8_x(int on);
int dynaexq_lowbit_pack(int bits, int N, int K, int G, const uint8_t* data, const uint8_t* scale,
                        const uint8_t* zero, const uint8_t* ranges, uint8_t* out);
int dynaexq_lowbit_mm(int bits, int G, int M, int N, int K, const void* x, int dt, const uint8_t* w, void* y,
                      int nthreads);
int dynaexq_lowbit_grouped(int bits, int G, int N, int K, int E, const int64_t* counts, const int64_t* ptrs,
                           const void* x, int dt, void* y, int nthreads);
int dynaexq_lowbit_rows(int bits, int N, int K, int G, const uint8_t* w, const int64_t* rows, long R, void* out,
                        int dt);
int dynaexq_lowbit_decode(int bits, int G, int N, int K, const uint8_t* w, long n0, long nn, uint16_t* out,
                          int nthreads);
int dynaexq_rowmajor_grouped(int wt, int N, int K, int E, const int64_t* counts, const int64_t* ptrs,
                             const void* x, int dt, void* y, int nthreads);
int dynaexq_route(int T, int K, int E, int H, const int64_t* idx, const void* w, int wdt, const void* hidden,
                  int dt, int64_t* counts, int64_t* token_counts, float* mass, int64_t* order, void* x,
                  int nthreads);
int dynaexq_combine(int T, int K, int H, const int64_t* idx, const int64_t* order, const void* ys, const void* w,
                    int wdt, int dt, void* out, int nthreads);
int dynaexq_decode_attention(int B, int Hq, int Hkv, int D, int Dv, const void* q, int dt, const void* k,
                             const void* v, int kdt, int64_t krs, int64_t khs, int64_t kps, int64_t vrs,
                             int64_t vhs, int64_t vps, const int64_t* lens, float scale, void* out, int nthreads);
int dynaexq_rms_norm(long R, int H, const void* x, const void* w, int dt, float eps, int round_first, void* out,
                     int nthreads);
int dynaexq_qk_rope_cache(int B, int Hq, int Hkv, int D, int dt, const void* q, const void* k, const void* v,
                          const void* qn, const void* kn, float eps, const void* cos, const void* sin, void* keys,
                          void* values, long R, long C, const int64_t* rows, const int64_t* pos, void* qo);
int dynaexq_swiglu(long R, int I, const void* h, int dt, void* a, int nthreads);
int dynaexq_softmax_topk(long T, int E, int K, const void* logits, int dt, int renorm, float* p, float* w,
                         int64_t* idx, uint8_t* tie, int nthreads);
int dynaexq_argmax(long R, long V, const void* x, int dt, int64_t* out, int nthreads);
int dynaexq_fit(long B, long R, long C, int G, const float* w, const int64_t* ws, const float* a, int qmax, int iters,
                const float* grid, int ngrid, float* s_out, float* b_out, int nthreads);
}

namespace {

int dtype_code(const at::Tensor& t, const char* what) {  // as in simd.h
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_cpu(const at::Tensor& t, const char* what, int dim) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU, got ", t.device());
  TORCH_CHECK(dim < 0 || t.dim() == dim, what, " must have ", dim, " dimensions, got shape ", t.sizes());
}

void check_type(const at::Tensor& t, at::ScalarType type, const char* what) {
  TORCH_CHECK(t.scalar_type() == type, what, " must be ", type, ", got ", t.scalar_type());
}

void check_rc(int rc, const char* what) { TORCH_CHECK(rc == 0, what, " refused its arguments (rc ", rc, ")"); }

int64_t blob_bytes(int64_t bits, int64_t G, int64_t N, int64_t K) {
  return N / 16 * (6 + K / G * (2 * G * bits + 32));
}

int64_t isa() { return dynaexq_lowbit_isa(); }
int64_t bf16_dot() { return dynaexq_lowbit_bf16_dot(); }
int64_t set_int8_x(int64_t on) { return dynaexq_lowbit_set_int8_x((int)on); }

at::Tensor lowbit_pack(const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero,
                       const at::Tensor& ranges, int64_t bits, int64_t N, int64_t K, int64_t G) {
  for (auto* t : {&data, &scale, &zero, &ranges}) {
    check_cpu(*t, "lowbit_pack's inputs", -1);
    check_type(*t, at::kByte, "lowbit_pack's inputs");
    TORCH_CHECK(t->is_contiguous(), "lowbit_pack's inputs must be contiguous");
  }
  auto out = at::empty({blob_bytes(bits, G, N, K)}, data.options());
  check_rc(dynaexq_lowbit_pack(bits, N, K, G, data.data_ptr<uint8_t>(), scale.data_ptr<uint8_t>(),
                               zero.data_ptr<uint8_t>(), ranges.data_ptr<uint8_t>(), out.data_ptr<uint8_t>()),
           "lowbit_pack (bits 2/3/4, N % 16 == 0, K % G == 0, G a multiple of 8/16/32 for 4/2/3 bits)");
  return out;
}

void check_blob(const at::Tensor& blob, int64_t bits, int64_t G, int64_t N, int64_t K) {
  check_cpu(blob, "blob", 1);
  check_type(blob, at::kByte, "blob");
  TORCH_CHECK(blob.is_contiguous() && blob.numel() == blob_bytes(bits, G, N, K), "blob of ", blob.numel(),
              " bytes does not hold a ", bits, "-bit [", N, ", ", K, "] weight with groups of ", G);
}

at::Tensor lowbit_mm(const at::Tensor& x, const at::Tensor& blob, int64_t bits, int64_t G, int64_t N) {
  check_cpu(x, "x", 2);
  const int64_t K = x.size(1);
  check_blob(blob, bits, G, N, K);
  auto xc = x.contiguous();
  auto y = at::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0) return y;
  check_rc(dynaexq_lowbit_mm(bits, G, x.size(0), N, K, xc.data_ptr(), dtype_code(x, "x"), blob.data_ptr<uint8_t>(),
                             y.data_ptr(), at::get_num_threads()), "lowbit_mm");
  return y;
}

void check_grouped(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& ptrs, const at::Tensor& y) {
  check_cpu(x, "x", 2);
  check_cpu(y, "y", 2);
  check_cpu(counts, "counts", 1);
  check_cpu(ptrs, "ptrs", 2);
  check_type(counts, at::kLong, "counts");
  check_type(ptrs, at::kLong, "ptrs");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && ptrs.is_contiguous() && counts.is_contiguous(),
              "x, y, counts and ptrs must be contiguous");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.size(0) == y.size(0), "x ", x.sizes(), " ", x.scalar_type(),
              " and y ", y.sizes(), " ", y.scalar_type(), " must have the same rows and dtype");
  TORCH_CHECK(ptrs.size(0) == counts.size(0) && ptrs.size(1) == 3, "ptrs must be [E, 3] for counts [E], got ",
              ptrs.sizes());
}

void lowbit_grouped(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& ptrs, at::Tensor& y,
                    int64_t bits, int64_t G) {
  check_grouped(x, counts, ptrs, y);
  check_rc(dynaexq_lowbit_grouped(bits, G, y.size(1), x.size(1), counts.size(0), counts.data_ptr<int64_t>(),
                                  ptrs.data_ptr<int64_t>(), x.data_ptr(), dtype_code(x, "x"), y.data_ptr(),
                                  at::get_num_threads()), "lowbit_grouped");
}

void rowmajor_grouped(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& ptrs, at::Tensor& y,
                      int64_t wt) {
  check_grouped(x, counts, ptrs, y);
  check_rc(dynaexq_rowmajor_grouped(wt, y.size(1), x.size(1), counts.size(0), counts.data_ptr<int64_t>(),
                                    ptrs.data_ptr<int64_t>(), x.data_ptr(), dtype_code(x, "x"), y.data_ptr(),
                                    at::get_num_threads()), "rowmajor_grouped (N % 4 == 0, K % 16 == 0)");
}

at::Tensor lowbit_rows(const at::Tensor& blob, const at::Tensor& rows, int64_t bits, int64_t G, int64_t N,
                       int64_t K, at::ScalarType dtype) {
  check_blob(blob, bits, G, N, K);
  check_cpu(rows, "rows", 1);
  check_type(rows, at::kLong, "rows");
  auto rc = rows.contiguous();
  auto out = at::empty({rows.numel(), K}, blob.options().dtype(dtype));
  check_rc(dynaexq_lowbit_rows(bits, N, K, G, blob.data_ptr<uint8_t>(), rc.data_ptr<int64_t>(), rows.numel(),
                               out.data_ptr(), dtype_code(out, "dtype")), "lowbit_rows");
  return out;
}

// rows n0..n0+nn-1 of W, transposed into bf16 [K, nn], decoded from the blob (a prefill's GEMM operand)
at::Tensor lowbit_decode(const at::Tensor& blob, int64_t bits, int64_t G, int64_t N, int64_t K, int64_t n0,
                         int64_t nn) {
  check_blob(blob, bits, G, N, K);
  auto out = at::empty({K, nn}, blob.options().dtype(at::kBFloat16));
  check_rc(dynaexq_lowbit_decode(bits, G, N, K, blob.data_ptr<uint8_t>(), n0, nn, (uint16_t*)out.data_ptr(),
                                 at::get_num_threads()),
           "lowbit_decode (rows n0..n0+nn-1 of the weight, multiples of 16)");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& idx, const at::Tensor& w,
                                                     const at::Tensor& hidden, int64_t E, at::Tensor& token_counts,
                                                     at::Tensor& mass) {
  check_cpu(idx, "idx", 2);
  check_cpu(w, "w", 2);
  check_cpu(hidden, "hidden", 2);
  check_type(idx, at::kLong, "idx");
  check_type(token_counts, at::kLong, "token_counts");
  check_type(mass, at::kFloat, "mass");
  TORCH_CHECK(w.sizes() == idx.sizes() && hidden.size(0) == idx.size(0), "idx ", idx.sizes(), ", w ", w.sizes(),
              " and hidden ", hidden.sizes(), " must agree on [T, K] and T");
  TORCH_CHECK(token_counts.numel() == E && mass.numel() == E && token_counts.is_contiguous() && mass.is_contiguous(),
              "token_counts and mass must be contiguous [E] = [", E, "]");
  const int64_t T = idx.size(0), K = idx.size(1), H = hidden.size(1);
  auto ic = idx.contiguous(), wc = w.contiguous(), hc = hidden.contiguous();
  auto counts = at::empty({E}, idx.options());
  auto order = at::empty({T * K}, idx.options());
  auto x = at::empty({T * K, H}, hidden.options());
  int rc = dynaexq_route(T, K, E, H, ic.data_ptr<int64_t>(), wc.data_ptr(), dtype_code(w, "w"), hc.data_ptr(),
                         dtype_code(hidden, "hidden"), counts.data_ptr<int64_t>(), token_counts.data_ptr<int64_t>(),
                         mass.data_ptr<float>(), order.data_ptr<int64_t>(), x.data_ptr(), at::get_num_threads());
  TORCH_CHECK_VALUE(rc == 0, "an expert index outside [0, ", E, ") was routed to");
  return {counts, order, x};
}

at::Tensor combine(const at::Tensor& idx, const at::Tensor& order, const at::Tensor& ys, const at::Tensor& w) {
  check_cpu(idx, "idx", 2);
  check_cpu(ys, "ys", 2);
  check_type(idx, at::kLong, "idx");
  check_type(order, at::kLong, "order");
  const int64_t T = idx.size(0), K = idx.size(1), H = ys.size(1);
  TORCH_CHECK(w.sizes() == idx.sizes() && order.numel() == T * K && ys.size(0) == T * K && ys.is_contiguous() &&
              order.is_contiguous(), "combine: idx/w [T, K], order [T*K] and contiguous ys [T*K, H], got idx ",
              idx.sizes(), ", w ", w.sizes(), ", order ", order.sizes(), ", ys ", ys.sizes());
  auto ic = idx.contiguous(), wc = w.contiguous();
  auto out = at::empty({T, H}, ys.options());
  check_rc(dynaexq_combine(T, K, H, ic.data_ptr<int64_t>(), order.data_ptr<int64_t>(), ys.data_ptr(), wc.data_ptr(),
                           dtype_code(w, "w"), dtype_code(ys, "ys"), out.data_ptr(), at::get_num_threads()),
           "combine (H % 16 == 0, K <= 64)");
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens,
                            double scale) {
  check_cpu(q, "q", 4);
  check_cpu(k, "k", 4);
  check_cpu(v, "v", 4);
  check_type(lens, at::kLong, "lens");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), Dv = v.size(3);
  TORCH_CHECK(q.size(2) == 1, "decode_attention takes one query position per row, got q ", q.sizes());
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(1) == Hkv && v.size(2) == k.size(2) &&
              Hkv > 0 && Hq % Hkv == 0, "q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not agree");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.scalar_type() == v.scalar_type(),
              "k and v must share a dtype and have a contiguous last dim");
  TORCH_CHECK(lens.numel() == B && lens.is_contiguous() && (B == 0 || lens.max().item<int64_t>() <= k.size(2)),
              "lens must be [B] contiguous with every length <= L = ", k.size(2));
  auto qc = q.reshape({B, Hq, D}).contiguous();
  auto out = at::empty({B, Hq, Dv}, q.options());
  check_rc(dynaexq_decode_attention(B, Hq, Hkv, D, Dv, qc.data_ptr(), dtype_code(q, "q"), k.data_ptr(), v.data_ptr(),
                                    dtype_code(k, "k"), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
                                    v.stride(1), v.stride(2), lens.data_ptr<int64_t>(), (float)scale, out.data_ptr(),
                                    at::get_num_threads()), "decode_attention (D, Dv <= 1024)");
  return out.unsqueeze(1);  // [B, 1, Hq, Dv]
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool round_first) {
  check_cpu(x, "x", -1);
  check_cpu(w, "weight", 1);
  TORCH_CHECK(x.dim() >= 1 && w.numel() == x.size(-1) && w.scalar_type() == x.scalar_type() && w.is_contiguous(),
              "rms_norm: weight must be contiguous [H] of x's dtype, got x ", x.sizes(), " ", x.scalar_type(),
              ", weight ", w.sizes(), " ", w.scalar_type());
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  const int64_t H = x.size(-1);
  check_rc(dynaexq_rms_norm(H ? xc.numel() / H : 0, H, xc.data_ptr(), w.data_ptr(), dtype_code(x, "x"), (float)eps,
                            round_first, out.data_ptr(), at::get_num_threads()), "rms_norm");
  return out;
}

at::Tensor qk_rope_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& qn, const std::optional<at::Tensor>& kn, double eps,
                         const at::Tensor& cos, const at::Tensor& sin, at::Tensor& keys, at::Tensor& values,
                         const at::Tensor& rows, const at::Tensor& pos) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &cos, &sin, &keys, &values}) {
    check_cpu(*t, "qk_rope_cache's tensors", -1);
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == q.scalar_type(),
                "qk_rope_cache: q, k, v, cos, sin, keys and values must be contiguous and of one dtype");
  }
  check_cpu(q, "q", 3);
  check_cpu(keys, "keys", 4);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(k.dim() == 3 && k.size(0) == B && k.size(2) == D && v.sizes() == k.sizes() &&
              cos.sizes() == at::IntArrayRef({B, D}) && sin.sizes() == cos.sizes() && keys.size(1) == Hkv &&
              keys.size(3) == D && values.sizes() == keys.sizes(),
              "qk_rope_cache: q [B, Hq, D], k and v [B, Hkv, D], cos and sin [B, D], keys and values [R, Hkv, C, D]; "
              "got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), ", cos ", cos.sizes(), ", keys ",
              keys.sizes());
  for (auto* t : {&rows, &pos}) {
    check_cpu(*t, "rows and pos", 1);
    check_type(*t, at::kLong, "rows and pos");
    TORCH_CHECK(t->is_contiguous() && t->numel() == B, "rows and pos must be [B] contiguous");
  }
  for (auto* w : {&qn, &kn})
    TORCH_CHECK(!w->has_value() || ((*w)->is_contiguous() && (*w)->numel() == D &&
                                     (*w)->scalar_type() == q.scalar_type()),
                "qk_rope_cache: a norm weight must be contiguous [D] of q's dtype");
  auto out = at::empty_like(q);
  check_rc(dynaexq_qk_rope_cache(B, Hq, Hkv, D, dtype_code(q, "q"), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                 qn.has_value() ? qn->data_ptr() : nullptr, kn.has_value() ? kn->data_ptr() : nullptr,
                                 (float)eps, cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(),
                                 keys.size(0), keys.size(2), rows.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
                                 out.data_ptr()),
           "qk_rope_cache (D even, every row and position inside the cache)");
  return out;
}

at::Tensor swiglu(const at::Tensor& h) {
  check_cpu(h, "h", 2);
  TORCH_CHECK(h.size(1) % 2 == 0, "swiglu: h [R, 2I] (gate | up), got ", h.sizes());
  auto hc = h.contiguous();
  auto out = at::empty({h.size(0), h.size(1) / 2}, h.options());
  check_rc(dynaexq_swiglu(h.size(0), h.size(1) / 2, hc.data_ptr(), dtype_code(h, "h"), out.data_ptr(),
                          at::get_num_threads()), "swiglu (I > 0)");
  return out;
}

std::tuple<at::Tensor, at::Tensor> softmax_topk(const at::Tensor& logits, int64_t k, bool renorm,
                                                at::ScalarType dtype) {
  check_cpu(logits, "logits", 2);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k > 0 && k <= E, "softmax_topk: 0 < k <= E, got k ", k, " for logits ", logits.sizes());
  auto lc = logits.contiguous();
  auto f32 = logits.options().dtype(at::kFloat);
  auto p = at::empty({T, E}, f32), w = at::empty({T, k}, f32);
  auto idx = at::empty({T, k}, logits.options().dtype(at::kLong));
  auto tie = at::empty({T}, logits.options().dtype(at::kByte));
  check_rc(dynaexq_softmax_topk(T, E, k, lc.data_ptr(), dtype_code(logits, "logits"), renorm, p.data_ptr<float>(),
                                w.data_ptr<float>(), idx.data_ptr<int64_t>(), tie.data_ptr<uint8_t>(),
                                at::get_num_threads()), "softmax_topk");
  for (int64_t t = 0; t < T; ++t) {
    if (!tie.data_ptr<uint8_t>()[t]) continue;
    auto [top, ix] = at::topk(p[t], k);  // a tie: aten's own top-k, so it goes where transformers' goes
    if (renorm) top.div_(top.sum());
    w[t].copy_(top);
    idx[t].copy_(ix);
  }
  return {dtype == at::kFloat ? w : w.to(dtype), idx};
}

at::Tensor argmax(const at::Tensor& x) {
  check_cpu(x, "logits", 2);
  auto xc = x.contiguous();
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  check_rc(dynaexq_argmax(x.size(0), x.size(1), xc.data_ptr(), dtype_code(x, "logits"), out.data_ptr<int64_t>(),
                          at::get_num_threads()), "argmax (V > 0)");
  return out;
}

std::tuple<at::Tensor, at::Tensor> fit(const at::Tensor& w, const at::Tensor& a, int64_t qmax, int64_t iters,
                                       at::ArrayRef<double> grid) {
  check_cpu(w, "w", 4);
  check_cpu(a, "a", 3);
  check_type(w, at::kFloat, "w");
  check_type(a, at::kFloat, "a");
  const int64_t B = w.size(0), R = w.size(1), C = w.size(2), G = w.size(3);
  TORCH_CHECK(a.is_contiguous() && a.size(0) == B && a.size(1) == C && a.size(2) == G,
              "fit: w [B, R, C, G] (any strides) and a contiguous [B, C, G], got w ", w.sizes(), ", a ", a.sizes());
  TORCH_CHECK(G > 0 && G <= 256 && !grid.empty() && qmax > 0, "fit: 0 < G <= 256, a grid, qmax > 0");
  std::vector<float> g(grid.begin(), grid.end());
  auto s = at::empty({B, R, C}, w.options()), b = at::empty({B, R, C}, w.options());
  check_rc(dynaexq_fit(B, R, C, G, w.data_ptr<float>(), w.strides().data(), a.data_ptr<float>(), qmax, iters, g.data(),
                       g.size(), s.data_ptr<float>(), b.data_ptr<float>(), at::get_num_threads()), "fit");
  return {s, b};
}

}  // namespace

TORCH_LIBRARY(DYNAEXQ_NS, m) {
  m.def("isa() -> int", &isa);
  m.def("bf16_dot() -> int", &bf16_dot);
  m.def("set_int8_x(int on) -> int", &set_int8_x);
  m.def("lowbit_pack(Tensor data, Tensor scale, Tensor zero, Tensor ranges, int bits, int n, int k, int group)"
        " -> Tensor");
  m.def("lowbit_mm(Tensor x, Tensor blob, int bits, int group, int n) -> Tensor");
  m.def("lowbit_grouped(Tensor x, Tensor counts, Tensor ptrs, Tensor(a!) y, int bits, int group) -> ()");
  m.def("lowbit_rows(Tensor blob, Tensor rows, int bits, int group, int n, int k, ScalarType dtype) -> Tensor");
  m.def("lowbit_decode(Tensor blob, int bits, int group, int n, int k, int n0, int nn) -> Tensor");
  m.def("rowmajor_grouped(Tensor x, Tensor counts, Tensor ptrs, Tensor(a!) y, int wt) -> ()");
  m.def("route(Tensor idx, Tensor w, Tensor hidden, int num_experts, Tensor(a!) token_counts, Tensor(b!) mass)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("combine(Tensor idx, Tensor order, Tensor ys, Tensor w) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lens, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool round_first) -> Tensor");
  m.def("qk_rope_cache(Tensor q, Tensor k, Tensor v, Tensor? q_norm, Tensor? k_norm, float eps, Tensor cos,"
        " Tensor sin, Tensor(a!) keys, Tensor(b!) values, Tensor rows, Tensor pos) -> Tensor");
  m.def("swiglu(Tensor h) -> Tensor");
  m.def("softmax_topk(Tensor logits, int k, bool renorm, ScalarType dtype) -> (Tensor, Tensor)");
  m.def("argmax(Tensor logits) -> Tensor");
  m.def("fit(Tensor w, Tensor a, int qmax, int iters, float[] grid) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(DYNAEXQ_NS, CPU, m) {
  m.impl("lowbit_pack", &lowbit_pack);
  m.impl("lowbit_mm", &lowbit_mm);
  m.impl("lowbit_grouped", &lowbit_grouped);
  m.impl("lowbit_rows", &lowbit_rows);
  m.impl("lowbit_decode", &lowbit_decode);
  m.impl("rowmajor_grouped", &rowmajor_grouped);
  m.impl("route", &route);
  m.impl("combine", &combine);
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("qk_rope_cache", &qk_rope_cache);
  m.impl("swiglu", &swiglu);
  m.impl("softmax_topk", &softmax_topk);
  m.impl("argmax", &argmax);
  m.impl("fit", &fit);
}
