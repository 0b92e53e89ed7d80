"""``mtp engines setup llama.cpp|vllm`` and ``mtp engines status``."""

from __future__ import annotations

import shlex
from pathlib import Path



def engines_command(cfg, command: str = "") -> None:
    """``mtp engines status`` or ``mtp engines setup ENGINE`` (:class:`~mtp.config.EnginesConfig`); prints as it goes."""
    from mtp.engines import llamacpp, vllm

    action, engine, jobs = cfg.action, cfg.engine, cfg.jobs

    if action == "status":
        server, stamp = llamacpp.binary(), llamacpp.built_stamp()
        if not server.is_file():
            state = f"not built ({server}); {llamacpp.BUILD_HINT}"
        elif stamp != llamacpp.build_stamp():
            why = ("built for another CPU" if stamp and stamp.get("cpu") != llamacpp.cpu_signature()
                   else "built without mtp's current source fixes")
            state = f"{why} ({server}); rebuild with `mtp engines setup llama.cpp`"
        else:
            state = f"built for this CPU ({server})"
        print(f"llama.cpp: {state}")
        for line in measured_settings():
            print(f"  {line}")
        py = vllm.python()
        print(f"vLLM: {'environment at ' + str(py.parent.parent) if py.is_file() else 'not set up'}"
              + ("" if py.is_file() else f"; {vllm.SETUP_HINT}"))
        return None
    if engine == "llama.cpp":
        done = llamacpp.setup(jobs)
        if done["reused"]:
            print(f"llama.cpp already built for this CPU with mtp's fixes: {done['server']}")
        else:
            print(f"llama.cpp built in {done['total_seconds'] / 60:.1f} min (sources fetched in "
                  f"{done['fetch_seconds']:.0f} s): {done['server']}")
        print("serve a model with exported EAGLE-3 heads (`mtp export --format gguf`):\n  "
              + shlex.join(llamacpp.serve_command("TARGET.gguf", "OUT/eagle3-draft.gguf")))
        return None
    done = vllm.setup()
    print(f"vLLM {done['vllm']} ({done['package']}) set up in {done['seconds'] / 60:.1f} min: {done['venv']}")
    print("serve a model with exported EAGLE-3 heads (`mtp export --format eagle3`):\n  "
          + shlex.join(vllm.serve_command("TARGET_HF_DIR", "OUT", method="eagle3")))
    return None


def measured_settings() -> list[str]:
    """The draft settings chosen from costs measured on this CPU (`mtp bench engine`), one line per target and
    draft, with the llama-server flags they give."""
    import json

    from mtp.engines import llamacpp, policy
    from mtp.io import cache_dir

    lines = []
    for path in sorted(cache_dir("engines", "costs").glob("*.json")):
        try:
            data = json.loads(path.read_text())
            if data.get("cpu") != llamacpp.cpu_signature():
                continue
            choice = policy.choose(policy.Costs.from_dict(data["costs"]))
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            continue
        flags = " ".join(policy.flags(choice)) or "none: plain decoding is faster here"
        lines.append(f"measured here ({data.get('threads')} threads): {Path(data.get('target', '?')).name} + "
                     f"{data.get('draft', '?')}: {flags} (predicted {choice['predicted_speedup']:.2f}x)")
    return lines

