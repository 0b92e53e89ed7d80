"""Prompt sets derived from the packaged corpora, for distillation data that is wide as well as large.

- ``code-tasks``: what people ask about code they already have -- explain, document, test, review, refactor,
  type, port to another language -- each over one real function of the Python standard library (the
  ``code`` corpus: 3 to 40 lines of source);
- ``prose-tasks``: what people ask about a text -- summarize, list the key points, ask questions, rewrite,
  continue, give a title -- over passages of the ``prose`` corpus (pydoc topics, Shakespeare) and over
  groups of English sentences from the ``translation`` corpus.

Each prompt inherits the split of the document it was cut from (``data.split_of``), so a held-out
document never gives a training prompt; the task for each passage is drawn with a seed fixed by the
passage, so the sets are the same on every machine.
"""

from __future__ import annotations

import ast
import hashlib
import random
import textwrap

from mtp.data import CorpusUnavailable, load_corpus, split_of, translation_pairs

PORT_TO = ("JavaScript", "TypeScript", "Go", "Rust", "Java", "C++", "C#", "Ruby", "Kotlin", "Swift")
CODE_TASKS = (
    "Explain what this Python function does:\n\n```python\n{code}\n```",
    "What does this code do? Explain it step by step.\n\n```python\n{code}\n```",
    "Add a docstring and comments to this function.\n\n```python\n{code}\n```",
    "Write unit tests with pytest for this function:\n\n```python\n{code}\n```",
    "Review this code. Are there bugs or edge cases it misses?\n\n```python\n{code}\n```",
    "Refactor this function to make it easier to read.\n\n```python\n{code}\n```",
    "Add type hints to this function.\n\n```python\n{code}\n```",
    "Rewrite this Python function in {lang}.\n\n```python\n{code}\n```",
    "How could I make this function faster or simpler?\n\n```python\n{code}\n```",
    "Give an example of how to call this function and what it returns.\n\n```python\n{code}\n```",
    "{code}\n\nWhat is this function for, and when would I use it?",
    "I found this in a codebase:\n\n```python\n{code}\n```\n\nCan you explain it to a beginner?",
    "Write a short description of `{name}` for the project's README.\n\n```python\n{code}\n```",
    "What is the time complexity of `{name}`?\n\n```python\n{code}\n```",
)
PROSE_TASKS = (
    "Summarize this text in a few sentences:\n\n{text}",
    "What are the key points of this passage?\n\n{text}",
    "Explain this passage in simple words:\n\n{text}",
    "Write three questions that test whether someone understood this text.\n\n{text}",
    "Give this text a short title and explain your choice.\n\n{text}",
    "Rewrite this text so that a twelve-year-old can understand it:\n\n{text}",
    "{text}\n\nSummarize the above in one paragraph.",
    "{text}\n\nWhat is the main idea here?",
    "Turn this text into a bulleted list of its main points:\n\n{text}",
    "Read this and tell me what I should remember from it:\n\n{text}",
)
SENTENCE_TASKS = (
    "Rewrite these sentences in a more formal style:\n\n{text}",
    "Correct any mistakes in these sentences:\n\n{text}",
    "Write a short story that uses these sentences:\n\n{text}",
    "Translate these sentences into German:\n\n{text}",
    "Translate these sentences into French:\n\n{text}",
    "Paraphrase each of these sentences:\n\n{text}",
    "Write a dialogue between two friends that includes these lines:\n\n{text}",
    "Which of these sentences sounds the most natural, and why?\n\n{text}",
)


def _rng(*parts: str) -> random.Random:
    """A random generator seeded by what it chooses for: the same choice on every machine and run."""
    return random.Random(int(hashlib.sha1("\0".join(parts).encode()).hexdigest()[:12], 16))


def code_task_prompts(split: str, min_lines: int = 3, max_lines: int = 40, max_chars: int = 1500) -> list[str]:
    """One request per public standard-library function of ``split``'s documents (3-40 lines of source)."""
    prompts = []
    for doc in load_corpus("code", split).documents:
        try:
            tree = ast.parse(doc.text)
        except SyntaxError:
            continue
        lines = doc.text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
                continue
            source = lines[node.lineno - 1: node.end_lineno]
            code = textwrap.dedent("\n".join(source))  # methods: dedented to the def line
            if min_lines <= len(source) <= max_lines and len(code) <= max_chars and code.startswith("def "):
                rng = _rng("code-tasks", doc.id, node.name, str(node.lineno))
                prompts.append(rng.choice(CODE_TASKS).format(code=code, name=node.name, lang=rng.choice(PORT_TO)))
    return prompts


def _passages(text: str, chars: int) -> list[str]:
    """Consecutive paragraphs joined into passages of about ``chars`` characters."""
    out, cur = [], ""
    for para in (" ".join(p.split()) for p in text.split("\n\n")):
        if not para:
            continue
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= chars:
            out.append(cur[: 2 * chars])
            cur = ""
    return out


def prose_task_prompts(split: str, per_play: int = 40) -> list[str]:
    """Requests about pydoc topic passages, Shakespeare passages (``split``'s documents) and groups of English
    example sentences (the translation pairs of ``split``)."""
    prompts = []
    try:
        docs = load_corpus("prose", split).documents
    except CorpusUnavailable:
        docs = []
    for doc in docs:
        if doc.id.startswith("shakespeare/"):
            lines = [line.strip() for line in doc.text.splitlines() if line.strip()]
            starts = range(300, max(300, len(lines) - 14), max(1, (len(lines) - 300) // per_play))
            passages = ["\n".join(lines[i:i + 12]) for i in starts][:per_play]
        else:
            passages = _passages(doc.text, 500)[:6]
        for i, text in enumerate(passages):
            prompts.append(_rng("prose-tasks", doc.id, str(i)).choice(PROSE_TASKS).format(text=text))
    try:
        english = [en for de, en in translation_pairs() if split_of("translation", de) == split]
    except CorpusUnavailable:
        english = []
    for i in range(0, len(english) - 4, 4):
        rng = _rng("sentence-tasks", english[i])
        group = english[i:i + rng.randint(2, 4)]
        prompts.append(rng.choice(SENTENCE_TASKS).format(text="\n".join(group)))
    return prompts
