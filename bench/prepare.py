"""Throughput and peak memory of `dynaexq.store.prepare.prepare` on a >= 2 GB checkpoint.

Command (full run: builds a 2.5 GB bf16 checkpoint once (~45 s), then prepares it: ~4 min on 2 quiet cores
with five precisions at commit 663b198 (7.5 min before its streaming prepare); a busy second
process on the machine can make it 2-4x slower; `--quick` is a ~30 s smoke test):

    .venv/bin/python bench/prepare.py                       # --workdir /tmp/dynaexq-bench
    .venv/bin/python bench/prepare.py --precisions bf16,int4
    .venv/bin/python bench/prepare.py --quick
    .venv/bin/python bench/prepare.py --ray 2                # the quantization as tasks on a local 2-CPU Ray cluster

What it measures
  The checkpoint: a random Qwen3MoeForCausalLM with Qwen3-30B-A3B layer shapes (hidden 2048,
  moe_intermediate 768, 128 experts, top-8, 32 heads / 4 KV heads of 128), `--layers` layers (default 2:
  2 x 1.21 GB of bf16 experts), vocabulary 4096, written shard by shard (<= 1 GiB each) as sharded
  safetensors with transformers' save_pretrained key names (`bench/_common.py`); cached in --workdir.
  The run: `prepare_store(src, out, precisions)` (calibrated on the bundled tokenizer's calibration texts,
  128 x 256 tokens, as `dynaexq prepare` does; --no-calibration: weight-only) in a fresh Python subprocess, so its RSS is
  prepare's alone. The parent samples /proc/PID/status (VmRSS, RssAnon, RssFile) every 0.1 s; the child
  reports its own VmHWM at exit and its RSS right after importing torch + transformers + dynaexq (the
  constant C of the target). Reported: wall time of prepare(), throughput in GB of source-dtype expert
  weights per second and in expert parameters per second (each parameter is quantized once per
  precision), seconds per MoE layer (from the finish times of its shards), peak RSS, one layer's experts in
  the source dtype (E_layer), and peak RSS / E_layer; then the start-up integrity check of the store a load
  pays: lazy (the default: stamps) and full (sha256 of every shard), cold (evicted from the page cache with
  posix_fadvise) and warm.
  Target (pass/miss): peak RSS <= 2 x E_layer + C.
  The source shards were just written or read, so they are mostly in the page cache: this measures
  prepare's compute, not disk reads. The store is deleted before each run (prepare resumes finished
  shards otherwise) and kept after it (bench/generate.py reuses it).

Output: human tables, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CpuLoad, checkpoint_info, fmt_bytes, proc_status, synthetic_checkpoint  # noqa: E402

CHILD = r"""
import json, os, sys, time
def st():
    out = {}
    for line in open('/proc/self/status'):
        k, _, v = line.partition(':')
        if k in ('VmRSS', 'VmHWM', 'RssAnon', 'RssFile'):
            out[k] = int(v.split()[0]) * 1024
    return out
t_import = time.perf_counter()
import torch, transformers
torch.set_num_threads(int(os.environ['BENCH_THREADS']))
from dynaexq.engine.calibrate import prepare_store
import dynaexq.quant.quantize, dynaexq.store.checkpoint
t_import = time.perf_counter() - t_import
base = st()
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
runner = None
if args['ray']:  # a local Ray cluster of that many CPUs (workers); the driver (this process) does the calibration pass
    import ray
    from dynaexq.store.distributed import RayRunner
    ray.init(num_cpus=args['ray'], include_dashboard=False, log_to_driver=False)
    runner = RayRunner()
prepare_store(args['src'], args['out'], args['precisions'], args['calibration'], args['windows'], progress=args['progress'],
              runner=runner)
