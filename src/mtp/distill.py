"""Self-distillation data: the backbone's own responses to a prompt set (Medusa, arXiv 2401.10774, §3.3).

Heads that learn the model's own continuations are what speculative decoding needs: at decoding time
the heads must guess what the backbone will say, not what a dataset says. Prompts get the chat template
of chat models; generation is batched (left padding) and greedy unless a temperature is given. Each line of
the output .jsonl holds ``prompt``, ``response``, ``text`` (what the model saw and said) and
``response_start`` (a character offset): training uses only response tokens as targets. Lines are
appended as they are made, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mtp.errors import UserError
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


def distill(model_name: str, prompt_sources: list[str], out: str | Path, *, limit: int | None = None,
            max_new_tokens: int = 256, batch_size: int = 8, temperature: float = 0.0, seed: int = 0,
            device: str = "cpu", dtype: str = "float32", progress: bool = True) -> dict:
    """Generate the backbone's responses for the train split of each prompt source into ``out`` (.jsonl)."""
    from mtp.backbones import load_backbone, resolve_backbone

    if max_new_tokens < 1 or batch_size < 1 or temperature < 0 or (limit is not None and limit < 1):
        raise UserError("--max-new-tokens, --batch-size and --limit must be >= 1 and --temperature >= 0")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists: choose another --out (a finished distillation is never overwritten)")
    resolve_backbone(model_name)
    prompts = [p for source in prompt_sources for p in load_prompts(source, "train", limit, seed)]
    partial = out.with_name(out.name + ".partial")
    done = 0
    if partial.exists():  # continue an interrupted run: its lines are complete records
        done = sum(1 for line in partial.read_text().splitlines() if line.strip())
    model, tokenizer = load_backbone(model_name, dtype=dtype, device=device)
    torch.manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = prompts[done:]
    bar = tqdm(total=len(prompts), initial=done, desc="distill", unit="prompt", disable=not progress,
               file=sys.stderr)
    finished = 0
    with partial.open("a") as f:
        for a in range(0, len(todo), batch_size):
            batch = todo[a:a + batch_size]
            for prompt, (text, response, ok) in zip(batch, generate_batch(model, tokenizer, batch, max_new_tokens,
                                                                          temperature)):
                f.write(json.dumps({"prompt": prompt, "response": response, "text": text + response,
                                    "response_start": len(text), "finished": ok}) + "\n")
                finished += ok
            f.flush()
            bar.update(len(batch))
    bar.close()
    os.replace(partial, out)
    return {"out": str(out), "prompts": len(prompts), "finished_share": finished / max(1, len(todo))}
