"""Whole-model decode and prefill: dynaexq at exactly the bytes of llama.cpp's whole-model files, on a
Qwen3-30B-A3B-shaped checkpoint with the real vocabulary.

Command (the checkpoint, its store and the GGUFs are built once in --workdir and ~/.cache/dynaexq/llamacpp):

    .venv/bin/python bench/whole_model.py                      # 4 layers, Q4_K_M and Q2_K, 2 threads

The first run builds the checkpoint (~1 min) and its store (the weight-only prepare of every layer at
--precisions, ~4 min per layer and ~9 min per vocabulary-wide matrix here); later runs reuse both (~12 min).

What it measures
  Checkpoint: bench/_common.py's random Qwen3MoeForCausalLM with Qwen3-30B-A3B layer shapes (hidden 2048, 128
  experts of 768, top-8, 32 / 4 heads of 128), --layers layers and the real vocabulary (151,936: the output head
  and the embedding weigh what Qwen3's do), bf16; the store prepared from it without calibration (random
  weights: quality is not measured here), at --precisions (bf16, int8, int4, int2 by default: what the types
  measured use; add int3 for Q3 types).
  llama.cpp (bench/peer_llamacpp.py's build): each --types type by llama-quantize's own whole-model mix (every
  tensor, attention and head included); its weight bytes = the GGUF's tensor bytes.
  dynaexq: `uniform:<p>` experts (int4 for the Q4 types, int3 for Q3, int2 for Q2) with `--weight-budget` = that
  GGUF's bytes: the non-expert matrices get what the experts leave (runtime/planners/weights.py); its resident
  weight bytes are reported beside the file's. Two plans: "size only" (error-optimal within the bytes:
  a size as `--weight-budget`) and "= reads", with `--read-budget` = what a decode token reads of that GGUF
  (below; what `--weight-budget FILE.gguf` plans by default), so both systems hold the same bytes and read the
  same bytes per token: the speed ratio is then the runtimes' alone.
  Decode: B sequences (--batches) each holding a context of C tokens (--contexts; prefilled, not timed), then
  --new-tokens greedy decode steps timed: dynaexq through its BatchDecoder (what `generate` and `serve` run: the
  SlotCache, the decode attention, sampling every step), llama.cpp through llama-bench `-d C -n N` (B = 1) and
  llama-batched-bench `-npp C -ntg N -npl B` (aggregate tokens/s).
  Prefill: one sequence of --prefill tokens in one chunk; llama-bench `-p`.
  Bandwidth: read bandwidth measured here (sum of a 1 GiB fp32 tensor, median of 5) / the bytes one decode
  token reads at B = 1 (every non-expert weight but the embedding, resident, + top-k experts per layer at the
  experts' resident size): the share of that limit each system reaches (llama.cpp's from its GGUF bytes the same
  way).
  Samples of the dynaexq variants are interleaved and repeated (--repeats); medians; llama.cpp's tools report
  their own means of -r repetitions.
Output: a human table, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_llamacpp as llama  # noqa: E402
from _common import synthetic_checkpoint  # noqa: E402
from generate import bandwidth  # noqa: E402

EXPERT_PRECISION = {"Q4": "int4", "IQ4": "int4", "Q3": "int3", "IQ3": "int3", "Q2": "int2", "IQ2": "int2"}


def whole_gguf(ckpt: Path, qtype: str, work: Path) -> Path:
    """The checkpoint as a GGUF of `qtype` by llama-quantize's own mix (cached)."""
    base = llama.bf16_gguf(ckpt, work)
    out = work / f"{ckpt.name}-whole-{qtype}.gguf"
    if not out.is_file():
        llama.quantize(base, qtype, None, Path(f"{out}.tmp"), whole=True)
        Path(f"{out}.tmp").rename(out)
    return out