wall = time.perf_counter() - t0
print('BENCH_RESULT ' + json.dumps({'baseline': base, 'end': st(), 'wall_s': wall, 'import_s': t_import}), flush=True)
"""


def run_child(src, out, precisions, calibration, windows, threads, progress, interval=0.1, extra_env=None, ray=0):
    env = {**os.environ, **(extra_env or {}), "BENCH_THREADS": str(threads)}
    payload = json.dumps({"src": str(src), "out": str(out), "precisions": precisions, "calibration": calibration,
                          "windows": windows, "progress": progress, "ray": ray})
    proc = subprocess.Popen([sys.executable, "-c", CHILD, payload], stdout=subprocess.PIPE, stderr=None,
                            text=True, env=env)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    timeline = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample():
        while not stop.is_set():
            s = proc_status(proc.pid)
            if s:
                for k in peaks:
                    peaks[k] = max(peaks[k], s.get(k, 0))
                timeline.append((time.perf_counter() - t0, s.get("VmRSS", 0)))
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    with CpuLoad() as load:
        th.start()
        stdout, _ = proc.communicate()
        stop.set()
        th.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare subprocess failed with exit code {proc.returncode}")
    line = [ln for ln in stdout.splitlines() if ln.startswith("BENCH_RESULT ")][-1]
    res = json.loads(line.removeprefix("BENCH_RESULT "))
    res["sampled_peak"] = peaks
    res["timeline"] = timeline
    res["others_cores"] = load.others
    return res


def job_times(out: Path, t_start_epoch: float) -> list[dict]:
    """MoE layers in the order they finished (all precisions of a layer are written together), with the seconds
    each took."""
    done = {}
    for f in (out / "experts").glob("*.safetensors"):
        layer = f.name.split(".")[0]
        done[layer] = max(done.get(layer, 0.0), f.stat().st_mtime)
    firsts = sorted(f.stat().st_mtime for f in out.glob("nonexpert*.safetensors"))
    rows, prev = [], firsts[-1] if firsts else t_start_epoch
    for mtime, layer in sorted((t, layer) for layer, t in done.items()):
        rows.append({"layer": layer, "seconds": mtime - prev})
        prev = mtime
    return rows


def startup_cost(out: Path) -> dict:
    """Seconds of a load's integrity check of the store: lazy (stamps) and full (sha256 of every shard), each with
    the store in the page cache (warm) and evicted first with posix_fadvise(DONTNEED) (cold, as after a reboot)."""
    from dynaexq.store.reader import StoreReader

    def evict():
        for f in out.rglob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

    res = {}
    for mode in ("lazy", "full"):
        for cache in ("cold", "warm"):
            if cache == "cold":
                evict()
            t0 = time.perf_counter()
            StoreReader(out).check(mode)
            res[f"{mode}_{cache}_s"] = time.perf_counter() - t0
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workdir", default="/tmp/dynaexq-bench", help="checkpoint cache and store directory")
    ap.add_argument("--precisions", default="bf16,int8,int6,int4,int3,int2")
    ap.add_argument("--layers", type=int, default=2, help="MoE layers (each: 128 experts, 1.21 GB in bf16)")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192, help=">= 8192: the bundled tokenizer is added, so prepare "
                    "calibrates")
    ap.add_argument("--calibration-windows", type=int, default=128, help="windows of 256 tokens (default 128)")
    ap.add_argument("--no-calibration", action="store_true", help="weight-only prepare (no calibration pass)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in the prepare process")
    ap.add_argument("--progress", action="store_true", help="show prepare's tqdm bar (stderr)")
    ap.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the prepare subprocess (repeatable), e.g. "
                         "MALLOC_MMAP_THRESHOLD_=1048576 to test whether freed memory stays in glibc's heap")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 layer of 8 experts, bf16,int4,int2")
    ap.add_argument("--ray", type=int, default=0, metavar="N", help="quantize on a local Ray cluster of N worker CPUs "
                    "(prepare --ray); the RSS is the driver's (workers are other processes)")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.experts = 1, 8
        if args.precisions == ap.get_default("precisions"):
            args.precisions = "bf16,int4,int2"
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    t_all = time.perf_counter()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    print(f"bench/prepare.py  workdir {workdir}  layers {args.layers}  experts {args.experts}  "
          f"precisions {','.join(precisions)}  threads {args.threads}{'  (quick)' if args.quick else ''}"
          f"{f'  ray workers {args.ray}' if args.ray else ''}"
          f"{'  child env ' + ' '.join(args.child_env) if args.child_env else ''}")
    t0 = time.perf_counter()
    src = synthetic_checkpoint(workdir, layers=args.layers, experts=args.experts, vocab=args.vocab,
                               log=lambda m: print(m, file=sys.stderr))
    build_s = time.perf_counter() - t0
    info = checkpoint_info(src)
    # read the source once so that it is in the page cache for the timed run (as after a download)
    t0 = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    warm_s = time.perf_counter() - t0

    out = workdir / f"store-{src.name}-{'_'.join(precisions)}{'-nocal' if args.no_calibration else ''}"
    if out.exists():
        shutil.rmtree(out)
    t_epoch = time.time()
    child_env = dict(kv.split("=", 1) for kv in args.child_env)
    res = run_child(src, out, precisions, ["none"] if args.no_calibration else None, args.calibration_windows,
                    args.threads, args.progress, extra_env=child_env, ray=args.ray)
    jobs = job_times(out, t_epoch)

    e_layer = info["expert_bytes"] / args.layers
    params_per_layer = e_layer / 2 if info["dtype"] in ("bfloat16", "float16") else e_layer / 4
    expert_params = params_per_layer * args.layers
    wall = res["wall_s"]
    peak = max(res["end"].get("VmHWM", 0), res["sampled_peak"]["VmRSS"])
    base = res["baseline"]["VmRSS"]
    limit = 2 * e_layer + base
    store_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())

    print(f"\n== checkpoint {src}")
    print(f"  total {fmt_bytes(info['total_bytes'])} ({info['total_bytes'] / 1e9:.2f} GB), experts "
          f"{fmt_bytes(info['expert_bytes'])} ({info['expert_bytes'] / 1e9:.2f} GB) in {info['dtype']}; "
          f"{info['params'] / 1e9:.2f} B params; built in {build_s:.0f}s (0 = cached); page-cache warm read {warm_s:.1f}s")
    how = "no calibration" if args.no_calibration else f"calibrated on {args.calibration_windows} x 256 tokens"
    print(f"\n== prepare ({','.join(precisions)}, {how}) -> {out}")
    rows = [
        ("wall time of prepare()", f"{wall:.1f} s"),
        ("throughput, source experts", f"{info['expert_bytes'] / 1e9 / wall:.4f} GB/s   "
                                       f"({info['expert_bytes'] / 2**20 / wall:.1f} MiB/s)"),
        ("throughput, expert params", f"{expert_params / wall / 1e6:.2f} M params/s  "
                                      f"({expert_params * len(precisions) / wall / 1e6:.2f} M param-precisions/s)"),
        ("store size", f"{fmt_bytes(store_bytes)}"),
        ("child import time (torch+transformers+dynaexq)", f"{res['import_s']:.1f} s"),
        ("baseline RSS after imports (C)", fmt_bytes(base)),
        ("peak RSS (VmHWM)", fmt_bytes(res["end"].get("VmHWM", 0))),
        ("peak RSS sampled every 0.1 s", f"{fmt_bytes(res['sampled_peak']['VmRSS'])}  (anon peak "
                                         f"{fmt_bytes(res['sampled_peak']['RssAnon'])}, file-backed peak "
                                         f"{fmt_bytes(res['sampled_peak']['RssFile'])})"),
        ("one layer's experts in source dtype (E_layer)", fmt_bytes(e_layer)),
        ("peak RSS / E_layer", f"{peak / e_layer:.3f}"),
        ("(peak RSS - C) / E_layer", f"{(peak - base) / e_layer:.3f}"),
        ("other processes' CPU during the run", f"{res['others_cores']:.2f} cores (machine shared; 0 = quiet)"),
    ]
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    print("\n== seconds per MoE layer (every precision written from one read of each expert), in finishing order")
    for j in jobs:
        print(f"  {j['layer']:<8} {j['seconds']:8.1f} s   ({j['seconds'] / args.experts * 1e3:7.1f} ms per expert, all "
              f"{len(precisions)} precisions)")
    start = startup_cost(out)
    print(f"\n== start-up integrity check of this {fmt_bytes(store_bytes)} store (what every load pays)")
    for mode, what in (("lazy", "lazy (default): sizes + sampled hashes now, each expert's digest on first read"),
                       ("full", "full (--verify full, inspect --verify): sha256 of every shard")):
        print(f"  {what}: {start[mode + '_cold_s']:.2f} s cold, {start[mode + '_warm_s']:.2f} s in the page cache")
    print("  previous releases hashed every shard at every load (= full)")
    passed = peak <= limit
    print("\n== targets")
    print(f"  {'PASS' if passed else 'MISS'}  peak RSS {fmt_bytes(peak)} <= 2 x E_layer + C = 2 x {fmt_bytes(e_layer)} + "
          f"{fmt_bytes(base)} = {fmt_bytes(limit)}")
    total = time.perf_counter() - t_all
    print(f"\ntotal {total:.0f}s")
    tl = res["timeline"]
    step = max(1, len(tl) // 200)
    result = {
        "bench": "prepare", "quick": args.quick, "checkpoint": str(src), "store": str(out),
        "layers": args.layers, "experts": args.experts, "precisions": precisions, "calibration_windows": None if args.no_calibration else args.calibration_windows,
        "threads": args.threads, "ray_workers": args.ray, "child_env": args.child_env, "checkpoint_bytes": info["total_bytes"], "expert_bytes": info["expert_bytes"],
        "expert_params": expert_params, "wall_s": wall, "gb_per_s": info["expert_bytes"] / 1e9 / wall,
        "params_per_s": expert_params / wall, "store_bytes": store_bytes,
        "baseline_rss": base, "peak_rss": peak, "vmhwm": res["end"].get("VmHWM"), "sampled_peak": res["sampled_peak"],
        "e_layer_bytes": e_layer, "peak_over_e_layer": peak / e_layer, "peak_minus_c_over_e_layer": (peak - base) / e_layer,
        "target_limit_bytes": limit, "target_pass": passed, "jobs": jobs, "others_cores": res["others_cores"],
        "rss_timeline_s_bytes": tl[::step], "build_s": build_s, "total_s": total, "startup": start,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
