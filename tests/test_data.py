import json

import pytest
import torch

from mtp import data
from mtp.data import (Corpus, CorpusUnavailable, Document, load_corpus, make_windows, read_text_file, split_of,
                      tokenize_document, translation_pairs)
from mtp.errors import UserError
from tests.conftest import SAMPLE_TEXT, char_tokenizer

DING = """# Version :: test
Aal {m} | Aale {pl} :: eel | eels
Er hat ins Schwarze getroffen. :: He hit the mark.
Sag Bescheid, wenn du fertig bist! :: Tell me when you've finished.
Weit gefehlt.; Bei weitem nicht. :: Far from it.
Das kann ich nicht versprechen. :: I can give no such undertaking.
Der Kuchen ist mir nicht ganz gelungen. | Der Hund {m} bellt laut. :: The cake did not quite work out. | The dog barks.
"""


def test_split_is_stable_and_about_a_fifth():
    ids = [f"doc{i}" for i in range(2000)]
    splits = [split_of("code", i) for i in ids]
    assert splits == [split_of("code", i) for i in ids]
    assert 0.15 < splits.count("eval") / len(ids) < 0.25


def test_code_corpus_splits_are_disjoint():
    ev, tr = load_corpus("code", "eval"), load_corpus("code", "train")
    assert ev.documents and tr.documents
    assert not {d.id for d in ev.documents} & {d.id for d in tr.documents}
    assert all(d.id.endswith(".py") for d in ev.documents)


def test_translation_pairs_keep_example_sentences_only(tmp_path):
    path = tmp_path / "de-en"
    path.write_text(DING)
    pairs = translation_pairs(path)
    assert ("Er hat ins Schwarze getroffen.", "He hit the mark.") in pairs
    assert ("Der Kuchen ist mir nicht ganz gelungen.", "The cake did not quite work out.") in pairs
    assert all("{" not in de and "[" not in de for de, _ in pairs)  # dictionary markup dropped
    assert not any(de.startswith("Weit gefehlt") for de, _ in pairs)  # too short (3 words)


def test_translation_scores_only_the_english(tmp_path, monkeypatch):
    path = tmp_path / "de-en"
    path.write_text(DING)
    monkeypatch.setenv("MTP_TRANS_DE_EN", str(path))
    docs = load_corpus("translation", "all").documents
    tok = char_tokenizer()
    for doc in docs:
        ids, span_of = tokenize_document(doc, tok)
        scored = "".join(tok.decode([i]) for i, s in zip(ids, span_of) if s >= 0)
        english = "".join(doc.text[a:b] for a, b in doc.spans)
        assert scored == english


def test_translation_missing_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("MTP_TRANS_DE_EN", str(tmp_path / "nope"))
    with pytest.raises(CorpusUnavailable, match="trans-de-en"):
        load_corpus("translation")


def test_prose_without_shakespeare_falls_back_to_pydoc(monkeypatch, capsys):
    def unavailable():
        raise CorpusUnavailable("prose: offline")
    monkeypatch.setattr(data, "_shakespeare_dir", unavailable)
    docs = load_corpus("prose", "all").documents
    assert docs and all(d.id.startswith("pydoc/") for d in docs)
    assert "pydoc topics only" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    (b"", "empty or whitespace"),
    (b"  \n\t \n", "empty or whitespace"),
    (b"caf\xe9 au lait", "not UTF-8"),
])
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_corpus(str(path))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_text_file(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="directory"):
        read_text_file(tmp_path)


def test_unknown_corpus_name():
    with pytest.raises(UserError, match="unknown corpus"):
        load_corpus("poetry")


