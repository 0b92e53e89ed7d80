"""Serving engines run by mtp: process handling (time-outs, crashes), the benchmark's arithmetic, missing
engines; and, where llama.cpp is built and the real model is here, the exported heads inside llama-server."""

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from mtp.cli import main
from mtp.engines import llamacpp
from mtp.bench.engine import _median_rows, _summarize
from mtp.errors import UserError


def rows(lengths, seconds, accepted=None):
    return [{"tokens": list(range(n)), "gen_seconds": s, "accepted": a}
            for n, s, a in zip(lengths, seconds, accepted or [None] * len(lengths))]


def test_summary_figures_are_consistent():
    plain = rows([100, 50, 80], [2.0, 1.0, 2.0])
    fast = rows([100, 50, 80], [1.0, 0.25, 1.6], accepted=[50, 30, 16])
    fast[2]["tokens"] = list(range(1, 81))  # one output differs from plain
    s = _summarize("eagle3", fast, plain)
    p = _summarize("plain", plain, None)
    assert s["tokens"] == 230 and p["tokens_per_s"] == pytest.approx(230 / 5.0, rel=1e-3)
    assert s["tokens_per_s"] == pytest.approx(230 / 2.85, rel=1e-3)
    # speedup: the median of per-prompt rate ratios (2.0, 4.0, 1.25); the ratio of totals beside it
    assert s["speedup"] == pytest.approx(2.0) and s["speedup_of_totals"] == pytest.approx((230 / 2.85) / 46, rel=1e-3)
    # tokens per target forward: generated / (generated - accepted drafts)
    assert s["acceptance_length"] == pytest.approx(230 / (230 - 96), rel=1e-3)
    assert s["identical_share"] == pytest.approx(2 / 3, abs=1e-3)
    assert "speedup" not in p and "acceptance_length" not in p


def test_summary_of_totals_is_the_ratio_of_the_reported_rates():
    plain = rows([100, 50, 80], [2.0, 1.0, 2.0])
    fast = rows([30, 70, 80], [0.5, 1.0, 0.3], accepted=[10, 40, 0])
    s, p = _summarize("x", fast, plain), _summarize("plain", plain, None)
    assert s["speedup_of_totals"] == pytest.approx(s["tokens_per_s"] / p["tokens_per_s"], rel=1e-3)
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["gen_seconds"], rel=1e-3)
    assert s["speedup"] == pytest.approx(1.4)  # the median of 60/50, 70/50 and 266.7/40
    assert s["acceptance_length"] == pytest.approx(180 / (180 - 50), rel=1e-3)


def test_mtp_rows_in_the_engine_benchmark_are_lossless_and_consistent(tiny_folder, tmp_path, monkeypatch):
    """mtp's own engine in ``bench engine``: every method's output is its plain loop's, token for token;
    acceptance length = tokens / backbone forwards; the speedup of totals the ratio of the reported rates."""
    from types import SimpleNamespace

    import mtp.decode.run as run
    from mtp.backbones import load_backbone
    from mtp.bench.engine import run_mtp
    from mtp.decode.engine import SpeculativeDecoder
    from mtp.model.mtp import HeadsConfig, MTPModel

    monkeypatch.setattr(run, "cached_verify_cost", lambda name, backbone: {k: 1.0 for k in (1, 2, 4, 8, 16)})
    backbone, _ = load_backbone(str(tiny_folder))
    MTPModel(backbone, HeadsConfig(backbone=str(tiny_folder), n_heads=2, kind="mlp")).save_pretrained(tmp_path / "h")
    forwards = []
    real_generate = SpeculativeDecoder.generate

    def counting_generate(self, *a, **k):
        out = real_generate(self, *a, **k)
        forwards.append(out.rows[0].steps)
        return out

    monkeypatch.setattr(SpeculativeDecoder, "generate", counting_generate)
    cfg = SimpleNamespace(model=str(tiny_folder), heads=str(tmp_path / "h"), mtp_heads=None, mtp_backend="torch",
                          mtp_dtype="float32", target="packaged", threads=None,
                          mtp_methods=["blockwise", "tree", "tree-guarded"], max_new_tokens=12)
    prompts = [[1, 5, 9, 13, 5, 9], [1, 30, 31]]
    results = run_mtp(cfg, prompts)
    assert [r["name"] for r in results] == ["mtp plain", "mtp blockwise", "mtp tree", "mtp tree-guarded"]
    plain = results[0]
    for i, r in enumerate(results):
        steps = forwards[i * 3 + 1: i * 3 + 3]  # the warm-up run first, then one per prompt
        assert r["tokens"] == plain["tokens"] and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["gen_seconds"],
                                                                                      rel=1e-3)
        if i:
            assert r["identical_share"] == 1.0
            assert r["acceptance_length"] == pytest.approx(r["tokens"] / sum(steps), rel=1e-3)
            assert r["speedup_of_totals"] == pytest.approx(r["tokens_per_s"] / plain["tokens_per_s"], rel=1e-2)


