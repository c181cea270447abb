"""dynaexq against llama.cpp on the bundled model: KL at equal bytes, on dynaexq eval's own windows.

Commands (~15 min the first time: the llama.cpp build is cached in ~/.cache/dynaexq/llamacpp; later ~8 min):

    .venv/bin/python bench/peer_llamacpp.py                  # whole model: every tensor at llama.cpp's type mixes
    .venv/bin/python bench/peer_llamacpp.py --mode experts   # only the expert tensors quantized in both (kernels)

Modes
  whole    (the comparison users make) llama-quantize's own mixes for each type, every tensor as llama.cpp
           quantizes it (attention, embedding, output too), with and without an imatrix; the GGUF's bytes of every
           tensor; dynaexq at exactly those bytes with `--weight-budget` (its non-expert matrices and experts in one
           plan, runtime/planners/weights.py): calibrated-multilevel and the multilevel runtime (streamed, the
           controller live); and calibrated-multilevel with `--read-budget` = what a decode token reads of that
           GGUF too ("= reads": the same bytes held and the same bytes read per token as llama.cpp; what
           `--weight-budget FILE.gguf` plans by default; the other two are the uncapped, "size only" plans).
  experts  only the expert tensors quantized (attention, embeddings and router bf16 / f32, as dynaexq's
           `--expert-budget`); dynaexq's calibrated-multilevel at the GGUF's expert bytes.

What it does
  1. llama.cpp: `pip download` of the llama-cpp-python sdist (the llama.cpp it vendors), cmake build of
     llama-quantize, llama-imatrix, llama-bench and libllama, and bench/peer/llama_logits.cpp against it (an
     ~80-line program that writes llama.cpp's log-probabilities for given token windows). -march=native, except
     on a CPU with AMX (Sapphire Rapids and later), where 0.3.36's AMX matmul segfaults in prompt processing:
     there every other ggml x86 option the CPU's flags allow (AVX-512, VNNI, BF16...) and AMX off, in its own
     build directory (build-0.3.36-noamx).
  2. The bundled checkpoint -> GGUF bf16 with llama.cpp's convert_hf_to_gguf.py (its pre-tokenizer check does
     not know our byte-level BPE, whose regex is GPT-2's: told "gpt-2"); an importance matrix with llama-imatrix
     on the model's calibration texts (never its eval texts).
  3. For each type, with and without the imatrix: llama-quantize with only the expert tensors quantized
     (attention, embeddings and router stay bf16 / f32, as in dynaexq); the bytes of the expert tensors and the
     types each got are read back from the GGUF (the bundled `down` rows are 128 long, so 256-block types fall
     back to another type there: reported).
  4. KL(reference || quantized) per token, mean over the three domains, on exactly `dynaexq eval`'s windows
     (16 x 256 tokens spread over each eval text, each window decoded alone); the reference is the HF model in
     float32, as for dynaexq. Next to it: dynaexq's calibrated-multilevel at that expert byte count, and the
     uniform dynaexq formats with their bytes.
  5. Decode speed, batch 1, --threads threads: llama-bench (-p 0 -n 64) on the Q4_K_M experts GGUF vs
     dynaexq's generate loop (greedy, 64 tokens, uniform:int4) on the same model.
Output: a human table, then one JSON object on the last stdout line. Not part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
VERSION = "0.3.36"
CACHE = Path(os.environ.get("DYNAEXQ_CACHE", Path.home() / ".cache" / "dynaexq")) / "llamacpp"
SRC = CACHE / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
# llama.cpp 0.3.36's AMX path segfaults in prompt processing on a Xeon with AMX (ggml_backend_amx_mul_mat, seen
# with llama-bench -p 512 and llama-batched-bench); there it is built with every other feature of the CPU instead.
CPU_FLAGS = set(next((line.partition(":")[2].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])) if Path("/proc/cpuinfo").is_file() else set()
NO_AMX = "amx_int8" in CPU_FLAGS
BUILD = CACHE / (f"build-{VERSION}-noamx" if NO_AMX else f"build-{VERSION}")
BIN = BUILD / "bin"
LOGITS = BUILD / "llama_logits"
TYPES = "Q4_K_M,Q4_0,IQ4_XS,Q3_K_M,Q3_K_S,IQ3_S,Q2_K,IQ2_XS"
EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
TARGETS = ("llama-quantize", "llama-imatrix", "llama-bench", "llama-batched-bench")


def sh(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


def build() -> None:
    if all((BIN / t).is_file() for t in TARGETS) and LOGITS.is_file():
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={VERSION}", "-d", CACHE])
    if not SRC.is_dir():
        with tarfile.open(sdist) as t:
            t.extractall(CACHE)
    print("building llama.cpp (once, ~12 min on 2 cores)" + (" without its AMX path, which crashes on this CPU"
          if NO_AMX else ""), file=sys.stderr)
    sh(["cmake", "-S", SRC, "-B", BUILD, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF", *arch_options()])
    sh(["cmake", "--build", BUILD, "-j", str(os.cpu_count()), "--target", *TARGETS, "llama"])
    sh(["g++", "-O2", "-o", LOGITS, ROOT / "peer" / "llama_logits.cpp", f"-I{SRC / 'include'}",
        f"-I{SRC / 'ggml' / 'include'}", f"-L{BIN}", "-lllama", f"-Wl,-rpath,{BIN}"])


def arch_options() -> list[str]:
    """-march=native, or on an AMX CPU each ggml x86 option this CPU's flags allow, AMX off."""
    if not NO_AMX:
        return ["-DGGML_NATIVE=ON"]
    want = {"SSE42": {"sse4_2"}, "F16C": {"f16c"}, "FMA": {"fma"}, "BMI2": {"bmi2"}, "AVX": {"avx"},
            "AVX2": {"avx2"}, "AVX_VNNI": {"avx_vnni"}, "AVX512": {"avx512f", "avx512cd", "avx512vl", "avx512dq",
            "avx512bw"}, "AVX512_VBMI": {"avx512vbmi"}, "AVX512_VNNI": {"avx512_vnni"},
            "AVX512_BF16": {"avx512_bf16"}}
    return ["-DGGML_NATIVE=OFF", *(f"-DGGML_{k}={'ON' if f <= CPU_FLAGS else 'OFF'}" for k, f in want.items())]


