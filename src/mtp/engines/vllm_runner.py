"""Run inside vLLM's own virtual environment (stdlib + vllm only; never imports mtp).

    python vllm_runner.py JOB.json OUT.json

JOB: {"name", "target" (HF folder), "prompts" (token-id lists), "max_tokens", "dtype", "enforce_eager",
"speculative" (None or vLLM's speculative_config), "max_model_len"}. Every prompt is decoded alone (batch 1),
greedily, after one warm-up request; OUT gets per prompt the output ids and wall seconds, and the engine's
own speculative-decoding counters (drafts, draft tokens, accepted tokens) over the timed requests.
"""

import json
import sys
import time


def counters(llm) -> dict:
    out = {}
    try:
        metrics = llm.get_metrics()
    except Exception:  # older engines: no metrics API
        return out
    for m in metrics:
        name = getattr(m, "name", "")
        if "spec_decode" not in name:
            continue
        value = getattr(m, "value", None)
        if value is None:
            values = getattr(m, "values", None) or []
            value = sum(values)
        out[name] = out.get(name, 0) + float(value)
    return out


def main(job_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    job = json.load(open(job_path))
    start = time.time()
    llm = LLM(model=job["target"], dtype=job.get("dtype", "bfloat16"), enforce_eager=job.get("enforce_eager", True),
              speculative_config=job.get("speculative"), max_model_len=job.get("max_model_len", 2048),
              disable_log_stats=False, seed=0,
              # on the CPU backend this is the share of host memory reserved for the KV cache
              gpu_memory_utilization=job.get("memory_share", 0.3))
    load_seconds = time.time() - start
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    before = counters(llm)
    rows = []
    for p in prompts:
        t0 = time.perf_counter()
        out = llm.generate([p], params, use_tqdm=False)[0].outputs[0]
        rows.append({"seconds": time.perf_counter() - t0, "tokens": list(out.token_ids),
                     "finish": out.finish_reason})
    after = counters(llm)
    spec = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    import vllm

    # runs in vLLM's environment without mtp (no mtp.io): the caller removes OUT first and reads it only after
    # this process exits with status 0, so a plain write is complete whenever it is read
    json.dump({"name": job["name"], "rows": rows, "spec_counters": spec, "load_seconds": load_seconds,
               "vllm": vllm.__version__}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
