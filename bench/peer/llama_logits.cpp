// bench/peer_llamacpp.py's helper: llama.cpp's log-probabilities on exactly dynaexq eval's token windows.
// usage: llama_logits MODEL.gguf TOKENS.bin N_WINDOWS WINDOW THREADS OUT.bin
// TOKENS.bin: int32 [N_WINDOWS, WINDOW]; OUT.bin: float32 [N_WINDOWS, WINDOW - 1, n_vocab] log-softmax of the
// logits at positions 0..WINDOW-2 (each window decoded alone from an empty cache, as the HF reference is).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "llama.h"

int main(int argc, char** argv) {
  if (argc != 7) { fprintf(stderr, "usage: %s MODEL TOKENS N WINDOW THREADS OUT\n", argv[0]); return 2; }
  const int n = atoi(argv[3]), win = atoi(argv[4]), threads = atoi(argv[5]);
  llama_backend_init();
  llama_model_params mp = llama_model_default_params();
  mp.n_gpu_layers = 0;
  llama_model* model = llama_model_load_from_file(argv[1], mp);
  if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = win; cp.n_batch = win; cp.n_ubatch = win; cp.n_threads = threads; cp.n_threads_batch = threads;
  llama_context* ctx = llama_init_from_model(model, cp);
  const int nv = llama_vocab_n_tokens(llama_model_get_vocab(model));
  std::vector<int32_t> tok((size_t)n * win);
  FILE* f = fopen(argv[2], "rb");
  if (!f || fread(tok.data(), 4, tok.size(), f) != tok.size()) { fprintf(stderr, "bad tokens file\n"); return 1; }
  fclose(f);
  FILE* out = fopen(argv[6], "wb");
  std::vector<float> row(nv);
  for (int w = 0; w < n; ++w) {
    llama_memory_clear(llama_get_memory(ctx), true);
    llama_batch b = llama_batch_init(win, 0, 1);
    for (int i = 0; i < win; ++i) {
      b.token[i] = tok[(size_t)w * win + i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    b.n_tokens = win;
    if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
    for (int i = 0; i < win - 1; ++i) {
      const float* l = llama_get_logits_ith(ctx, i);
      double mx = l[0], s = 0;
      for (int j = 1; j < nv; ++j) mx = l[j] > mx ? l[j] : mx;
      for (int j = 0; j < nv; ++j) s += exp(l[j] - mx);
      const double lse = mx + log(s);
      for (int j = 0; j < nv; ++j) row[j] = (float)(l[j] - lse);
      fwrite(row.data(), 4, nv, out);
    }
    llama_batch_free(b);
  }
  fclose(out);
  llama_free(ctx);
  llama_model_free(model);
  return 0;
}
