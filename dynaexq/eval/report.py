"""Human-readable output of `dynaexq eval`: a table, and for `--sweep` a quality-vs-bytes plot and markdown."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dynaexq.sizes import format_size


def table(report: dict, markdown: bool = False) -> str:
    domains = list(report["reference"])
    head = ["policy", "expert bytes", "weight bytes", "mean KL"] + [f"{d} {m}" for d in domains
                                                                    for m in ("ppl", "KL", "top-1")]
    rows = [[f"reference ({report['reference_policy']})", format_size(report["reference_expert_bytes"]),
             format_size(report["reference_weight_bytes"]) if "reference_weight_bytes" in report else "-", "0"]
            + [c for d in domains for c in (f"{report['reference'][d]['ppl']:.2f}", "0", "1")]]
    for r in report["results"]:
        rows.append([r["policy"], format_size(r["expert_bytes"]),
                     format_size(r["weight_bytes"]) if "weight_bytes" in r else "-", f"{r['mean_kl']:.5f}"]
                    + [c for d in domains for c in (f"{r['domains'][d]['ppl']:.2f}", f"{r['domains'][d]['kl']:.5f}",
                                                     f"{r['domains'][d]['top1']:.3f}")])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x[i])) for x in [head] + rows) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows])


def sweep_budgets(reader, points_between: int = 1) -> list[int]:
    """Budgets from every-expert-at-the-cheapest to every-expert-at-int8: the bytes of each uniform precision
    (resident ones, given a SizedReader) and `points_between` geometric steps between neighbours."""
    sizes = sorted({sum(reader.expert_bytes(layer, e, p) for layer in reader.layers for e in range(reader.num_experts))
                    for p in reader.precisions if p.bits <= 8})
    out = []
    for a, b in zip(sizes, sizes[1:]):
        out += [round(a * (b / a) ** (i / (points_between + 1))) for i in range(points_between + 1)]
    return out + sizes[-1:]


def plot(report: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    groups: dict[str, list] = {}
    for r in report["results"]:
        name = r["policy"] if r["policy"].startswith(("uniform", "map")) else r["policy"].split(":")[0]
        groups.setdefault("uniform" if name.startswith("uniform") else name, []).append(r)
    styles = {"uniform": ("k", "s"), "calibrated": ("tab:blue", "o"), "calibrated-multilevel": ("tab:green", "^"),
              "oracle": ("tab:red", "v")}
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["expert_bytes"])
        color, marker = styles.get(name, (None, "x"))
        label = (rs[0]["policy"] if name == "calibrated" else name) + (
            " (upper bound: eval text's own routing)" if name == "oracle" else "")
        ax.plot([r["expert_bytes"] / 2**20 for r in rs], [r["mean_kl"] for r in rs], marker=marker, color=color,
                label=label, linestyle="-" if name != "uniform" else "--")
        if name == "uniform":
            for r in rs:
                ax.annotate(r["policy"].split(":")[1], (r["expert_bytes"] / 2**20, r["mean_kl"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("expert bytes resident (MiB, measured)")
    ax.set_ylabel("mean KL(reference || policy) per token")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def atomic_save(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
