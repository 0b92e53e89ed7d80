"""llama.cpp's verify curve t(k)/t(1) measured two ways on this machine, side by side: through mtp's in-process
bindings (what --backend llama.cpp sizes its drafts from: ``mtp.decode.executors.llamacpp.verify_curve``) and through
llama-server (``mtp.engines.policy.measure_verify``: k new tokens after a cached prefix, its own prompt_ms).
If the two agree, the steep curve is llama.cpp's kernels on this CPU, not mtp's bindings.

    python docs/results/llamacpp_backend/curves.py [MODEL ...] > curves.json      # alone on the machine
"""

import json
import sys
import tempfile
from pathlib import Path

from mtp.backbones import backbone_config
from mtp.decode.executors.llamacpp import LlamaCppBackbone, verify_curve
from mtp.engines import llamacpp, policy
from mtp.engines.targets import target_gguf
from mtp.machine import cpu_signature

POINTS = (1, 2, 3, 4, 6, 8, 12, 16)


def main(models):
    out = {"cpu": cpu_signature(), "threads": 2, "points": POINTS, "models": {}}
    for name in models:
        gguf = target_gguf(name, "packaged")
        target = LlamaCppBackbone(gguf, backbone_config(name), n_ctx=2048, threads=2)
        try:
            mine = verify_curve(target, context=300, points=POINTS, repeats=7)
        finally:
            target.close()
        port = llamacpp.free_port()
        cmd = [str(llamacpp.require_server()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-np", "1", "-c", "2048", "-t", "2", "--no-webui"]
        log = Path(tempfile.mkstemp(suffix=".log")[1])
        with llamacpp.Server(cmd, port, log) as srv:
            prefix = [100 + (37 * i) % 5000 for i in range(300)]
            pool = [200 + (53 * i) % 7000 for i in range(4000)]
            server = policy.measure_verify(srv, prefix, pool, points=POINTS, repeats=7)
        out["models"][name] = {
            "gguf": gguf.name,
            "bindings_ms": {k: round(v * 1e3, 2) for k, v in mine.items()},
            "server_ms": {k: round(v * 1e3, 2) for k, v in server.items()},
            "bindings_ratio": {k: round(v / mine[1], 2) for k, v in mine.items()},
            "server_ratio": {k: round(v / server[1], 2) for k, v in server.items()},
        }
        print(name, json.dumps(out["models"][name]), file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:] or ["smollm2-135m", "qwen2.5-coder-0.5b"])
