"""``mtp engines setup llama.cpp|vllm`` and ``mtp engines status``."""

from __future__ import annotations

import shlex



def engines_command(cfg, command: str = "") -> None:
    """``mtp engines status`` or ``mtp engines setup ENGINE`` (:class:`~mtp.config.EnginesConfig`); prints as it goes."""
    from mtp.engines import llamacpp, vllm

    action, engine, jobs = cfg.action, cfg.engine, cfg.jobs

    if action == "status":
        server = llamacpp.binary()
        print(f"llama.cpp: {'built' if server.is_file() else 'not built'} ({server})"
              + ("" if server.is_file() else f"; {llamacpp.BUILD_HINT}"))
        py = vllm.python()
        print(f"vLLM: {'environment at ' + str(py.parent.parent) if py.is_file() else 'not set up'}"
              + ("" if py.is_file() else f"; {vllm.SETUP_HINT}"))
        return None
    if engine == "llama.cpp":
        done = llamacpp.setup(jobs)
        print(f"llama.cpp built in {done['total_seconds'] / 60:.1f} min (sources fetched in {done['fetch_seconds']:.0f} s): "
              f"{done['server']}")
        print("serve a model with exported EAGLE-3 heads (`mtp export --format gguf`):\n  "
              + shlex.join(llamacpp.serve_command("TARGET.gguf", "OUT/eagle3-draft.gguf")))
        return None
    done = vllm.setup()
    print(f"vLLM {done['vllm']} ({done['package']}) set up in {done['seconds'] / 60:.1f} min: {done['venv']}")
    print("serve a model with exported EAGLE-3 heads (`mtp export --format eagle3`):\n  "
          + shlex.join(vllm.serve_command("TARGET_HF_DIR", "OUT", method="eagle3")))
    return None
