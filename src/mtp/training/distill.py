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
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from mtp.backbones import backbone_config, check_context, load_backbone, resolve_backbone
from mtp.config import DistillConfig
from mtp.engines import llamacpp
from mtp.engines.targets import target_gguf
from mtp.errors import UserError
from mtp.io import check_new_output, complete_lines
from mtp.prompts import chat_format, load_prompts


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 0.0):
    """Responses of the model to ``prompts`` (each a text or a conversation, a list of chat messages):
    list of (formatted prompt, response text, finished)."""
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

    def __init__(self, model_name: str, tokenizer, slots: int, threads: int | None = None, target: str = "packaged"):
        # ``threads``: llama.cpp's compute threads (default: every core); its threads spin, so give it the cores
        # that nothing else uses. ``target``: which GGUF of the model (mtp.engines.targets.target_gguf)
        self.tokenizer, self.slots = tokenizer, slots
        port = llamacpp.free_port()
        cmd = [str(llamacpp.require_server()), "-m", str(target_gguf(model_name, target)), "--host", "127.0.0.1",
               "--port", str(port), "-np", str(slots), "-c", str(4096 * slots), "--no-webui",
               "-t", str(threads or os.cpu_count() or 2)]
        self.log = Path(tempfile.mkstemp(prefix="mtp-distill-llama-", suffix=".log")[1])
        self.server = llamacpp.Server(cmd, port, self.log)

    def __call__(self, prompts: list, max_new_tokens: int, temperature: float = 0.0):
        """Answers to ``prompts``, one request each, as they are given (the caller runs ``slots`` calls at once;
        the slot that served a conversation's first turn still holds it in its cache for the second)."""
        texts = [chat_format(self.tokenizer, p) for p in prompts]
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        ids = [self.tokenizer(t, add_special_tokens=not templated)["input_ids"] for t in texts]
        params = {"return_tokens": True, "cache_prompt": True}
        if temperature > 0:
            params.update(temperature=temperature, top_k=0)
        answers = [self.server.complete(p, max_new_tokens, **params) for p in ids]
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


FOLLOW_UPS = (
    "Can you give me an example?", "Can you make that shorter?", "Explain that in simpler words.", "Why?",
    "Can you summarize that in one sentence?", "What are the limitations of this?",
    "Can you say more about the first point?", "Thanks! Can you put that into a table?",
    "Now write it as a bulleted list.", "How would you explain this to a child?",
    "What is a common mistake people make here?", "Can you give me three more ideas?",
    "Is there another way to do it?", "What should I do next?", "Can you rewrite it in a more formal tone?",
    "Translate your answer into French.", "That doesn't look right. Can you check it again?",
    "Great, thanks. Where can I learn more about this?", "Can you make it longer and more detailed?",
    "What's the main takeaway?", "Give me a quiz question about this.", "Can you continue?", "Are you sure?",
    "How is this different from what most people think?", "OK. And what about the opposite case?",
)
CODE_FOLLOW_UPS = (
    "Can you add comments to the code?", "Write tests for this.", "How can I make it faster?",
    "Can you do the same in JavaScript?", "What if the input is empty?", "Explain the code line by line.",
    "Can you add error handling?", "What is the time complexity?", "Can you rewrite it without a loop?",
    "It gives me an error. What could be wrong?", "Can you make it a class instead?", "Add type hints, please.",
    "Show me how to call it with an example.", "Now write the same in Go.",
)


def follow_up(prompt: str, answer: str, share: float) -> str | None:
    """The user's second turn after ``answer``, for a seeded ``share`` of the prompts (None for the others): a
    follow-up about code where the answer holds code, a general one otherwise."""
    rng = random.Random(int(hashlib.sha1(f"follow-up\0{prompt}".encode()).hexdigest()[:12], 16))
    if rng.random() >= share:
        return None
    return rng.choice(CODE_FOLLOW_UPS if "```" in answer or "def " in answer else FOLLOW_UPS)


