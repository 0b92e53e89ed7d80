"""``mtp engines setup llama.cpp|vllm`` and ``mtp engines status``."""

from __future__ import annotations

import shlex

from mtp.errors import UserError


def engines_command(action: str, engine: str | None, jobs: int | None = None) -> int:
    from mtp.engines import llamacpp, vllm

    if action == "status":
        server = llamacpp.binary()
        print(f"llama.cpp: {'built' if server.is_file() else 'not built'} ({server})"
              + ("" if server.is_file() else f"; {llamacpp.BUILD_HINT}"))
        py = vllm.python()
        print(f"vLLM: {'environment at ' + str(py.parent.parent) if py.is_file() else 'not set up'}"
              + ("" if py.is_file() else f"; {vllm.SETUP_HINT}"))
        return 0
    if engine is None:
        raise UserError("say which engine to set up: llama.cpp or vllm")
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    if engine == "llama.cpp":
        done = llamacpp.setup(jobs)
        print(f"llama.cpp built in {done['total_seconds'] / 60:.1f} min (sources fetched in {done['fetch_seconds']:.0f} s): "
              f"{done['server']}")
        print("serve a model with exported EAGLE-3 heads (`mtp export --format gguf`):\n  "
              + shlex.join(llamacpp.serve_command("TARGET.gguf", "OUT/eagle3-draft.gguf")))
        return 0
    done = vllm.setup()
    print(f"vLLM {done['vllm']} ({done['package']}) set up in {done['seconds'] / 60:.1f} min: {done['venv']}")
    print("serve a model with exported EAGLE-3 heads (`mtp export --format eagle3`):\n  "
          + shlex.join(vllm.serve_command("TARGET_HF_DIR", "OUT", method="eagle3")))
    return 0
