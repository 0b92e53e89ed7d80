"""A step of B one-token rows (each its own sequence, P cached tokens each) through mtp's bindings, median of 27.
Run: python batch_rows.py KIND B P (KIND a --target of qwen2.5-coder-0.5b: packaged, q4_0, bf16, ...)."""
import time, statistics, sys
from mtp.engines.llamacpp_lib import LlamaContext
from mtp.engines.targets import target_gguf
f = target_gguf("qwen2.5-coder-0.5b", sys.argv[1])
B = int(sys.argv[2]); P = int(sys.argv[3])
ctx = LlamaContext(f, n_ctx=B * (P + 200), n_seq=2 * B, threads=2)
for s in range(B):
    toks = [(100 + 7 * i + s) % 5000 + 10 for i in range(P)]
    for st in range(0, P, 256):
        part = toks[st:st + 256]
        ctx.decode(part, list(range(st, st + len(part))), [s] * len(part), [False] * (len(part) - 1) + [True])
ts = []
for step in range(30):
    t0 = time.perf_counter()
    ctx.decode([11 + step] * B, [P + step] * B, list(range(B)))
    ts.append(time.perf_counter() - t0)
print(sys.argv[1:], "B", B, "P", P, "median ms", round(statistics.median(ts[3:]) * 1e3, 1))
