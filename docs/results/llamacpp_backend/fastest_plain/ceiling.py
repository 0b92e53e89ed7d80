"""The speedup drafting could reach over the fastest plain configuration of qwen2.5-coder-0.5b, from the measured
verify curves (bit_exact/qwen_widths_by_target.json, qwen_f16_bf16_curves.json: r(k) = t(k) / t(1) through mtp's
bindings) and llama-server's plain speed per GGUF (zen4_plain_by_target.json): if every verify of k tokens were
accepted whole and drafts cost nothing, a GGUF would make k / (t(1) * r(k)) tokens per ms, against the fastest
plain file's 1 / t_fast(1). Run from the repository root: python docs/results/llamacpp_backend/fastest_plain/ceiling.py"""
import json
from pathlib import Path

here = Path(__file__).parent
curves = json.load(open(here.parent / "bit_exact" / "qwen_widths_by_target.json"))
curves = {{"packaged Q4_K_M": "packaged"}.get(k, k): v for k, v in curves.items()}
curves.update(json.load(open(here / "qwen_f16_bf16_curves.json")))
plain = json.load(open(here / "zen4_plain_by_target.json"))["ms_per_token_median"]
fast = min(plain, key=plain.get)
points = (2, 3, 4, 6, 8, 16)

print(f"fastest plain: {fast} ({plain[fast]:.2f} ms/token, llama-server)\n")
print("| GGUF | llama-server plain ms/token | vs fastest plain | exact width | "
      + " | ".join(f"k = {k} accepted" for k in points) + " |")
print("|---|---:|---:|---:|" + "---:|" * len(points))
for kind, c in curves.items():
    t1 = plain[kind]  # llama-server's own per-token time for this file
    cells = [f"{k / c['ratio'][str(k)] * plain[fast] / t1:.2f}x" for k in points]
    print(f"| {kind} | {t1:.2f} | {plain[fast] / t1:.2f}x | {c['exact_width']} | " + " | ".join(cells) + " |")