def test_median_rows_keeps_each_prompts_median_round():
    runs = [rows([10, 10], [1.0, 5.0]), rows([10, 10], [3.0, 1.0]), rows([10, 10], [2.0, 2.0])]
    assert [r["gen_seconds"] for r in _median_rows(runs)] == [2.0, 2.0]


def fake_server(tmp_path, body: str):
    script = tmp_path / "fake_server.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_server_that_exits_while_starting_is_reported(tmp_path):
    cmd = fake_server(tmp_path, "import sys\nprint('error: cannot load model')\nsys.exit(3)\n")
    with pytest.raises(UserError, match="exited with status 3.*cannot load model"):
        llamacpp.Server(cmd, llamacpp.free_port(), tmp_path / "log.txt", start_timeout=30)


def test_server_that_never_becomes_ready_times_out(tmp_path):
    cmd = fake_server(tmp_path, "import time\ntime.sleep(600)\n")
    server_log = tmp_path / "log.txt"
    with pytest.raises(UserError, match="did not become ready within 2 s"):
        llamacpp.Server(cmd, llamacpp.free_port(), server_log, start_timeout=2)


def test_server_that_crashes_mid_run_is_reported(tmp_path):
    port = llamacpp.free_port()
    cmd = fake_server(tmp_path, f"""
        import http.server, os
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
            def do_POST(self):
                print("segfault in decode", flush=True); os._exit(139)
            def log_message(self, *a):
                pass
        http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
    """)
    with llamacpp.Server(cmd, port, tmp_path / "log.txt", start_timeout=30) as srv:
        with pytest.raises(UserError, match="crashed.*segfault in decode"):
            srv.complete([1, 2, 3], 4, timeout=10)
    assert srv.proc.poll() is not None  # stopped, nothing left running


def _crashing_at_load_server(tmp_path, port, log_line):
    """A fake llama-server: with --no-repack it serves; without, it logs ``log_line`` and dies of SIGSEGV."""
    return fake_server(tmp_path, f"""
        import http.server, os, signal, sys
        if "--no-repack" not in sys.argv:
            print({log_line!r}, flush=True); os.kill(os.getpid(), signal.SIGSEGV)
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
            def log_message(self, *a):
                pass
        http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
    """)


def test_server_that_crashes_in_amx_kernels_at_load_is_retried_without_repacking(tmp_path, capsys):
    """The AMX crash of issue 23: one retry with --no-repack, said in one line, the crash log kept."""
    port = llamacpp.free_port()
    cmd = _crashing_at_load_server(tmp_path, port, "load_tensors:          AMX model buffer size =   120.00 MiB")
    with llamacpp.Server(cmd, port, tmp_path / "log.txt", start_timeout=30) as srv:
        assert srv.cmd[-1] == "--no-repack" and "SIGSEGV with the weights in AMX buffers" in srv.fallback
    err = capsys.readouterr().err
    assert err.count("retrying with --no-repack") == 1 and "mtp engines setup llama.cpp" in err
    assert "AMX model buffer" in (tmp_path / "log.crashed.txt").read_text()


def test_server_crash_without_extra_buffers_is_not_retried(tmp_path):
    """A fault with no repacked weights in the log is some other bug: reported in one line with its log."""
    port = llamacpp.free_port()
    cmd = _crashing_at_load_server(tmp_path, port, "llama_model_load: error somewhere else")
    with pytest.raises(UserError, match=r"exited with status -11 while starting: llama_model_load: error "
                                        r"somewhere else \(log: .*log.txt\)"):
        llamacpp.Server(cmd, port, tmp_path / "log.txt", start_timeout=30)


