"""Learning curves from `mtp train --eval-data` logs: held-out top-1 per draft step and the chain's tokens per
target forward (tau) against training tokens, on a log scale.

    python plot_curve.py OUT.png NAME=RUN/metrics.jsonl [NAME=RUN/metrics.jsonl ...] [--chain 4]
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def evals(path: str) -> list[dict]:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in rows if "eval" in r]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--chain", type=int, default=4)
    args = ap.parse_args()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--", ":", "-."]
    for i, spec in enumerate(args.runs):
        name, _, path = spec.rpartition("=")
        rows = evals(path)
        x = [r["tokens"] for r in rows]
        for k in range(min(args.chain, len(rows[0]["eval"]["top1"]))):
            ax1.plot(x, [r["eval"]["top1"][k] for r in rows], styles[i % 4], marker="o", ms=3, color=f"C{k}",
                     label=f"{name} step {k + 1}" if name else f"draft step {k + 1}")
        ax2.plot(x, [1 + sum(r["eval"]["accepted"][:args.chain]) for r in rows], styles[i % 4], marker="o", ms=3,
                 label=name or None)
    for ax, title in ((ax1, "held-out top-1 per draft step (given the steps before right)"),
                      (ax2, f"greedy chain of {args.chain}: tokens per target forward")):
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7)
    if any("=" in s for s in args.runs):
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
