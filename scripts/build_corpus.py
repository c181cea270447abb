"""Build the three-domain corpus of the bundled model from files on this machine (Debian packages).

    apt-get install -y --no-install-recommends dict-gcide fortunes python3.11-doc perl-doc
    python scripts/build_corpus.py --out build/corpus

Domains and sources (licenses in the model card):
  code   Python 3.11 standard library source (/usr/lib/python3.11, PSF License)
  prose  Python 3.11 documentation sources (python3.11-doc, PSF License), Perl pod (perl-doc, GPL-1+ or Artistic),
         fortune cookies (fortunes, BSD-style / public domain)
  dict   GNU Collaborative International Dictionary of English (dict-gcide, GPL-3+)

Each source document (a file; for the dictionary a run of 100 entries) goes wholly to train, calibration or eval
by a stable hash of its name, so eval text is never seen in training nor used for calibration. Output: per domain
train.txt, calib.txt, eval.txt; documents are separated by a blank line and '<|endoftext|>'.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

EOT = "<|endoftext|>"
SOURCES = {
    "code": [("/usr/lib/python3.11", "**/*.py")],
    "prose": [("/usr/share/doc/python3.11/html/_sources", "**/*.rst.txt"), ("/usr/share/perl/5.36/pod", "*.pod"),
              ("/usr/share/games/fortunes", "*")],
    "dict": [("/usr/share/dictd/gcide.dict.dz", None)],
}
MAX_DOC = 200_000  # bytes; larger files are data tables, not text
SPLIT_PERCENT = {"eval": 3, "calib": 3}  # the rest is train


def split_of(name: str) -> str:
    h = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 100
    if h < SPLIT_PERCENT["eval"]:
        return "eval"
    if h < SPLIT_PERCENT["eval"] + SPLIT_PERCENT["calib"]:
        return "calib"
    return "train"


def documents(domain: str):
    for root, pattern in SOURCES[domain]:
        root = Path(root)
        if not root.exists():
            raise SystemExit(f"{root} is missing: apt-get install -y --no-install-recommends "
                             "dict-gcide fortunes python3.11-doc perl-doc")
        if pattern is None:  # the dictionary: entries start at column 0, bodies are indented
            text = gzip.open(root, "rt", encoding="utf-8", errors="replace").read()
            entries, cur = [], []
            for line in text.splitlines():
                if line and not line[0].isspace() and cur and not cur[-1].strip():
                    entries.append("\n".join(cur).strip())
                    cur = []
                cur.append(line)
            entries.append("\n".join(cur).strip())
            entries = [e for e in entries if not e.startswith("00-database")]
            for i in range(0, len(entries), 100):
                yield f"gcide:{i}", "\n\n".join(entries[i:i + 100])
            continue
        for path in sorted(root.glob(pattern)):
            if path.is_file() and path.suffix not in (".dat", ".u8") and path.stat().st_size <= MAX_DOC:
                text = path.read_text(encoding="utf-8", errors="replace")
                if domain == "prose" and "fortunes" in str(path):
                    text = text.replace("\n%\n", "\n\n")
                yield str(path), text.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/corpus")
    args = ap.parse_args()
    out = Path(args.out)
    stats = {}
    for domain in SOURCES:
        parts = {"train": [], "calib": [], "eval": []}
        for name, text in documents(domain):
            if text:
                parts[split_of(name)].append(text)
        (out / domain).mkdir(parents=True, exist_ok=True)
        stats[domain] = {}
        for split, docs in parts.items():
            body = f"\n\n{EOT}\n\n".join(docs) + "\n"
            (out / domain / f"{split}.txt").write_text(body, encoding="utf-8")
            stats[domain][split] = {"documents": len(docs), "bytes": len(body.encode())}
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