@pytest.mark.parametrize("engine, env, hint", [
    ("llama.cpp", "MTP_LLAMA_CPP_DIR", "mtp engines setup llama.cpp"),
    ("vllm", "MTP_VLLM_PYTHON", "mtp engines setup vllm"),
])
def test_missing_engine_names_the_command_that_builds_it(tiny_folder, tmp_path, capsys, monkeypatch, engine, env,
                                                         hint):
    from mtp.backbones import load_backbone
    from mtp.model.mtp import HeadsConfig, MTPModel

    backbone, _ = load_backbone(str(tiny_folder))
    MTPModel(backbone, HeadsConfig(backbone=str(tiny_folder), n_heads=2, kind="eagle3")).save_pretrained(tmp_path / "h")
    monkeypatch.setenv(env, str(tmp_path / "nothing" / "python"))
    capsys.readouterr()
    code = main(["bench", "engine", "--engine", engine, "--model", str(tiny_folder), "--heads", str(tmp_path / "h"),
                 "--prompts", str(write_prompts(tmp_path)), "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and hint in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()


def write_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "def add(a, b):"}) + "\n")
    return path


@pytest.mark.parametrize("flags, message", [
    (["--engine", "sglang"], "unknown --engine"),
    (["--draft-len", "0"], "--draft-len must be"),
    (["--limit", "-3"], "--limit must be"),
    (["--p-min", "1.5"], "--p-min"),
    (["--target", "q2"], "unknown --target"),
    (["--ngram-modes", "magic"], "n-gram mode"),
    (["--mtp-methods", "early-exit"], "--mtp-methods"),
    (["--timeout", "nan"], "--timeout"),
    (["--draft-vocab", "10"], "--draft-vocab"),
])
def test_bench_engine_bad_flags(capsys, flags, message):
    code = main(["bench", "engine", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the real engine, when built


# CI builds llama.cpp before the suite and sets MTP_REQUIRE_LLAMA_CPP=1: there a missing build fails, never skips
needs_llama = pytest.mark.skipif(os.environ.get("MTP_REQUIRE_LLAMA_CPP") != "1"
                                 and (not llamacpp.binary().is_file() or bool(llamacpp.converter_missing())),
                                 reason="llama.cpp is not built here, or its converter's imports are missing "
                                        "(mtp engines setup llama.cpp)")


@pytest.mark.real
@needs_llama
def test_llamacpp_loads_exported_eagle3_heads_and_keeps_its_output(tmp_path):
    """smollm2-135m's packaged GGUF in llama-server with our eagle3 heads exported by llama.cpp's converter:
    the draft loads, drafts, and the output is llama.cpp's own plain greedy output."""
    from mtp.backbones import load_backbone
    from mtp.config import ExportConfig
    from mtp.decode.run import encode_prompt
    from mtp.engines.targets import target_gguf
    from mtp.export.run import export
    from mtp.model.mtp import HeadsConfig, MTPModel

    backbone, tokenizer = load_backbone("smollm2-135m")
    import torch

    heads = MTPModel(backbone, HeadsConfig(backbone="smollm2-135m", n_heads=3, kind="eagle3"))
    heads.token_counts = torch.randint(0, 1000, (backbone.config.vocab_size,), generator=torch.Generator().manual_seed(0))
    heads.save_pretrained(tmp_path / "h")
    export(ExportConfig(heads=str(tmp_path / "h"), format="gguf", out=str(tmp_path / "g"), model="smollm2-135m"))
    # a quantized draft (llama.cpp's own quantizer) loads and drafts too
    export(ExportConfig(heads=str(tmp_path / "h"), format="gguf", out=str(tmp_path / "q"), model="smollm2-135m",
                        gguf_type="q4_0"))
    assert [p.name for p in (tmp_path / "q").iterdir()] == ["eagle3-draft.gguf"]
    # a draft vocabulary cut to its 1024 most frequent tokens loads and drafts too
    export(ExportConfig(heads=str(tmp_path / "h"), format="gguf", out=str(tmp_path / "v"), model="smollm2-135m",
                        draft_vocab=1024))
    # the same heads export to the same bytes (the measured llama.cpp costs are cached by the draft's content)
    export(ExportConfig(heads=str(tmp_path / "h"), format="gguf", out=str(tmp_path / "g2"), model="smollm2-135m"))
    assert (tmp_path / "g2" / "eagle3-draft.gguf").read_bytes() == (tmp_path / "g" / "eagle3-draft.gguf").read_bytes()
    size = {d: (tmp_path / d / "eagle3-draft.gguf").stat().st_size for d in "gq"}
    assert size["q"] < 0.6 * size["g"]  # its lm_head stays Q8_0: llama-quantize's rule for 576-wide rows
    ids = encode_prompt(tokenizer, "Write a Python function that reverses a string.")
    target = target_gguf("smollm2-135m")
    outs = {}
    for name, extra in (("plain", []),
                        ("eagle3", ["--spec-type", "draft-eagle3", "-md", str(tmp_path / "g" / "eagle3-draft.gguf")]),
                        ("eagle3-q4_0", ["--spec-type", "draft-eagle3", "-md",
                                         str(tmp_path / "q" / "eagle3-draft.gguf")]),
                        ("eagle3-v1024", ["--spec-type", "draft-eagle3", "-md",
                                          str(tmp_path / "v" / "eagle3-draft.gguf")])):
        port = llamacpp.free_port()
        cmd = [str(llamacpp.binary()), "-m", str(target), "--port", str(port), "-t", "2", "-np", "1", *extra]
        with llamacpp.Server(cmd, port, tmp_path / f"{name}.log", start_timeout=300) as srv:
            res = srv.complete(ids, 24, return_tokens=True)
        assert srv.fallback is None  # served with its repacked / AMX kernels, no crash at load
        outs[name] = res
    for name in ("eagle3", "eagle3-q4_0", "eagle3-v1024"):
        assert outs[name]["tokens"] == outs["plain"]["tokens"]
        assert outs[name]["timings"].get("draft_n", 0) > 0  # it drafted


@pytest.mark.real
@needs_llama
def test_distill_through_llamacpp_streams_prompts_and_follow_ups(tmp_path):
    """distill --engine llama.cpp: one worker per slot, records in prompt order, each follow-up right after the
    first turn it continues; the q8_0 target is converted once and answers like the packaged file."""
    import json

    from mtp.config import DistillConfig
    from mtp.training.distill import distill

    prompts = tmp_path / "p.jsonl"
    asks = ["Say hello.", "What is 2 + 2?", "Name a colour.", "Say goodbye.", "What is the capital of France?"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in asks))
    out = tmp_path / "d.jsonl"
    summary = distill(DistillConfig(model="smollm2-135m", prompts=[str(prompts)], out=str(out), engine="llama.cpp",
                                    target="q8_0", batch_size=3, max_new_tokens=48, follow_ups=1.0, quiet=True))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    firsts = [r for r in rows if "follow_up" not in r]
    assert sorted(r["prompt"] for r in firsts) == sorted(asks) and summary["records"] == len(rows)
    for before, row in zip(rows, rows[1:]):
        if "follow_up" in row:
            assert before["prompt"] == row["prompt"] and before["finished"]
            assert before["response"].split("<|im_end|>")[0] in row["text"][:row["response_start"]]
    assert any("follow_up" in r for r in rows) and summary["tokens_per_s"] > 0


def test_converter_needs_match_the_engines_extra():
    """setup installs CONVERTER_NEEDS; pip users get the `engines` extra: the two lists are one."""
    import tomllib

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert list(llamacpp.CONVERTER_NEEDS) == extras["engines"]
    assert "mtp[engines]" in extras["test"]


def test_a_prompt_llama_server_refuses_is_named_with_its_reason(tmp_path):
    """A prompt longer than llama-server's context is one line naming the prompt and llama-server's own reason
    (its token count against the context), not "failed on a request (HTTP Error 400 ...)"."""
    import http.server
    import threading

    answer = {"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it",
                        "type": "exceed_context_size_error", "n_prompt_tokens": 5000, "n_ctx": 4096}}

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps(answer).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server = object.__new__(llamacpp.Server)  # the client side only: no llama-server process behind it
    server.url, server.log = f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path / "log"
    try:
        with pytest.raises(UserError) as e:
            server.complete("word " * 5000, 16)
    finally:
        httpd.shutdown()
    message = str(e.value)
    assert "\n" not in message and message.startswith("llama-server refused the prompt 'word word")
    assert "exceeds the available context size" in message and "5000 tokens, its context 4096" in message
