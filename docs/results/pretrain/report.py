"""Tables and plots of docs/results/pretrain.md from the sweep's run folders and benchmark JSONs.

Usage: python docs/results/pretrain/report.py [RUNS_ROOT]   (default runs/pretrain_sweep)
Reads RUNS_ROOT/{bytes,bpe}_n{1,2,4,8}/{eval.json,metrics.jsonl} and docs/results/pretrain/decode_*.json;
writes docs/results/pretrain/{loss_curves,accuracy_per_head}.png and prints the markdown tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/pretrain_sweep")
TOKS, NS = ("bytes", "bpe"), (1, 2, 4, 8)


def load(tok, n):
    run = ROOT / f"{tok}_n{n}"
    if not (run / "eval.json").is_file():
        return None
    ev = json.loads((run / "eval.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = [m for m in metrics if "losses" in m]
    dec, chain = HERE / f"decode_{tok}_n{n}.json", HERE / f"decode_chain_{tok}_n{n}.json"
    return {"eval": ev, "metrics": metrics, "decode": json.loads(dec.read_text()) if dec.is_file() else None,
            "chain": json.loads(chain.read_text()) if chain.is_file() else None}


runs = {(t, n): r for t in TOKS for n in NS if (r := load(t, n))}

print("### Held-out loss and accuracy\n")
print("| tokenizer | n | next-token loss (nats) | vs n = 1 | bits per byte | top-1 per head (t+1 … t+n) | "
      "train tokens/s |")
print("|---|---:|---:|---:|---:|---|---:|")
for (t, n), r in runs.items():
    ev = r["eval"]
    base = runs.get((t, 1))
    delta = f"{ev['ntp_loss'] - base['eval']['ntp_loss']:+.3f}" if base else "–"
    tops = " / ".join(f"{h['top1']:.3f}" for h in ev["heads"])
    tps = sorted(m["tokens_per_s"] for m in r["metrics"][1:])  # the first logged window includes start-up
    print(f"| {t} | {n} | {ev['ntp_loss']:.3f} | {delta} | {ev['ntp_bits_per_byte']:.3f} | {tops} | "
          f"{tps[len(tps) // 2]:.0f} |")

print("\n### Self-speculative decoding (greedy, code-prefix prompts)\n")
print("| tokenizer | n | method | tau | tokens/s | speedup vs plain | identical to greedy | ")
print("|---|---:|---|---:|---:|---:|---:|")
for (t, n), r in runs.items():
    for d, tag in ((r["decode"], ""), (r["chain"], " (all heads)")):
        if not d:
            continue
        for name, m in d["methods"].items():
            if name in ("transformers", "plain"):
                continue
            cfg = m.get("config", {})
            size = cfg.get("nodes") if name in ("tree", "hybrid") else cfg.get("draft_len")
            label = f"{name}{tag}" + (f" ({size} {'nodes' if name in ('tree', 'hybrid') else 'deep'})" if size else "")
            print(f"| {t} | {n} | {label} | {m['tau']:.2f} | {m['tokens_per_s']:.1f} | {m['speedup']:.2f}x | "
                  f"{m['identical_share']:.0%} |")
    if r["decode"]:
        p = r["decode"]["methods"]["plain"]
        print(f"| {t} | {n} | plain (our loop) | 1.00 | {p['tokens_per_s']:.1f} | {p['speedup']:.2f}x | – |")

fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
for ax, t in zip(axes, TOKS):
    for n in NS:
        if (t, n) in runs:
            ms = runs[(t, n)]["metrics"]
            ax.plot([m["step"] for m in ms], [m["losses"][0] for m in ms], label=f"n = {n}", color=f"C{NS.index(n)}")
    ax.set(title=f"{t}: next-token training loss", xlabel="step", ylabel="nats / token")
    ax.set_ylim(top=min(ax.get_ylim()[1], 3.5 if t == "bytes" else 7))
    ax.legend()
fig.tight_layout()
fig.savefig(HERE / "loss_curves.png", dpi=110)

fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, t in zip(axes, TOKS):
    for n in NS:
        if (t, n) in runs:
            heads = runs[(t, n)]["eval"]["heads"]
            ax.plot([h["head"] + 1 for h in heads], [h["top1"] for h in heads], marker="o", label=f"n = {n}",
                    color=f"C{NS.index(n)}")
    ax.set(title=f"{t}: held-out top-1 per head", xlabel="predicts x(t+k), k", ylabel="top-1 accuracy")
    ax.set_xticks(range(1, 9))
    ax.legend()
fig.tight_layout()
fig.savefig(HERE / "accuracy_per_head.png", dpi=110)
fig, ax = plt.subplots(figsize=(6, 4))
for t in TOKS:
    for key, style, label in (("chain", "-o", "blockwise, all heads"), ("decode", "--s", "tree (sized)")):
        pts = [(n, runs[(t, n)][key]["methods"]["blockwise" if key == "chain" else "tree"]["tau"])
               for n in NS if (t, n) in runs and runs[(t, n)][key]
               and ("blockwise" if key == "chain" else "tree") in runs[(t, n)][key]["methods"]]
        if pts:
            ax.plot(*zip(*pts), style, label=f"{t}: {label}")
ax.set(xlabel="n (tokens predicted per position)", ylabel="tau (tokens per backbone forward)",
       title="self-speculative decoding, code-prefix prompts")
ax.set_xticks(NS)
ax.legend()
fig.tight_layout()
fig.savefig(HERE / "tau_vs_n.png", dpi=110)
print(f"\nplots: {HERE / 'loss_curves.png'}, {HERE / 'accuracy_per_head.png'}, {HERE / 'tau_vs_n.png'}")