@torch.inference_mode()
def decode_tok_s(engine, batch: int, context: int, steps: int, seed: int) -> float:
    """Aggregate decode tokens/s of `batch` sequences after a context of `context` tokens (the engine's step)."""
    from dynaexq.engine.batch import SamplingParams, Sequence
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size
    dec = engine.open_batch(max_batch=batch, prefill_chunk=max(512, context))
    dec.kv.reserve(context + steps + 2)
    for _ in range(batch):
        dec.add(Sequence(torch.randint(2, vocab, (context,), generator=g).tolist(),
                         SamplingParams(max_tokens=steps + 2, temperature=0), None))
    while dec.waiting:
        engine.step(dec)  # prefill (one sequence per step) and, once some run, their decode: not timed
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step(dec)
    return batch * steps / (time.perf_counter() - t0)


@torch.inference_mode()
def prefill_tok_s(engine, tokens: int, seed: int) -> float:
    from dynaexq.engine.batch import SamplingParams, Sequence
    g = torch.Generator().manual_seed(seed)
    dec = engine.open_batch(max_batch=1, prefill_chunk=tokens)
    dec.add(Sequence(torch.randint(2, engine.model.config.vocab_size, (tokens,), generator=g).tolist(),
                     SamplingParams(max_tokens=2, temperature=0), None))
    t0 = time.perf_counter()
    engine.step(dec)
    return tokens / (time.perf_counter() - t0)


def step_bytes(engine) -> int:
    """Resident bytes one decode token reads at B = 1: every non-expert weight but the embedding's, plus top-k
    experts per MoE layer at their mean resident size."""
    from dynaexq.engine.dynamic import nonexpert_bytes
    model = engine.model
    emb = model.get_input_embeddings()
    tied = emb is model.get_output_embeddings() or getattr(emb, "kernel", None) is getattr(
        model.get_output_embeddings(), "kernel", object())
    embedding = 0 if tied else sum(t.numel() * t.element_size() for t in [*emb.parameters(), *emb.buffers()])
    k = model.config.num_experts_per_tok
    per_expert = engine.expert_bytes() / (len(engine.banks) * engine.reader.num_experts)
    return nonexpert_bytes(model) - embedding + int(k * len(engine.banks) * per_expert)