def test_jsonl_files(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "hello there"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert [d.text for d in load_corpus(str(good)).documents] == ["hello there", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        load_corpus(str(bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(UserError, match="line 1: expected an object"):
        load_corpus(str(nofield))


def test_a_utf8_byte_order_mark_is_ignored_in_every_text_and_json_input(tmp_path):
    """One policy for a leading UTF-8 BOM (what Windows editors write): dropped, in .jsonl and text files, JSON
    --config files, --tree files and request bodies alike; nowhere part of the text."""
    from mtp.cli import parse
    from mtp.io import parse_json
    from mtp.trees import read_tree

    bom = b"\xef\xbb\xbf"
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(bom + json.dumps({"text": "hello"}).encode() + b"\n")
    assert [d.text for d in load_corpus(str(jsonl)).documents] == ["hello"]
    txt = tmp_path / "bom.txt"
    txt.write_bytes(bom + b"plain text here")
    assert [d.text for d in load_corpus(str(txt)).documents] == ["plain text here"]
    cfg = tmp_path / "cfg.json"
    cfg.write_bytes(bom + b'{"max_new_tokens": 7}')
    assert parse(["generate", "hi", "--config", str(cfg)])[1].max_new_tokens == 7
    tree = tmp_path / "tree.json"
    tree.write_bytes(bom + b"[[0],[0,0]]")
    assert read_tree(str(tree)) == read_tree("[[0],[0,0]]")
    assert parse_json(bom + b'{"a": 1}', "body") == parse_json("\ufeff" + '{"a": 1}', "body") == {"a": 1}


@pytest.mark.parametrize("add_bos", [True, False])
def test_windows_respect_context_horizon_and_budget(add_bos):
    tok = char_tokenizer(add_bos)
    docs = [Document(f"d{i}", SAMPLE_TEXT * (i + 1)) for i in range(5)]
    windows = make_windows(Corpus("x", docs), tok, context=40, max_positions=100, per_window=7, horizon=3, seed=1)
    assert sum(len(w.positions) for w in windows) == 100
    assert len({w.doc_id for w in windows}) == 5  # round robin over documents
    for w in windows:
        assert (w.positions + 1 >= 40).all() and (w.positions + 3 < len(w.input_ids)).all()
        assert (w.input_ids[0].item() == tok.bos_token_id) == add_bos
        text = tok.decode(w.input_ids[1 if add_bos else 0:])
        assert text in SAMPLE_TEXT * 5  # contiguous text from one document


def test_windows_are_seeded():
    tok = char_tokenizer()
    docs = [Document(f"d{i}", SAMPLE_TEXT * 3) for i in range(6)]
    a = make_windows(Corpus("x", docs), tok, context=30, max_positions=50, per_window=5, horizon=2, seed=3)
    b = make_windows(Corpus("x", docs), tok, context=30, max_positions=50, per_window=5, horizon=2, seed=3)
    assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.positions, y.positions) for x, y in zip(a, b))


def test_text_shorter_than_context():
    tok = char_tokenizer()
    with pytest.raises(UserError, match="lower --context"):
        make_windows(Corpus("x", [Document("d", "short text")]), tok, context=64, max_positions=10, per_window=4,
                     horizon=2, seed=0)


def test_windows_with_left_context_see_the_document_start():
    """left=N: same scored positions, but each window reaches back (short documents: to their start)."""
    tok = char_tokenizer()
    docs = [Document(f"d{i}", SAMPLE_TEXT * 2) for i in range(3)]
    plain = make_windows(Corpus("x", docs), tok, context=10, max_positions=60, per_window=5, horizon=2, seed=0)
    full = make_windows(Corpus("x", docs), tok, context=10, max_positions=60, per_window=5, horizon=2, seed=0,
                        left=10_000)

    for w in full:
        doc = next(d for d in docs if d.id == w.doc_id)
        assert doc.text.startswith(tok.decode(w.input_ids[1:]))  # every window starts at its document's start
    assert sum(len(w.positions) for w in full) == 60
    # the scored tokens are the same ones, only with more text before them
    scored = lambda ws: sorted((w.doc_id, tok.decode(w.input_ids[1:p + 2])[-12:]) for w in ws
                               for p in w.positions.tolist())
    assert len(scored(plain)) == len(scored(full))
