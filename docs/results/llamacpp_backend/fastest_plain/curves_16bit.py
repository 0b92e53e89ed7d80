"""Verify curve and exact width of qwen2.5-coder-0.5b's 16-bit conversions (bindings, 2 threads, k new tokens after
a cached prefix, medians of 5). Run: python curves_16bit.py OUT.json f16 bf16"""
import json, sys
from mtp.decode.executors.llamacpp import LlamaCppBackbone, exact_width, verify_curve
from mtp.engines.targets import target_gguf
out = {}
for kind in sys.argv[2:]:
    f = target_gguf("qwen2.5-coder-0.5b", kind)
    t = LlamaCppBackbone(f, None, n_ctx=2048, threads=2)
    w = exact_width(t)
    c = verify_curve(t, points=(1, 2, 3, 4, 6, 8, 16), repeats=5, warmup=1)
    t.close()
    out[kind] = {"exact_width": w, "t1_ms": round(c[1] * 1e3, 2), "ratio": {k: round(v / c[1], 2) for k, v in c.items()}}
    print(kind, json.dumps(out[kind]), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
