"""Quantization error and decode-shaped matmul speed of every expert precision, on the CPU.

Command (full run, ~3 min on 2 cores; `--quick` is a ~30 s smoke test):

    .venv/bin/python bench/kernels.py            # defaults below
    .venv/bin/python bench/kernels.py --quick
    .venv/bin/python bench/kernels.py --dense --skip-errors --precisions bf16,int8 --ms 1,2 \\
        --shapes q=4096x2048,o=2048x4096,kv=512x2048    # the dense matrices as the decoder runs them

What it measures
  1. Relative output error sqrt(tr(dW H dW^T) / tr(W H W^T)) of `dynaexq.quant.quantize.quantize` for each
     precision, on Gaussian weights and on heavy-tailed Student-t (2 dof) weights of one expert-shaped
     matrix (default [1536, 2048]) with inputs of a synthetic second moment H (correlated, a few loud
     channels); for integer precisions without H (rtn) and with GPTQ against H (gptq), with the seconds
     each quantization took.
  2. Matmul time of `dynaexq.quant.kernels.prepare(qw, backend="cpu")` at decode shapes: x [M, K] bf16,
     M = 1 and 8, for the Qwen3-30B-A3B expert matrices gate_up [1536, 2048] and down [2048, 768].
     For every (shape, precision) `--matrices` (default 256) distinct weights are made once and kept
     resident; one timed sample is a pass through all of them (one call each), so the weights stream
     from memory as they do in a MoE decode, and the L3 cache cannot hold them. The median of
     `--repeats` samples (default 11) is reported in microseconds per matmul, with its ratio to bf16
     (ratio of medians) taken in the same run; the targets use paired ratios (per repeat, then the
     median). Repeats interleave the precisions (rotating their order), so drift in the machine's load
     hits all of them alike. Timed weights are made from random codes and random scale codes
     (random packed bytes are valid codes at every bit width): a kernel's speed does not depend on the
     values, and quantizing 2 x 256 matrices per precision would take minutes. Resident bytes per
     weight are the `.nbytes` of the prepared kernel divided by N*K.
  Threads: torch.set_num_threads(--threads), default all cores (os.cpu_count(); 2 on the dev box); the
  int2/int3 kernels read torch.get_num_threads() too. With 2 threads on 2 cores, another busy process
  stalls every multithreaded call by a scheduler slice (~4 ms): the run prints how many cores other
  processes used while timing (0 = quiet); --wait-quiet S waits for a quiet machine first.
Targets (printed with pass/miss): int4 <= 0.4x bf16 time at M = 1; int3 and int2 no slower than int4
(strict: ratio to int4 <= 1.00, at each M).

Output: human tables, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CpuLoad, wait_for_quiet  # noqa: E402
from dynaexq.quant import kernels  # noqa: E402
from dynaexq.quant.dense import DenseLinear  # noqa: E402
from dynaexq.quant.precision import Precision  # noqa: E402
from dynaexq.quant.formats import spec  # noqa: E402
from dynaexq.quant.packing import packed_nbytes  # noqa: E402
from dynaexq.quant.quantize import QuantizedWeight, quantize, relative_error  # noqa: E402

DEFAULT_SHAPES = "gate_up=1536x2048,down=2048x768"


def parse_shapes(text: str) -> dict[str, tuple[int, int]]:
    out = {}
    for item in text.split(","):
        name, dims = item.split("=")
        n, k = dims.lower().split("x")
        out[name.strip()] = (int(n), int(k))
    return out


def kernel_name(k) -> str:
    name = type(k).__name__
    if name == "LowbitCpu":
        name += "(fused C++)" if getattr(k, "blob", None) is not None else "(torch fallback)"
    return name


# --------------------------------------------------------------------------------------------- error


def _student_t(n, k, g):
    """Student-t, 2 dof, from the seeded generator: z / sqrt(chi2_2 / 2), chi2_2 = -2 log U."""
    z = torch.randn(n, k, generator=g, dtype=torch.float64)
    u = torch.rand(n, k, generator=g, dtype=torch.float64).clamp(min=1e-300)
    return (z / torch.sqrt(-torch.log(u))).float()  # chi2_2 / 2 = -log U


def _moment(k, g, n=8192):
    """A second moment of correlated inputs with a few loud channels, as LLM activations have."""
    X = torch.randn(n, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5)
    X *= torch.rand(k, generator=g) * 2 + (torch.rand(k, generator=g) > 0.98) * 8
    return X.T @ X / n


def error_table(shape, precisions, methods, seed):
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    H = _moment(k, g)
    weights = {
        "gaussian": torch.randn(n, k, generator=g) * 0.02,
        # Student-t with 2 dof (infinite variance): the heavy tails of real expert weights, exaggerated
        "student_t2": _student_t(n, k, g) * 0.02,
    }
    rows = []
    for dist, w in weights.items():
        for p in precisions:
            for r in (["-"] if p.is_float else methods):
                t0 = time.perf_counter()
                qw = quantize(w, p, "gate_up", H if r == "gptq" else None)
                dt = time.perf_counter() - t0
                rows.append({"dist": dist, "precision": p.value, "refine": r,
                             "rel_error": relative_error(w, qw, H), "quantize_s": dt})
    return rows


def print_errors(rows, shape, refines):
    print(f"\n== relative output error sqrt(tr(dW H dW^T) / tr(W H W^T)) for correlated inputs with outlier channels"
          f"   (one [{shape[0]}, {shape[1]}] gate_up matrix in its format; rtn: without H, gptq: against H; "
          "quantize seconds in brackets)")
    cols = refines
    head = f"{'weights':<11} {'precision':<9} " + " ".join(f"{c:>18}" for c in cols)
    print(head)
    print("-" * len(head))
    by = {}
    for r in rows:
        by.setdefault((r["dist"], r["precision"]), {})[r["refine"]] = r
    for (dist, prec), d in by.items():
        if "-" in d:
            cells = [f"{d['-']['rel_error']:>9.5f} [{d['-']['quantize_s']:5.2f}s]"] + [""] * (len(cols) - 1)
            cells = [f"{c:>18}" for c in cells]
        else:
            cells = [f"{d[c]['rel_error']:>9.5f} [{d[c]['quantize_s']:5.2f}s]" if c in d else f"{'':>18}"
                     for c in cols]
        print(f"{dist:<11} {prec:<9} " + " ".join(cells))
    print("(float precisions have one value: their single value is in the first column)")


# -------------------------------------------------------------------------------------------- timing


def random_qweight(p: Precision, matrix: str, shape, g) -> QuantizedWeight:
    """A valid QuantizedWeight of random content in p's format for `matrix`, made without running the quantizer."""
    n, k = shape
    f = spec(p, matrix)
    if p.is_float:
        return QuantizedWeight(p, (n, k), 0, 0, (torch.randn(n, k, generator=g) * 0.02).to(p.dtype))
    gs = f.group_for(k)
    ng = -(-k // gs)
    # random bytes are valid packed codes at every width (int3 packs 8 codes in 3 bytes, all patterns valid)
    data = torch.randint(0, 256, (packed_nbytes(n * k, f.bits),), dtype=torch.uint8, generator=g)
    if f.kind == "int8":
        return QuantizedWeight(p, (n, k), 8, k, data, (torch.rand(n, 1, generator=g) * 1e-3).half(),
                               (torch.rand(n, 1, generator=g) * 255).half())
    codes = [torch.randint(1, 256, (n, ng), dtype=torch.uint8, generator=g) for _ in range(2)]
    ranges = torch.tensor([[1e-5, 1e-4, -0.01]] * (-(-n // 16))).half()
    return QuantizedWeight(p, (n, k), f.bits, gs, data, codes[0], codes[1], ranges)


def build_kernels(p, matrix, shape, count, seed, dense=False):
    """dense: every precision behind DenseLinear (the module a dense matrix of the model becomes: float weights
    run the native row-major kernel there, not aten's linear)."""
    g = torch.Generator().manual_seed(seed)
    ks = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(count):
            k = kernels.prepare(random_qweight(p, matrix, shape, g), backend="cpu")
            ks.append(DenseLinear(k, None, shape[1], shape[0], p.value) if dense else k)
    return ks, [str(w.message) for w in caught]


def one_pass(ks, x) -> float:
    t0 = time.perf_counter()
    for k in ks:
        k(x)
    return (time.perf_counter() - t0) / len(ks) * 1e6  # us per matmul


def time_shape(name, shape, precisions, ms, count, repeats, seed, dense=False):
    n, k = shape
    built, info = {}, {}
    t0 = time.perf_counter()
    for i, p in enumerate(precisions):
        try:
            ks, warns = build_kernels(p, name if name in ("gate_up", "down") else "gate_up", shape, count,
                                      seed + 1000 * i, dense)
        except Exception as e:  # e.g. the int2/int3 kernel module mid-rewrite: report, keep going
            info[p.value] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  [{name}] {p.value}: kernels.prepare failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        built[p] = ks
        k0 = ks[0].kernel if dense else ks[0]
        info[p.value] = {"kernel": kernel_name(k0) + (" in DenseLinear" if dense else ""), "nbytes": k0.nbytes,
                         "bytes_per_weight": k0.nbytes / (n * k), "warnings": sorted(set(warns))}
    setup_s = time.perf_counter() - t0
    resident = sum(info[p.value]["nbytes"] * len(ks) for p, ks in built.items())
    print(f"  [{name} {n}x{k}] built {count} matrices x {len(built)} precisions in {setup_s:.0f}s, "
          f"{resident / 2**30:.2f} GiB resident", file=sys.stderr)
    xs = {m: torch.randn(m, k, generator=torch.Generator().manual_seed(seed + m)).to(torch.bfloat16) for m in ms}
    samples = {(p, m): [] for p in built for m in ms}
    order = list(built)
    for p in order:  # warm-up: one pass each (first-call costs, page faults)
        for m in ms:
            one_pass(built[p], xs[m])
    with CpuLoad() as load:
        for r in range(repeats):
            rot = order[r % len(order):] + order[:r % len(order)]
            for p in rot:
                for m in ms:
                    samples[(p, m)].append(one_pass(built[p], xs[m]))
    del built
    info["_load"] = {"others_cores": load.others, "mine_cores": load.mine}
    print(f"  [{name}] timed; other processes used {load.others:.2f} cores meanwhile", file=sys.stderr)
    out = {}
    for (p, m), s in samples.items():
        med = statistics.median(s)
        out.setdefault(p.value, {})[m] = {"median_us": med, "min_us": min(s), "max_us": max(s),
                                          "spread": (max(s) - min(s)) / med, "samples_us": s}
    return out, info, setup_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--precisions", default="bf16,int8,int4,int3,int2",
                    help="comma list (add fp16 or fp32 if wanted); bf16 is always included as the baseline")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="name=NxK,... (weight [N out, K in])")
    ap.add_argument("--ms", default="1,8", help="activation rows M (decode batch) to time")
    ap.add_argument("--matrices", type=int, default=256, help="distinct weights per (shape, precision)")
    ap.add_argument("--repeats", type=int, default=11, help="timed passes per (shape, precision, M); median")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--error-shape", default="1536x2048", help="matrix shape of the error table")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--dense", action="store_true", help="time each precision as the model's dense matrices run it "
                    "(DenseLinear: bf16/fp16/fp32 on the native row-major kernel instead of aten's linear)")
    ap.add_argument("--skip-errors", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before timing, wait up to S seconds for other processes to use < 0.3 cores")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 16 matrices, 3 repeats, [256, 512] error matrix")
    args = ap.parse_args(argv)
    if args.quick:
        args.matrices, args.repeats, args.error_shape = 16, 3, "256x512"

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    precisions = Precision.parse_list(args.precisions)
    if Precision.BF16 not in precisions:
        precisions.insert(0, Precision.BF16)
    shapes = parse_shapes(args.shapes)
    ms = [int(m) for m in args.ms.split(",")]
    refines = [r.strip() for r in args.methods.split(",")]
    en, ek = (int(v) for v in args.error_shape.lower().split("x"))

    print(f"bench/kernels.py  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"cpu {platform.processor() or platform.machine()}  matrices/precision {args.matrices}  "
          f"repeats {args.repeats}{'  (quick)' if args.quick else ''}")

    errors = []
    if not args.skip_errors:
        t0 = time.perf_counter()
        errors = error_table((en, ek), precisions, refines, args.seed)
        print_errors(errors, (en, ek), refines)
        print(f"(error table took {time.perf_counter() - t0:.0f}s)")

    timing, infos, setup = {}, {}, {}
    if not args.skip_timing and args.wait_quiet > 0:
        wait_for_quiet(args.wait_quiet)
    if not args.skip_timing:
        for i, (name, shape) in enumerate(shapes.items()):
            timing[name], infos[name], setup[name] = time_shape(name, shape, precisions, ms, args.matrices,
                                                                args.repeats, args.seed + 7 * i, args.dense)
        print_timing(timing, infos, shapes, ms, args)

    targets = evaluate_targets(timing, shapes, ms) if timing else {}
    if targets:
        print("\n== targets (ratios: median over repeats of the per-repeat ratio, both sampled in the same repeat)")
        for t in targets:
            print(f"  {'PASS' if t['pass'] else 'MISS'}  {t['name']}: {t['value']:.3f} (goal {t['goal']})")
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f}s")
    result = {
        "bench": "kernels", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "config": {"precisions": [p.value for p in precisions], "shapes": {k: list(v) for k, v in shapes.items()},
                   "ms": ms, "matrices": args.matrices, "repeats": args.repeats,
                   "error_shape": [en, ek], "quick": args.quick},
        "errors": errors,
        "timing_us": {s: {p: {str(m): {k: v for k, v in d.items()} for m, d in pm.items()} for p, pm in t.items()}
                      for s, t in timing.items()},
        "kernels": infos, "setup_s": setup, "targets": targets, "total_s": total,
    }
    print(json.dumps(result))


