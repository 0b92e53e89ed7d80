"""Learning curves from `mtp train --eval-data` logs: held-out top-1 per draft step and the chain's tokens per
target forward (tau) against training tokens, on a log scale.

    python plot_curve.py OUT.png NAME=RUN/metrics.jsonl [NAME=RUN/metrics.jsonl ...] [--chain 4] [--extrapolate 100]

--extrapolate X fits top-1 = a + b * log10(tokens) per draft step to the first run's evaluations from its
second half (past warm-up and the steepest start), draws the fit out to X times its tokens (dotted), and
prints the fitted top-1 and the chain's tau it implies (1 + p1 + p1 p2 + ..., each step's top-1 being given
the steps before right) at 10x and 100x. A straight line in log tokens is a reading aid, not a law: curves
bend over, so treat the figure as an upper-side guess of what a longer run on the same recipe reaches.
"""

import argparse
import json

import matplotlib
import numpy as np

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
    ap.add_argument("--extrapolate", type=float, default=0.0)
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
    if args.extrapolate > 1:
        extrapolate(evals(args.runs[0].rpartition("=")[2]), args.chain, args.extrapolate, ax1, ax2)
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


def extrapolate(rows: list[dict], chain: int, factor: float, ax1, ax2):
    rows = rows[len(rows) // 2:]
    x = np.log10([r["tokens"] for r in rows])
    last = x[-1]
    grid = np.linspace(x[0], last + np.log10(factor), 50)
    fits = []
    for k in range(min(chain, len(rows[0]["eval"]["top1"]))):
        b, a = np.polyfit(x, [r["eval"]["top1"][k] for r in rows], 1)
        fits.append((a, b))
        ax1.plot(10 ** grid, np.clip(a + b * grid, 0, 1), ":", color=f"C{k}")

    def fitted(at):  # top-1 per draft step at log10(tokens) = at, clipped to [0, 1]
        return [min(max(a + b * at, 0.0), 1.0) for a, b in fits]

    def tau(at):
        p = fitted(at)
        return 1 + sum(np.prod(p[:i + 1]) for i in range(len(p)))

    ax2.plot(10 ** grid, [tau(g) for g in grid], ":", color="gray", label="log-linear fit")
    print("| training tokens | fitted top-1 per draft step | implied chain tau |")
    print("|---:|---|---:|")
    for mult in (1, 10, 100):
        at = last + np.log10(mult)
        p = " / ".join(f"{x:.3f}" for x in fitted(at))
        print(f"| {10 ** at:,.0f} ({mult}x) | {p} | {tau(at):.2f} |")


if __name__ == "__main__":
    main()