CONVERT = """import runpy, sys
sys.path.insert(0, sys.argv[1] + "/gguf-py"); sys.path.insert(0, sys.argv[1])
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # our byte-level BPE uses GPT-2's regex
sys.argv = [sys.argv[1] + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def gguf_experts(path: Path) -> tuple[int, dict]:
    """(bytes of the expert tensors, {tensor kind: sorted types}) read from a GGUF."""
    sys.path.insert(0, str(SRC / "gguf-py"))
    import gguf

    nbytes, types = 0, {}
    for t in gguf.GGUFReader(str(path)).tensors:
        kind = next((k for k in EXPERTS if k in t.name), None)
        if kind:
            nbytes += int(t.n_bytes)
            types.setdefault(kind, set()).add(t.tensor_type.name)
    return nbytes, {k: sorted(v) for k, v in types.items()}


def quantize(base: Path, qtype: str, imatrix: Path | None, out: Path, whole: bool = False) -> None:
    cmd = [BIN / "llama-quantize"]
    if not whole:  # only the experts: everything else stays bf16, as with dynaexq's --expert-budget
        keep = ["attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm"]
        cmd += ["--token-embedding-type", "bf16", "--output-tensor-type", "bf16"]
        for k in keep:
            cmd += ["--tensor-type", f"{k}=bf16"]
    if imatrix is not None:
        cmd += ["--imatrix", imatrix]
    sh(cmd + [base, out, qtype, str(os.cpu_count())])


def bf16_gguf(ckpt: Path, work: Path) -> Path:
    """A checkpoint -> (cached in work) its bf16 GGUF by llama.cpp's converter."""
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"{ckpt.name}-bf16.gguf"
    if not base.is_file():
        src = ckpt
        config = json.loads((ckpt / "config.json").read_text())
        if not config.get("architectures"):  # bench/_common.py's checkpoints: the converter needs the class
            src = work / f"{ckpt.name}-view"  # links to the files, a config naming it (the checkpoint untouched)
            src.mkdir(exist_ok=True)
            for f in ckpt.iterdir():
                if f.name != "config.json" and not (src / f.name).exists():
                    (src / f.name).symlink_to(f)
            (src / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3MoeForCausalLM"]}))
        (work / "convert.py").write_text(CONVERT)
        sh([sys.executable, work / "convert.py", SRC, src, "--outtype", "bf16", "--outfile", f"{base}.tmp"])
        os.replace(f"{base}.tmp", base)
    return base


def experts_gguf(ckpt: Path, qtype: str, work: Path) -> Path:
    """A checkpoint -> (cached in work) its GGUF with only the expert tensors at qtype, the rest bf16 as in
    dynaexq (no imatrix: for speed, not quality)."""
    base, out = bf16_gguf(ckpt, work), work / f"{ckpt.name}-experts-{qtype}.gguf"
    if not out.is_file():
        quantize(base, qtype, None, Path(f"{out}.tmp"))
        os.replace(f"{out}.tmp", out)
    return out


def bench_tok_s(gguf: Path, threads: int, tokens: int, reps: int = 3) -> float:
    """Decode tokens/s at batch 1 by llama-bench (-p 0: generation only), mean of reps."""
    res = json.loads(sh([BIN / "llama-bench", "-m", gguf, "-p", "0", "-n", tokens, "-t", threads, "-r", reps,
                         "-o", "json"]).stdout)
    return float(res[0]["avg_ts"])


def batched_tok_s(gguf: Path, threads: int, batches: list[int], prompt: int, tokens: int) -> dict[int, float]:
    """Aggregate decode tokens/s (S_TG) of `b` parallel sequences, each a prompt of `prompt` tokens then `tokens`
    generated, by llama-batched-bench -> {b: tok/s}."""
    ctx = max(batches) * (prompt + tokens) + 64
    out = sh([BIN / "llama-batched-bench", "-m", gguf, "-c", ctx, "-b", 2048, "-ub", 512, "-npp", prompt,
              "-ntg", tokens, "-npl", ",".join(map(str, batches)), "-t", threads, "-tb", threads,
              "--output-format", "jsonl"]).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {int(r["pl"]): float(r["speed_tg"]) for r in rows}


def kl_llama(gguf_path: Path, ev, work: Path, threads: int) -> dict:
    """Mean KL per token and top-1 agreement of llama.cpp on the evaluation's windows, per domain."""
    out = {}
    for name, w in ev.windows.items():
        n, length = w.shape
        tok, logp = work / f"{name}.tokens", work / f"{name}.logp"
        w.to(torch.int32).numpy().tofile(tok)
        sh([LOGITS, gguf_path, tok, n, length, threads, logp])
        q = np.memmap(logp, dtype=np.float32, mode="r").reshape(n, length - 1, -1)
        kl = agree = 0.0
        count = 0
        for b, r in enumerate(ev.ref_logp[name]):  # reference batches of ev.batch windows
            r = np.asarray(r, dtype=np.float64)
            qq = np.asarray(q[b * ev.batch:b * ev.batch + len(r)], dtype=np.float64)[..., :r.shape[-1]]
            kl += float((np.exp(r) * (r - qq)).sum())
            agree += float((r.argmax(-1) == qq.argmax(-1)).sum())
            count += r.shape[0] * r.shape[1]
        out[name] = {"kl": kl / count, "top1": agree / count}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--mode", choices=["whole", "experts"], default="whole", help="whole model (default) or only "
                    "the experts quantized")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT.parent))
    from dynaexq import gguf_file
    from dynaexq.demo import BUNDLED
    from dynaexq.engine.calibrate import prepare_store
    from dynaexq.eval.harness import Evaluation, parse_data

    t_all = time.perf_counter()
    build()
    work = CACHE / "work"
    work.mkdir(exist_ok=True)
    base = work / "bundled-bf16.gguf"
    if not base.is_file():
        (work / "convert.py").write_text(CONVERT)
        sh([sys.executable, work / "convert.py", SRC, BUNDLED, "--outtype", "bf16", "--outfile", base])
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        calib = work / "calibration.txt"
        calib.write_text("\n".join((BUNDLED / "calibration" / f).read_text() for f in ("code.txt", "prose.txt",
                                                                                      "dict.txt")))
        sh([BIN / "llama-imatrix", "-m", base, "-f", calib, "-o", imatrix, "-c", "256", "-t", args.threads])

    store = prepare_store(BUNDLED, work / "dynaexq-store", progress=False)
    ev = Evaluation(BUNDLED, parse_data(None, BUNDLED), args.windows, 256, store=store, progress=False)
    whole = args.mode == "whole"
    rows = []
    out_of = {}  # id(row) -> its GGUF
    for qtype in [t.strip() for t in args.types.split(",") if t.strip()]:
        best = None
        for with_imatrix in (False, True):
            out = work / f"{'whole' if whole else 'experts'}-{qtype}{'-imatrix' if with_imatrix else ''}.gguf"
            if not out.is_file():
                try:
                    quantize(base, qtype, imatrix if with_imatrix else None, out, whole)
                except subprocess.CalledProcessError as err:  # e.g. IQ2 types refuse to run without an imatrix
                    print(f"  llama.cpp {qtype} imatrix={with_imatrix}: llama-quantize failed: "
                          f"{err.stderr.strip().splitlines()[-1] if err.stderr.strip() else err}", file=sys.stderr)
                    continue
            nbytes, types = gguf_experts(out)
            total = gguf_file.file_bytes(out)
            dom = kl_llama(out, ev, work, args.threads)
            kl = sum(d["kl"] for d in dom.values()) / len(dom)
            row = {"type": qtype, "imatrix": with_imatrix, "expert_bytes": nbytes, "weight_bytes": total,
                   "types": types, "kl": kl, "domains": dom}
            print(f"  llama.cpp {qtype:<7} imatrix={with_imatrix!s:<5} {total:>10} B ({nbytes} in experts)  KL "
                  f"{kl:.5f}  {types}", file=sys.stderr)
            rows.append(row)
            out_of[id(row)] = out
            best = row if best is None or kl < best["kl"] else best
        if best is None:
            continue
        policies = ("calibrated-multilevel", "multilevel", "calibrated-multilevel=reads") if whole else \
            ("calibrated-multilevel",)
        for policy in policies:
            spec, _, reads = policy.partition("=")
            read_budget = gguf_file.step_bytes(out_of[id(best)]) if reads else None
            ours = ev.run(spec, weight_budget=best["weight_bytes"], read_budget=read_budget) if whole else \
                ev.run(spec, best["expert_bytes"])
            best[f"dynaexq_{policy}"] = {"read_budget": read_budget, "expert_bytes": ours["expert_bytes"], "weight_bytes": ours["weight_bytes"],
                                         "kl": ours["mean_kl"], "precisions": ours["precisions"],
                                         "dense_precisions": ours.get("dense_precisions")}
            print(f"  dynaexq {policy} at {ours['weight_bytes'] if whole else ours['expert_bytes']} B: KL "
                  f"{ours['mean_kl']:.5f}", file=sys.stderr)
    params = sum(ev.reader.manifest["shapes"][m][0] * ev.reader.manifest["shapes"][m][1] for m in ("gate_up", "down"))
    params *= len(ev.reader.layers) * ev.reader.num_experts
    what = "bytes of every weight" if whole else "expert bytes"
    print(f"\nKL(HF float32 reference || quantized), mean over code/prose/dict, {args.windows} x 256 tokens each; "
          + ("every tensor quantized by each system" if whole else "only the experts quantized in both"))
    print(f"{'llama.cpp type':<16} {what:>21} {'llama.cpp best':>15} {'dynaexq c-multilevel':>21} {'ratio':>6}"
          + (f" {'multilevel (runtime)':>21} {'ratio':>6} {'c-multilevel = reads':>21} {'ratio':>6}" if whole else "")
          + "  types (best)")
    for r in rows:
        if "dynaexq_calibrated-multilevel" not in r:
            continue
        d = r["dynaexq_calibrated-multilevel"]
        line = (f"{r['type'] + (' +imatrix' if r['imatrix'] else ''):<16} "
                f"{r['weight_bytes'] if whole else r['expert_bytes']:>21} {r['kl']:>15.5f} {d['kl']:>21.5f} "
                f"{d['kl'] / r['kl']:>6.2f}")
        if whole:
            m, q = r["dynaexq_multilevel"], r["dynaexq_calibrated-multilevel=reads"]
            line += f" {m['kl']:>21.5f} {m['kl'] / r['kl']:>6.2f} {q['kl']:>21.5f} {q['kl'] / r['kl']:>6.2f}"
        print(line + f"  {r['types']}")
    uniform = {} if whole else {p: ev.run(f"uniform:{p}") for p in ("int8", "int4", "int3", "int2")}
    if uniform:
        print("dynaexq uniform formats: " + ", ".join(f"{p} {u['expert_bytes']} B ({8 * u['expert_bytes'] / params:.2f} "
                                                      f"bpw) KL {u['mean_kl']:.5f}" for p, u in uniform.items()))
    speed = {} if args.skip_speed else decode_speed(work, BUNDLED, store, args.threads)
    if speed:
        print(f"decode, batch 1, {args.threads} threads: llama.cpp Q4_K_M experts {speed['llamacpp_tok_s']:.1f} tok/s, "
              f"dynaexq uniform:int4 {speed['dynaexq_tok_s']:.1f} tok/s ({speed['ratio']:.2f}x)")
    print(json.dumps({"bench": "peer_llamacpp", "mode": args.mode, "llamacpp_version": VERSION,
                      "threads": args.threads, "rows": rows,
                      "dynaexq_uniform": {p: {"expert_bytes": u["expert_bytes"], "kl": u["mean_kl"]}
                                          for p, u in uniform.items()}, "expert_params": params, "speed": speed,
                      "total_s": time.perf_counter() - t_all}))


def decode_speed(work: Path, model: Path, store: Path, threads: int) -> dict:
    import dynaexq

    gguf_path = work / "experts-Q4_K_M.gguf"
    if not gguf_path.is_file():
        return {}
    res = json.loads(sh([BIN / "llama-bench", "-m", gguf_path, "-p", "0", "-n", "64", "-t", threads, "-r", "3",
                         "-o", "json"]).stdout)
    llama = float(res[0]["avg_ts"])
    torch.set_num_threads(threads)
    eng = dynaexq.load(model, "uniform:int4", store=store, progress=False)
    runs = []
    for _ in range(3):  # a 5-token prompt, then greedy decode; tokens counted from the text made
        t0 = time.perf_counter()
        text = eng.generate("def f(x):", max_new_tokens=64)
        dt = time.perf_counter() - t0
        runs.append(len(eng.tokenizer(text, add_special_tokens=False)["input_ids"]) / dt)
    ours = float(np.median(runs))
    return {"llamacpp_tok_s": llama, "dynaexq_tok_s": ours, "ratio": ours / llama}


if __name__ == "__main__":
    main()
