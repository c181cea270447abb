"""Per-token cost of the server's detokenization as the output grows (engine/batch.py `Sequence`).

Command (~20 s):

    .venv/bin/python bench/detokenize.py            # --tokens 2048

What it measures
  A Sequence of the bundled model's tokenizer is fed --tokens token ids (the start of its code and prose eval
  texts, so multi-byte characters and leading spaces occur), one `append` at a time, as the scheduler does;
  `append` detokenizes incrementally (prefix-offset method). Reported: the median time of one append within
  windows of 128 tokens at the start, middle and end of the output, against a full re-decode of the output so
  far (what the server did before: O(n) per token, O(n^2) per request) at the same positions. Flat means the
  last window's median is within 1.5x of the first's.
Output: a human table, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from dynaexq.demo import BUNDLED
from dynaexq.engine.batch import SamplingParams, Sequence
from dynaexq.engine.model import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=128)
    args = ap.parse_args()
    tok = load_tokenizer(BUNDLED)
    text = "".join((BUNDLED / "eval" / f"{d}.txt").read_text(encoding="utf-8") for d in ("code", "prose"))
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"][:args.tokens]
    seq = Sequence([0], SamplingParams(max_tokens=len(ids) + 1, temperature=0), tok)
    incremental, full = [], []
    for n, t in enumerate(ids, 1):
        t0 = time.perf_counter()
        seq.append(t)
        incremental.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tok.decode(ids[:n], skip_special_tokens=True)  # the previous method: re-decode everything
        full.append(time.perf_counter() - t0)
    assert seq.text == tok.decode(ids, skip_special_tokens=True)[:len(seq.text)]
    w, n = args.window, len(ids)
    windows = {"start": (0, w), "middle": (n // 2 - w // 2, n // 2 + w // 2), "end": (n - w, n)}
    rows = {name: {"incremental_us": 1e6 * statistics.median(incremental[a:b]),
                   "full_decode_us": 1e6 * statistics.median(full[a:b])} for name, (a, b) in windows.items()}
    print(f"per-token detokenization cost, {n} tokens (median of {w}-token windows)")
    print(f"{'position':>10} {'incremental':>14} {'full re-decode':>16}")
    for name, r in rows.items():
        print(f"{name:>10} {r['incremental_us']:>11.1f} us {r['full_decode_us']:>13.1f} us")
    ratio = rows["end"]["incremental_us"] / rows["start"]["incremental_us"]
    print(f"incremental end/start: {ratio:.2f}x ({'flat' if ratio <= 1.5 else 'NOT flat'}); full re-decode "
          f"end/start: {rows['end']['full_decode_us'] / rows['start']['full_decode_us']:.1f}x")
    print(json.dumps({"bench": "detokenize", "tokens": n, "windows": rows, "incremental_end_over_start": ratio}))


if __name__ == "__main__":
    main()
