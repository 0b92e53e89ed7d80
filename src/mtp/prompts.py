"""Prompt sets, offline: built from the same documents and splits as the corpora in ``data.py``.

- ``code``: "Write a Python function `name(args)` that ..." from standard-library functions with docstrings;
- ``chat``: explanations of Python topics (``pydoc_data.topics``) and summaries of Shakespeare passages;
- ``translation``: "Translate into English: ..." from the Ding example sentences;
- ``general``: everyday chat and code requests of many kinds (:mod:`mtp.general_prompts`), so that heads
  distilled on it serve ordinary requests, not only the narrow sets above;
- ``varied``: requests of varied length and style (terse queries, constraints on length, format and tone,
  long requests with context) over everyday and programming topics (:func:`mtp.general_prompts.varied_prompts`);
- ``code-tasks`` / ``prose-tasks``: requests about real code and text cut from the packaged corpora --
  explain, test, review, port a standard-library function; summarize, rewrite, question a passage
  (:mod:`mtp.derived_prompts`);
- ``code-prefix``: raw Python to be continued (no instruction, no chat template): the lines that open a
  top-level ``def`` / ``class`` in a standard-library file, about 400 characters, for models pretrained
  on code (``mtp pretrain``); use ``--no-chat`` with them.

The ``train`` split feeds self-distillation; the ``eval`` split is kept for decoding benchmarks, so a
prompt used to train heads is never used to measure them. A user file is a .jsonl with a ``prompt`` field.
"""

from __future__ import annotations

import ast
import functools
import random
from pathlib import Path

from mtp.data import CorpusUnavailable, jsonl_records, load_corpus, read_text_file, split_of, translation_pairs
from mtp.errors import UserError

PROMPT_SETS = ("chat", "code", "translation", "code-prefix", "general", "varied", "code-tasks", "prose-tasks")


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    end = text.find(". ")
    return (text[: end + 1] if end > 0 else text).rstrip()


def _code_prompts(split: str) -> list[str]:
    prompts = []
    for doc in load_corpus("code", split).documents:
        try:
            tree = ast.parse(doc.text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                docstring = ast.get_docstring(node)
                if docstring and 20 <= len(_first_sentence(docstring)) <= 200:
                    args = ast.unparse(node.args)
                    prompts.append(f"Write a Python function `{node.name}({args})`: {_first_sentence(docstring)}")
    return prompts


def _chat_prompts(split: str) -> list[str]:
    from pydoc_data.topics import topics

    prompts = [f"Explain Python's {name.replace('-', ' ')} with a short example." for name in sorted(topics)
               if split_of("prose", f"pydoc/{name}") == split]
    try:
        plays = [d for d in load_corpus("prose", split).documents if d.id.startswith("shakespeare/")]
    except CorpusUnavailable:
        plays = []
    for play in plays:
        lines = [line for line in play.text.splitlines() if line.strip()]
        for i in range(200, len(lines) - 12, 400):  # a passage every few hundred lines
            passage = "\n".join(lines[i:i + 12])
            prompts.append(f"Summarize this passage from Shakespeare in plain modern English:\n\n{passage}")
    return prompts


def _translation_prompts(split: str) -> list[str]:
    return [f"Translate into English: {de}" for de, _ in translation_pairs() if split_of("translation", de) == split]


def _code_prefix_prompts(split: str, chars: int = 400, per_file: int = 3) -> list[str]:
    prompts = []
    for doc in load_corpus("code", split).documents:
        lines = doc.text.splitlines(keepends=True)
        starts = [i for i, line in enumerate(lines) if line.startswith(("def ", "class "))]
        for i in starts[:: max(1, len(starts) // per_file)][:per_file]:
            text = ""
            for line in lines[i:]:
                if text and len(text) + len(line) > chars:
                    break
                text += line
            if len(text) >= chars // 2:
                prompts.append(text)
    return prompts


def _general(split: str) -> list[str]:
    from mtp.general_prompts import general_prompts

    return [p for p in general_prompts() if split_of("general", p) == split]


def _varied(split: str) -> list[str]:
    from mtp.general_prompts import varied_prompts

    return [p for p in varied_prompts() if split_of("varied", p) == split]


@functools.lru_cache(maxsize=None)
def _built(name: str, split: str) -> tuple[str, ...]:
    from mtp.derived_prompts import code_task_prompts, prose_task_prompts

    builders = {"chat": _chat_prompts, "code": _code_prompts, "translation": _translation_prompts,
                "code-prefix": _code_prefix_prompts, "general": _general, "varied": _varied,
                "code-tasks": code_task_prompts, "prose-tasks": prose_task_prompts}
    return tuple(builders[name](split))


def builtin_prompts(name: str, split: str) -> list[str]:
    """The prompts of a built-in set; the eval split drops any prompt that also occurs in the train split
    (the standard library repeats some functions across files)."""
    prompts = list(_built(name, split))
    if split == "eval":
        seen = set(_built(name, "train"))
        prompts = [p for p in prompts if p not in seen]
    if not prompts:
        raise UserError(f"prompt set {name!r} is empty on this machine")
    return prompts


def load_prompts(source: str, split: str = "train", limit: int | None = None, seed: int = 0) -> list[str]:
    """Prompts of a built-in set (its split), or from a .jsonl file with a "prompt" field; a seeded sample."""
    if source in PROMPT_SETS:
        prompts = builtin_prompts(source, split)
    else:
        path = Path(source)
        if path.suffix.lower() != ".jsonl" and not path.exists():
            raise UserError(f"unknown prompt set {source!r}: use {', '.join(PROMPT_SETS)} or a .jsonl file")
        prompts = []
        for n, obj in jsonl_records(read_text_file(path), source):
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise UserError(f"{source} line {n}: expected an object with a non-empty string field \"prompt\"")
            prompts.append(obj["prompt"])
        if not prompts:
            raise UserError(f"{source} has no prompts")
    rng = random.Random(seed)
    rng.shuffle(prompts)
    return prompts[:limit] if limit else prompts


def chat_format(tokenizer, prompt: str | list[dict]) -> str:
    """The prompt as the model sees it: its chat template with the assistant turn opened, if it has one.
    ``prompt``: a user message, or a whole conversation (chat messages, the last one the user's)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)
