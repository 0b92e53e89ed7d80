"""llama-server's plain greedy decoding of qwen2.5-coder-0.5b in every GGUF a user could pick, side by side:
the same code requests, rounds alternating the files, per-prompt medians of predicted_per_token_ms.
Run: python plain_by_target.py ROUNDS LIMIT OUT.json (2 threads, 128 new tokens, the model's chat template)."""
import json, statistics, sys
from pathlib import Path
from mtp.decode.run import encode_prompt
from mtp.engines import llamacpp
from mtp.engines.targets import target_gguf
from mtp.machine import cpu_signature
from mtp.prompts import load_prompts
from transformers import AutoTokenizer
from mtp.backbones import local_model_folder

ROUNDS, LIMIT, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
KINDS = ["packaged", "q4_0", "q8_0", "bf16", "f16"]
tok = AutoTokenizer.from_pretrained(local_model_folder("qwen2.5-coder-0.5b"))
prompts = load_prompts("docs/results/llamacpp_cpu/outside_code_prompts.jsonl", "eval", LIMIT, 0)
ids = [encode_prompt(tok, p, chat=True) for p in prompts]
server = llamacpp.require_server()
ms = {k: [[] for _ in ids] for k in KINDS}
for r in range(ROUNDS):
    for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
        port = llamacpp.free_port()
        cmd = [str(server), "-m", str(target_gguf("qwen2.5-coder-0.5b", kind)), "--host", "127.0.0.1", "--port",
               str(port), "-c", "4096", "-t", "2", "-np", "1", "--no-webui"]
        with llamacpp.Server(cmd, port, Path("/tmp/plain_by_target.log"), 300) as s:
            s.complete(ids[0], 8, timeout=300)
            for i, p in enumerate(ids):
                ms[kind][i].append(s.complete(p, 128, timeout=300)["timings"]["predicted_per_token_ms"])
        print("round", r, kind, round(statistics.median(v[-1] for v in ms[kind]), 2), flush=True)
med = {k: statistics.median(statistics.median(v) for v in ms[k]) for k in KINDS}
out = {"cpu": cpu_signature(), "threads": 2, "rounds": ROUNDS, "prompts": len(ids), "max_new_tokens": 128,
       "ms_per_token_median": {k: round(v, 2) for k, v in med.items()},
       "tokens_per_s": {k: round(1000 / v, 1) for k, v in med.items()}}
print(json.dumps(out, indent=1))
json.dump(out, open(OUT, "w"), indent=1)