def print_timing(timing, infos, shapes, ms, args):
    print(f"\n== matmul time, x [M, K] bf16 @ W^T, median of {args.repeats} passes over {args.matrices} "
          f"distinct weights (us per matmul; x bf16 = ratio to bf16 in this run; spread = (max-min)/median)")
    mcols = " ".join(f"{'M=' + str(m) + ' us':>10} {'x bf16':>7} {'spread':>6}" for m in ms)
    head = f"{'shape':<16} {'precision':<9} {'kernel':<24} {'B/weight':>8} {'bits/w':>6} " + mcols
    print(head)
    print("-" * len(head))
    for name, t in timing.items():
        n, k = shapes[name]
        base = t.get("bf16")
        for p, info in infos[name].items():
            if p == "_load":
                continue
            if "error" in info:
                print(f"{name + f' {n}x{k}':<16} {p:<9} FAILED: {info['error'][:90]}")
                continue
            cells = []
            for m in ms:
                d = t[p][m]
                ratio = d["median_us"] / base[m]["median_us"] if base else float("nan")
                cells.append(f"{d['median_us']:>10.1f} {ratio:>7.3f} {d['spread']:>6.2f}")
            print(f"{name + f' {n}x{k}':<16} {p:<9} {info['kernel']:<24} {info['bytes_per_weight']:>8.4f} "
                  f"{8 * info['bytes_per_weight']:>6.2f} " + " ".join(cells))
            for w in info["warnings"]:
                print(f"    warning: {w}")
    for name in timing:
        print(f"  ({name}: other processes used {infos[name]['_load']['others_cores']:.2f} of "
              f"{os.cpu_count()} cores while it was timed)")
    # one expert = gate_up + down: the per-expert cost a MoE decode step pays
    if len(timing) > 1:
        print("-" * len(head))
        precs = [p for p in next(iter(timing.values())) if all(p in t for t in timing.values())]
        for p in precs:
            cells = []
            for m in ms:
                tot = sum(t[p][m]["median_us"] for t in timing.values())
                btot = sum(t["bf16"][m]["median_us"] for t in timing.values()) if all("bf16" in t for t in timing.values()) else float("nan")
                cells.append(f"{tot:>10.1f} {tot / btot:>7.3f} {'':>6}")
            nb = sum(infos[s][p]["nbytes"] for s in timing)
            nw = sum(shapes[s][0] * shapes[s][1] for s in timing)
            print(f"{'expert (sum)':<16} {p:<9} {'':<24} {nb / nw:>8.4f} {8 * nb / nw:>6.2f} " + " ".join(cells))