def llama_speed(gguf_path: Path, threads: int, contexts, batches, steps: int, prefill: int, reps: int) -> dict:
    out = {"decode": {}, "prefill": None}
    res = json.loads(llama.sh([llama.BIN / "llama-bench", "-m", gguf_path, "-p", prefill, "-n", steps, "-d",
                               ",".join(map(str, contexts)), "-t", threads, "-r", reps, "-o", "json"]).stdout)
    for r in res:
        if r["n_gen"] > 0:
            out["decode"][(1, int(r["n_depth"]))] = float(r["avg_ts"])
        elif r["n_prompt"] > 0 and int(r["n_depth"]) == contexts[0]:
            out["prefill"] = float(r["avg_ts"])
    for b in [b for b in batches if b > 1]:
        for c in contexts:
            got = llama.batched_tok_s(gguf_path, threads, [b], c, steps)
            out["decode"][(b, c)] = got[b]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/dynaexq-bench")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--precisions", default="bf16,int8,int4,int2")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--types", default="Q4_K_M,Q2_K")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="32,2048")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import dynaexq
    from dynaexq import gguf_file
    from dynaexq.store.prepare import prepare
    from dynaexq.sizes import format_size

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    work = Path(args.workdir)
    ckpt = synthetic_checkpoint(work, layers=args.layers, experts=128, vocab=args.vocab)
    precisions = tuple(p.strip() for p in args.precisions.split(","))
    store = work / f"store-{ckpt.name}-{'-'.join(precisions)}-v4"
    prepare(ckpt, store, precisions=precisions, progress=True)
    llama.build()
    rows = []
    bw = bandwidth()
    for qtype in [t.strip() for t in args.types.split(",") if t.strip()]:
        path = whole_gguf(ckpt, qtype, llama.CACHE / "work")
        file_bytes = gguf_file.file_bytes(path)
        expert_p = EXPERT_PRECISION[qtype.split("_")[0]]
        theirs_read = gguf_file.step_bytes(path)
        for variant, reads in (("", None), (" = reads", theirs_read)):
            engine = dynaexq.load(store, f"uniform:{expert_p}", weight_budget=file_bytes, read_budget=reads,
                                  threads=args.threads, progress=False)
            ours = {"decode": {}, "prefill": None}
            samples = {(b, c): [] for b in batches for c in contexts}
            pre = []
            for r in range(args.repeats):
                for b in batches:
                    for c in contexts:
                        samples[(b, c)].append(decode_tok_s(engine, b, c, args.new_tokens, seed=r))
                pre.append(prefill_tok_s(engine, args.prefill, seed=r))
            ours["decode"] = {k: statistics.median(v) for k, v in samples.items()}
            ours["prefill"] = statistics.median(pre)
            if not variant:
                theirs = llama_speed(path, args.threads, contexts, batches, args.new_tokens, args.prefill,
                                     args.repeats)
            rows.append({"type": qtype + variant, "file_bytes": file_bytes, "read_budget": reads,
                         "dynaexq_weight_bytes": engine.weight_bytes(), "dynaexq_policy": engine.policy,
                         "dense": {p.value: n for p, n in _count(engine.dense_plan).items()},
                         "dynaexq": ours, "llamacpp": {**theirs, "decode": dict(theirs["decode"])},
                         "step_bytes": {"dynaexq": step_bytes(engine), "llamacpp": theirs_read}})
            engine.close()
            del engine
    print(f"whole model, {args.layers} layers x 128 experts, vocab {args.vocab}; {args.threads} threads; read "
          f"bandwidth {bw / 1e9:.1f} GB/s")
    for r in rows:
        print(f"\n{r['type']}: file {format_size(r['file_bytes'])}; dynaexq {r['dynaexq_policy']} + non-expert "
              f"{r['dense']} resident {format_size(r['dynaexq_weight_bytes'])}; bytes per decode token "
              f"dynaexq {format_size(r['step_bytes']['dynaexq'])}, llama.cpp {format_size(r['step_bytes']['llamacpp'])}")
        print(f"  {'':24} {'dynaexq':>9} {'llama.cpp':>10} {'ratio':>6} {'% lim (d/l)':>12}")
        for (b, c), v in sorted(r["dynaexq"]["decode"].items()):
            theirs = r["llamacpp"]["decode"].get((b, c))
            lim_d = v / b * r["step_bytes"]["dynaexq"] / bw if b == 1 else None
            lim_l = theirs * r["step_bytes"]["llamacpp"] / bw if b == 1 and theirs else None
            lims = f"{100 * lim_d:.0f} / {100 * lim_l:.0f} %" if lim_d and lim_l else ""
            print(f"  decode B={b:<2} context {c:<5} {v:>9.1f} {theirs or float('nan'):>10.1f} "
                  f"{v / theirs if theirs else float('nan'):>6.2f} {lims:>12}")
        p, q = r["dynaexq"]["prefill"], r["llamacpp"]["prefill"]
        print(f"  prefill {args.prefill} tokens        {p:>9.1f} {q or float('nan'):>10.1f} "
              f"{p / q if q else float('nan'):>6.2f}")
    for r in rows:
        for side in ("dynaexq", "llamacpp"):
            r[side]["decode"] = {f"B{b}_C{c}": v for (b, c), v in r[side]["decode"].items()}
    print(json.dumps({"bench": "whole_model", "layers": args.layers, "vocab": args.vocab, "threads": args.threads,
                      "bandwidth": bw, "rows": rows}))


def _count(plan: dict) -> dict:
    out = {}
    for p in plan.values():
        out[p] = out.get(p, 0) + 1
    return out


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as err:
        print(err.stderr, file=sys.stderr)
        raise
