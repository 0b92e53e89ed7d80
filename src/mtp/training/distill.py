"""Self-distillation data: the backbone's own responses to a prompt set (Medusa, arXiv 2401.10774, §3.3).

Heads that learn the model's own continuations are what speculative decoding needs: at decoding time
the heads must guess what the backbone will say, not what a dataset says. Prompts get the chat template
of chat models; generation is batched (left padding) and greedy unless a temperature is given. Each line of
the output .jsonl holds ``prompt``, ``response``, ``text`` (what the model saw and said) and
``response_start`` (a character offset): training uses only response tokens as targets. Lines are
appended as they are made, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from mtp.config import DistillConfig
from mtp.errors import UserError
from mtp.io import check_new_output, complete_lines
from mtp.prompts import chat_format, load_prompts


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0):
    """Responses of the model to ``prompts``: list of (formatted prompt, response text, finished)."""
    texts = [chat_format(tokenizer, p) for p in prompts]
    templated = bool(getattr(tokenizer, "chat_template", None))
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    finally:
        tokenizer.padding_side = side
    enc = {k: v.to(model.device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                         temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    results = []
    for i, text in enumerate(texts):
        new = out[i, enc["input_ids"].shape[1]:].tolist()
        finished = tokenizer.eos_token_id in new
        if finished:
            new = new[: new.index(tokenizer.eos_token_id) + 1]  # keep the EOS: the heads must learn to stop
        results.append((text, tokenizer.decode(new, skip_special_tokens=False), finished))
    return results


class LlamaCppGenerator:
    """Responses from llama-server on the model's GGUF (the packaged quantized file: the model llama.cpp users
    run), ``slots`` requests at a time (continuous batching). A context manager: the server always stops."""

    def __init__(self, model_name: str, tokenizer, slots: int, threads: int | None = None):
        from mtp.engines import llamacpp
        from mtp.engines.targets import target_gguf

        self.tokenizer, self.slots = tokenizer, slots
        port = llamacpp.free_port()
        cmd = [str(llamacpp.require_server()), "-m", str(target_gguf(model_name)), "--host", "127.0.0.1",
               "--port", str(port), "-np", str(slots), "-c", str(4096 * slots), "--no-webui",
               "-t", str(threads or os.cpu_count() or 2)]
        self.log = Path(tempfile.mkstemp(prefix="mtp-distill-llama-", suffix=".log")[1])
        self.server = llamacpp.Server(cmd, port, self.log)

    def __call__(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0):
        from concurrent.futures import ThreadPoolExecutor

        texts = [chat_format(self.tokenizer, p) for p in prompts]
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        ids = [self.tokenizer(t, add_special_tokens=not templated)["input_ids"] for t in texts]
        params = {"return_tokens": True} if temperature == 0 else {"temperature": temperature, "top_k": 0}
        with ThreadPoolExecutor(self.slots) as pool:
            answers = list(pool.map(lambda p: self.server.complete(p, max_new_tokens, **params), ids))
        eos = self.tokenizer.eos_token_id
        results = []
        for text, ans in zip(texts, answers):
            new = list(ans.get("tokens", []))
            finished = ans.get("stop_type") == "eos" or eos in new
            if finished and eos not in new:
                new.append(eos)  # keep the EOS: the heads must learn to stop
            results.append((text, self.tokenizer.decode(new, skip_special_tokens=False), finished))
        return results

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.stop()
        self.log.unlink(missing_ok=True)


def resume_partial(partial: Path, prompts: list[str]) -> list[dict]:
    """The records an interrupted run left in ``partial``, after cutting it to its last complete record (a kill
    mid-write leaves a cut-off line, which the next record would be glued onto). They must answer the first
    prompts of this run, in order: a partial file of other prompts is refused, and left as it is."""
    records = []

    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return False  # cut off: it and anything after it go
        i = len(records)
        if not isinstance(record, dict) or i >= len(prompts) or record.get("prompt") != prompts[i]:
            raise UserError(f"{partial} (an interrupted run) answers other prompts than this one (record {i + 1}): "
                            "run with the same --prompts, --limit and --seed, or delete it")
        records.append(record)
        return True

    complete_lines(partial, keep)
    return records


def distill(cfg: DistillConfig, command: str = "") -> dict:
    """Generate the backbone's responses for the train split of each prompt source into ``cfg.out`` (.jsonl).
    ``cfg.engine``: ``transformers`` (batched ``generate``) or ``llama.cpp`` (llama-server on the model's GGUF,
    ``batch_size`` parallel slots; several times faster on a CPU)."""
    from mtp.backbones import backbone_config, check_context, load_backbone, resolve_backbone

    model_name, prompt_sources, out, limit, seed = cfg.model, cfg.prompts, cfg.out, cfg.limit, cfg.seed
    max_new_tokens, batch_size, temperature, engine = cfg.max_new_tokens, cfg.batch_size, cfg.temperature, cfg.engine
    device, dtype, progress = cfg.device, cfg.dtype, not cfg.quiet

    out = Path(out)
    check_new_output(out, "--out", overwrite=cfg.overwrite, inputs=[p for p in prompt_sources if Path(p).exists()])
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a FILE.jsonl")
    resolve_backbone(model_name)
    check_context(max_new_tokens, "--max-new-tokens", backbone_config(model_name))
    prompts = [p for source in prompt_sources for p in load_prompts(source, "train", limit, seed)]
    partial = out.with_name(out.name + ".partial")
    done = len(resume_partial(partial, prompts))
    model, tokenizer = load_backbone(model_name, dtype=dtype, device=device)
    if engine == "llama.cpp":
        generate = LlamaCppGenerator(model_name, tokenizer, batch_size)
        del model
    else:
        generate = contextlib.nullcontext(lambda batch, n, temp: generate_batch(model, tokenizer, batch, n, temp))
    torch.manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = prompts[done:]
    bar = tqdm(total=len(prompts), initial=done, desc="distill", unit="prompt", disable=not progress,
               file=sys.stderr)
    finished = 0
    # Not mtp.io.atomic_file: OUT.partial is a log that grows record by record (complete lines survive an
    # interruption and are resumed from); it becomes OUT in one rename once every prompt is done.
    with partial.open("a") as f, generate as gen:
        # llama.cpp keeps its slots busy across a chunk of 8 x slots prompts (continuous batching)
        chunk = batch_size * (8 if engine == "llama.cpp" else 1)
        for a in range(0, len(todo), chunk):
            batch = todo[a:a + chunk]
            for prompt, (text, response, ok) in zip(batch, gen(batch, max_new_tokens, temperature)):
                f.write(json.dumps({"prompt": prompt, "response": response, "text": text + response,
                                    "response_start": len(text), "finished": ok}) + "\n")
                finished += ok
            f.flush()
            bar.update(len(batch))
    bar.close()
    os.replace(partial, out)
    return {"out": str(out), "prompts": len(prompts), "finished_share": finished / max(1, len(todo))}
