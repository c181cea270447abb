"""Serving throughput and latency of `dynaexq serve` at 1, 8 and 32 concurrent streaming clients.

Command (~7 min on 2 cores):

    .venv/bin/python bench/serve.py                     # bundled model, dynaexq policy at --expert-budget int3

What it measures
  Server: `dynaexq serve` started by this script as a subprocess on 127.0.0.1 (policy --policy, default
  dynaexq:hi=int8,lo=int2 at --expert-budget int3, so the controller and transitions run live; --max-batch 32).
  Clients: N threads (N = each of --concurrency), each sending streamed /v1/completions with the official
  openai client back to back for --seconds: prompts are 240-character snippets of the model's eval texts
  (code, prose, dict in turn), --max-tokens tokens, temperature 0.8 with a per-request seed. The client
  threads run on the same machine (their CPU time is included: this is the throughput a local client sees).
  Per level: aggregate generated tokens/s = completion tokens (from `usage`) / wall seconds of the level;
  TTFT = request sent -> first text chunk; per-token latency = gaps between a stream's successive chunks
  (one token each). --repeats rounds each run every level in turn (1, 8, 32, 1, 8, 32, ...: drift of a shared
  machine hits all levels alike); reported: the median tok/s per level, the median over rounds of each round's
  ratio to 1 client, and latency percentiles over all requests / gaps of a level. One warm-up request first.
Goal: aggregate tokens/s at 8 clients >= 3x that at 1 client.
Output: a human table, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import requests

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "dynaexq" / "bundled" / "dxq-moe-mini"


def _pct(xs, q):
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))


def _prompts(model_dir: Path) -> list[str]:
    out = []
    for name in ("code", "prose", "dict"):
        f = model_dir / "eval" / f"{name}.txt"
        if f.is_file():
            text = f.read_text()
            out += [text[s:s + 240] for s in range(0, len(text) - 400, len(text) // 40)]
    return out or ["def main():", "The history of", "apple (noun)"]


def level(url: str, model: str, clients: int, seconds: float, max_tokens: int, prompts) -> dict:
    ttft, gaps, tokens, errors = [], [], [0], []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def client(i):
        rng = random.Random(i)
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        while time.perf_counter() - t0 < seconds:
            sent, last, mine = time.perf_counter(), None, []
            try:
                stream = api.completions.create(model=model, prompt=rng.choice(prompts), max_tokens=max_tokens,
                                                temperature=0.8, seed=rng.randint(0, 1 << 30), stream=True,
                                                stream_options={"include_usage": True})
                n = 0
                for chunk in stream:
                    now = time.perf_counter()
                    if chunk.choices and chunk.choices[0].text:
                        mine.append(now - (sent if last is None else last))
                        last = now
                    if chunk.usage:
                        n = chunk.usage.completion_tokens
                with lock:
                    tokens[0] += n
                    if mine:
                        ttft.append(mine[0])
                        gaps.extend(mine[1:])
            except Exception as err:  # noqa: BLE001 - reported
                with lock:
                    errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "tokens": tokens[0], "seconds": wall, "tok_s": tokens[0] / wall,
            "requests": len(ttft), "errors": len(errors), "ttft": ttft, "gaps": gaps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(BUNDLED))
    ap.add_argument("--policy", default="dynaexq")
    ap.add_argument("--expert-budget", default="int3")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--dtype", default="model", help="serve --dtype (default: %(default)s)")
    ap.add_argument("--dense", default="model", help="serve --dense (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="serve --threads (default: the server's own, all cores)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all levels; medians are reported")
    args = ap.parse_args()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "dynaexq.cli", "serve", "--model", args.model, "--policy", args.policy,
           "--expert-budget", args.expert_budget, "--max-batch", str(args.max_batch), "--port", str(port),
           "--dtype", args.dtype, "--dense", args.dense, "--log-level", "warning"] + \
        (["--threads", str(args.threads)] if args.threads else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                print(server.stderr.read(), file=sys.stderr)
                return 1
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in 10 minutes")
            time.sleep(0.5)
        model = requests.get(url + "/v1/models").json()["data"][0]["id"]
        prompts = _prompts(Path(args.model))
        level(url, model, 1, 0.1, 8, prompts)  # warm-up
        levels = [int(c) for c in args.concurrency.split(",")]
        rounds = [[level(url, model, c, args.seconds, args.max_tokens, prompts) for c in levels]
                  for _ in range(args.repeats)]
        experts = requests.get(url + "/v1/experts").json()
    finally:
        server.terminate()
        server.wait(timeout=120)

    print(f"dynaexq serve, {args.policy} at --expert-budget {args.expert_budget}, --dtype {args.dtype}, "
          f"--max-batch {args.max_batch}, --threads {args.threads or 'default'}, "
          f"{args.max_tokens} tokens per request, {args.seconds:.0f} s per level")
    print(f"{'clients':>7} {'tok/s':>8} {'x1':>6} {'reqs':>5} {'err':>4} {'TTFT p50/p90/p99 ms':>22} "
          f"{'token p50/p90/p99 ms':>22}   tok/s per round")
    rows = []
    for i, c in enumerate(levels):
        runs = [r[i] for r in rounds]
        rows.append({"clients": c, "tok_s": statistics.median(r["tok_s"] for r in runs),
                     "x1": statistics.median(r[i]["tok_s"] / r[0]["tok_s"] for r in rounds),
                     "tok_s_runs": [round(r["tok_s"], 1) for r in runs], "requests": sum(r["requests"] for r in runs),
                     "errors": sum(r["errors"] for r in runs),
                     "ttft_ms": {q: 1000 * _pct(sum((r["ttft"] for r in runs), []), q) for q in (50, 90, 99)},
                     "token_ms": {q: 1000 * _pct(sum((r["gaps"] for r in runs), []), q) for q in (50, 90, 99)}})
    for r in rows:
        t, g = r["ttft_ms"], r["token_ms"]
        print(f"{r['clients']:>7} {r['tok_s']:>8.1f} {r['x1']:>6.2f} {r['requests']:>5} {r['errors']:>4} "
              f"{t[50]:>8.0f}/{t[90]:.0f}/{t[99]:.0f} {g[50]:>10.1f}/{g[90]:.1f}/{g[99]:.1f}   {r['tok_s_runs']}")
    tr = experts["transitions"]
    print(f"runtime: {tr['promotions']} promotions, {tr['demotions']} demotions, forward wait "
          f"{experts['forward_wait_s'] * 1000:.1f} ms, peak {experts['budget']['peak_used']} of "
          f"{experts['budget']['cap']} bytes")
    print(json.dumps({"bench": "serve", "policy": args.policy, "expert_budget": args.expert_budget, "dtype": args.dtype, "threads": args.threads,
                      "dense": args.dense,
                      "levels": rows, "transitions": tr, "forward_wait_s": experts["forward_wait_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