def resume_partial(partial: Path, prompts: list[str]) -> list[dict]:
    """The first-turn records an interrupted run left in ``partial``, after cutting it to its last complete record
    (a kill mid-write leaves a cut-off line, which the next record would be glued onto). They must answer the
    first prompts of this run, in order: a partial file of other prompts is refused, and left as it is.
    Second-turn records (``follow_up``) ride along with the record before them."""
    records = []

    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return False  # cut off: it and anything after it go
        if isinstance(record, dict) and "follow_up" in record and records:
            return True
        i = len(records)
        if not isinstance(record, dict) or i >= len(prompts) or record.get("prompt") != prompts[i]:
            raise UserError(f"{partial} (an interrupted run) answers other prompts than this one (record {i + 1}): "
                            "run with the same --prompts, --limit, --split and --seed, or delete it")
        records.append(record)
        return True

    complete_lines(partial, keep)
    return records


def normalized(prompt: str) -> str:
    """What makes two prompts the same request: case and whitespace aside."""
    return " ".join(prompt.lower().split())


def gather_prompts(sources: list[str], split: str, limit: int | None, seed: int) -> list[tuple[str, str]]:
    """(source, prompt) pairs: each source's seeded sample, duplicates across and within sources dropped (the
    first source keeps a prompt), then interleaved evenly, so that every prefix of a run holds each source in
    its share (an interrupted or truncated run is still a mix)."""
    seen, per_source = set(), []
    for source in sources:
        kept = []
        for p in load_prompts(source, split, limit, seed):
            key = normalized(p)
            if key not in seen:
                seen.add(key)
                kept.append(p)
        per_source.append((source, kept))
    keyed = [((i + 0.5) / len(kept), j, source, p) for j, (source, kept) in enumerate(per_source)
             for i, p in enumerate(kept)]
    return [(source, p) for _, _, source, p in sorted(keyed, key=lambda x: x[:2])]


def _answer(gen, tokenizer, batch: list[tuple[str, str]], max_new_tokens: int, temperature: float,
            follow_ups: float) -> list[list[dict]]:
    """For each (source, prompt) of ``batch``, its records: the answer, and, for the chosen share of the finished
    ones, the answer to a follow-up question in the same conversation (the second answer is that record's only
    target)."""
    answers = gen([p for _, p in batch], max_new_tokens, temperature)
    questions = {}  # index in batch -> the user's second turn
    for i, ((_, prompt), (_, response, ok)) in enumerate(zip(batch, answers)):
        question = follow_up(prompt, response, follow_ups) if ok else None
        if question is not None:
            questions[i] = question
    talks = [[{"role": "user", "content": batch[i][1]},
              {"role": "assistant", "content": _answer_only(tokenizer, answers[i][1])},
              {"role": "user", "content": q}] for i, q in questions.items()]
    second = dict(zip(questions, gen(talks, max_new_tokens, temperature) if talks else []))

    def record(prompt, source, text, response, ok, **extra):
        n = len(tokenizer(response, add_special_tokens=False)["input_ids"])
        return {"prompt": prompt, "response": response, "text": text + response, "response_start": len(text),
                "finished": ok, "source": source, "response_tokens": n, **extra}

    out = []
    for i, ((source, prompt), answer) in enumerate(zip(batch, answers)):
        rows = [record(prompt, source, *answer)]
        if i in second:
            rows.append(record(prompt, source, *second[i], follow_up=questions[i]))
        out.append(rows)
    return out


def _answer_only(tokenizer, response: str) -> str:
    """A finished response without its EOS text: the assistant turn a follow-up's conversation quotes."""
    eos = tokenizer.eos_token or ""
    return response[: -len(eos)] if eos and response.endswith(eos) else response


