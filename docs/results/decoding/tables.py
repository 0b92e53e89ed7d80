"""Markdown tables of decoding.md from the `mtp bench decode` JSON files beside this script.

    python docs/results/decoding/tables.py chat_fp32 code_fp32 chat_bf16 ...

t(k)/t(1) is read off this machine's verify-cost curve (verify_cost.json, linear between measured k) at
each method's mean tokens per verify forward; the ceiling is tau * t(1) / t(k).
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZE_KEYS = ("nodes", "draft_len", "lookup_draft_len", "exit_layer", "draft_vocab")


def ratio_at(curve: dict, k: float) -> float:
    pts = sorted((int(a), float(b)) for a, b in curve.items())
    if k <= pts[0][0]:
        return pts[0][1]
    for (k0, r0), (k1, r1) in zip(pts, pts[1:]):
        if k <= k1:
            return r0 + (r1 - r0) * (k - k0) / (k1 - k0)
    return pts[-1][1]


def table(name: str) -> str:
    r = json.loads((HERE / f"{name}.json").read_text())
    curve = json.loads((HERE / "verify_cost.json").read_text())["curves"][r["dtype"]]["ratio"]
    lines = [f"**{r['prompts']}, {r['dtype']}{', batch ' + str(r['batch_size']) if r['batch_size'] > 1 else ''}** "
             f"([{name}.json](decoding/{name}.json)) — {r['n_prompts']} prompts, {r['max_new_tokens']} new tokens, "
             f"plain baseline {r['baseline_tokens_per_s']:.1f} tokens/s, {r['torch_threads']} threads", "",
             "| method | tokens/s | τ | tokens per verify forward k | t(k)/t(1) | ceiling τ·t(1)/t(k) | speedup | "
             "median per-prompt speedup | identical to transformers greedy | identical to our plain loop | sizes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m, v in r["methods"].items():
        k = v.get("verify_tokens_per_forward", 1.0)
        t = ratio_at(curve, k)
        c = v.get("config", {})
        sizes = ", ".join(f"{key} {c[key]}" for key in SIZE_KEYS if key in c)
        lines.append(f"| {m} | {v['tokens_per_s']:.1f} | {v['tau']:.2f} | {k:.1f} | {t:.2f} | {v['tau'] / t:.2f}× | "
                     f"{v['speedup']:.2f}× | {v.get('median_batch_speedup', 1.0):.2f}× | "
                     f"{100 * v['identical_share']:.0f}% | {100 * v.get('identical_to_plain_loop_share', 1.0):.0f}% | "
                     f"{sizes} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(n) for n in sys.argv[1:]))