def paired_ratio(timing, scope, p, q, m):
    """Median over repeats of t_p / t_q, both sampled in the same repeat (drift cancels); None if missing."""
    names = list(timing) if scope == "expert (sum)" else [scope]
    if not all(p in timing[n] and q in timing[n] for n in names):
        return None
    reps = len(timing[names[0]][p][m]["samples_us"])
    rs = [sum(timing[n][p][m]["samples_us"][r] for n in names) / sum(timing[n][q][m]["samples_us"][r] for n in names)
          for r in range(reps)]
    return statistics.median(rs)


def evaluate_targets(timing, shapes, ms):
    out = []
    scopes = list(timing) + (["expert (sum)"] if len(timing) > 1 else [])
    for scope in scopes:
        if 1 in ms:
            r = paired_ratio(timing, scope, "int4", "bf16", 1)
            if r is not None:
                out.append({"name": f"{scope}: int4 / bf16 time at M=1", "value": r, "goal": "<= 0.4", "pass": r <= 0.4})
        for low in ("int3", "int2"):
            for m in ms:
                r = paired_ratio(timing, scope, low, "int4", m)
                if r is not None:
                    out.append({"name": f"{scope}: {low} / int4 time at M={m}", "value": r, "goal": "<= 1.0",
                                "pass": r <= 1.0})
    return out


if __name__ == "__main__":
    main()