def distill(cfg: DistillConfig, command: str = "") -> dict:
    """Generate the backbone's responses for the ``cfg.split`` split of each prompt source into ``cfg.out``
    (.jsonl). ``cfg.engine``: ``transformers`` (batched ``generate``) or ``llama.cpp`` (llama-server on the
    model's GGUF, ``batch_size`` parallel slots; several times faster on a CPU). With ``cfg.follow_ups``, that
    share of the finished answers gets a second user turn and a second answer (its own record, whose target is
    the second answer only)."""
    model_name, prompt_sources, out = cfg.model, cfg.prompts, cfg.out
    max_new_tokens, batch_size, temperature, engine = cfg.max_new_tokens, cfg.batch_size, cfg.temperature, cfg.engine
    progress = not cfg.quiet

    out = Path(out)
    check_new_output(out, "--out", overwrite=cfg.overwrite, inputs=[p for p in prompt_sources if Path(p).exists()])
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a FILE.jsonl")
    resolve_backbone(model_name)
    check_context(max_new_tokens * (2 if cfg.follow_ups else 1), "--max-new-tokens", backbone_config(model_name))
    pairs = gather_prompts(prompt_sources, cfg.split, cfg.limit, cfg.seed)
    prompts = [p for _, p in pairs]
    partial = out.with_name(out.name + ".partial")
    done = len(resume_partial(partial, prompts))
    model, tokenizer = load_backbone(model_name, dtype=cfg.dtype, device=cfg.device)
    if engine == "llama.cpp":
        generate = LlamaCppGenerator(model_name, tokenizer, batch_size, threads=cfg.threads, target=cfg.target)
        del model
    else:
        generate = contextlib.nullcontext(lambda batch, n, temp: generate_batch(model, tokenizer, batch, n, temp))
    torch.manual_seed(cfg.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = pairs[done:]
    bar = tqdm(total=len(prompts), initial=done, desc="distill", unit="prompt", disable=not progress,
               file=sys.stderr)
    finished = tokens = records = 0
    start = time.perf_counter()
    # Not mtp.io.atomic_file: OUT.partial is a log that grows record by record (complete lines survive an
    # interruption and are resumed from); it becomes OUT in one rename once every prompt is done.
    with partial.open("a") as f, generate as gen:
        def turns(batch):
            return _answer(gen, tokenizer, batch, max_new_tokens, temperature, cfg.follow_ups)

        if engine == "llama.cpp":  # every slot busy all the time: one worker per slot, each prompt with its turns
            pool = ThreadPoolExecutor(batch_size)
            results = pool.map(lambda item: turns([item])[0], todo)
        else:
            pool = None
            results = (rows for a in range(0, len(todo), batch_size) for rows in turns(todo[a:a + batch_size]))
        try:
            for i, rows in enumerate(results, 1):
                for row in rows:
                    f.write(json.dumps(row) + "\n")
                    tokens += row["response_tokens"]
                finished, records = finished + rows[0]["finished"], records + len(rows)
                bar.update(1)
                if i % batch_size == 0:
                    f.flush()
                    bar.set_postfix({"tok/s": f"{tokens / (time.perf_counter() - start):.0f}"})
        finally:  # interrupted: the prompts not yet sent are dropped, the server stops
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    os.replace(partial, out)
    seconds_total = time.perf_counter() - start
    return {"out": str(out), "prompts": len(prompts), "records": records, "response_tokens": tokens,
            "seconds": round(seconds_total, 1), "tokens_per_s": round(tokens / max(seconds_total, 1e-9), 1),
            "finished_share": finished / max(1, len(todo))}


# ----------------------------------------------------------------------------- the command (mtp.cli's table)


def show_distill(summary: dict) -> str:
    return (f"distilled {summary['prompts']} prompts ({summary['records']} answers, {summary['response_tokens']} "
            f"tokens, {summary['tokens_per_s']:.0f} tokens/s) into {summary['out']} "
            f"({summary['finished_share']:.0%} ended with EOS)")
