"""Exact width and verify curve (through the bindings, 2 threads, k new tokens after a cached prefix, medians of 5)
of qwen2.5-coder-0.5b's GGUF files. Run: python widths_by_target.py OUT.json [KIND ...] (kinds of --target;
default: packaged q4_0 q8_0, written as qwen_widths_by_target.json; f16 bf16 as fastest_plain/qwen_f16_bf16_curves.json)."""
import json, sys
from mtp.decode.executors.llamacpp import LlamaCppBackbone, exact_width, verify_curve
from mtp.engines.targets import target_gguf

kinds = sys.argv[2:] or ["packaged", "q4_0", "q8_0"]
out = {}
for kind in kinds:
    name = "packaged Q4_K_M" if kind == "packaged" else kind
    t = LlamaCppBackbone(target_gguf("qwen2.5-coder-0.5b", kind), None, n_ctx=2048, threads=2)
    w = exact_width(t)
    c = verify_curve(t, points=(1, 2, 3, 4, 6, 8, 16), repeats=5, warmup=1)
    t.close()
    out[name] = {"exact_width": w, "t1_ms": round(c[1] * 1e3, 2), "ratio": {k: round(v / c[1], 2) for k, v in c.items()}}
    print(name, json.dumps(out[name]), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
