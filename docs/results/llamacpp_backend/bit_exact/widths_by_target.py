import json, sys
from mtp.decode.executors.llamacpp import LlamaCppBackbone, exact_width, verify_curve
from pathlib import Path
files = {"packaged Q4_K_M": Path.home() / ".cache/mtp/gguf/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct.gguf",
         "q4_0": Path.home() / ".cache/mtp/engines/targets/qwen2.5-coder-0.5b-q4_0/model.gguf",
         "q8_0": Path.home() / ".cache/mtp/engines/targets/qwen2.5-coder-0.5b-q8_0/model.gguf"}
out = {}
for name, f in files.items():
    t = LlamaCppBackbone(f, None, n_ctx=2048, threads=2)
    w = exact_width(t)
    c = verify_curve(t, points=(1, 2, 3, 4, 6, 8, 16), repeats=5, warmup=1)
    t.close()
    out[name] = {"exact_width": w, "t1_ms": round(c[1] * 1e3, 2), "ratio": {k: round(v / c[1], 2) for k, v in c.items()}}
    print(name, json.dumps(out[name]), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
