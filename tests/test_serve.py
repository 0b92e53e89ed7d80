"""``mtp serve`` as clients meet it: a real server process on a free loopback port, a tiny random Llama with a
chat template and random MLP heads (tree decoding), queried with the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from mtp.serve.process import ServerProcess  # noqa: E402
from tests.conftest import char_tokenizer, tiny_model  # noqa: E402
from tests.test_decode import reference_greedy  # noqa: E402

KEY = "test-key-123"
TREE = "[[0],[1],[0,0],[0,0,0]]"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Llama folder (char tokenizer with a chat template) and random MLP heads for it."""
    from mtp.model.mtp import HeadsConfig, MTPModel

    root = tmp_path_factory.mktemp("serve")
    model_dir, heads_dir = root / "model", root / "heads"
    model = tiny_model("llama", vocab=128, dtype=torch.float32)
    model.save_pretrained(model_dir)
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model_dir)
    heads = MTPModel(model, HeadsConfig(backbone=str(model_dir), n_heads=3, kind="mlp"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in heads.heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    heads.save_pretrained(heads_dir)
    return model_dir, heads_dir


class Server(ServerProcess):
    def __init__(self, model_dir, heads_dir, *flags, env=None):
        super().__init__(["--model", str(model_dir), "--heads", str(heads_dir), "--method", "tree", "--tree", TREE,
                          "--max-tokens", "256", *flags], env=env, start_timeout=120)

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def post(self, path, body, key=KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(body, (dict, list)):
            return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kw)
        return httpx.post(self.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                          timeout=60, **kw)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text


@pytest.fixture(scope="module")
def server(served):
    s = Server(*served, env={"MTP_API_KEY": KEY})
    yield s
    code, err = s.stop()
    assert code == 0, err
    assert "Traceback" not in err, err


def reference(model_dir, ids: list[int], n: int) -> list[int]:
    """Plain greedy with a full forward per token, on the served folder's model (EOS is id 2)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return reference_greedy(model, ids, n, eos=2)


MESSAGES = [{"role": "user", "content": "def add(a, b):"}]


def test_openai_client_round_trip_streamed_or_not_is_plain_greedy(server, served):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [str(served[0])]
    r = client.chat.completions.create(model=str(served[0]), messages=MESSAGES, max_tokens=40, temperature=0)
    text = r.choices[0].message.content
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    ids = tok(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    ref = reference(served[0], ids, 40)
    assert text == tok.decode(ref, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)
    assert r.choices[0].finish_reason == ("stop" if ref[-1] == 2 else "length")
    stream = client.chat.completions.create(model=str(served[0]), messages=MESSAGES, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for c in stream:
        if c.choices and c.choices[0].delta.content:
            parts.append(c.choices[0].delta.content)
        usage = c.usage or usage
    assert "".join(parts) == text and usage.completion_tokens == len(ref)

    # text completions: the raw prompt (BOS added), streamed and not
    prompt_ids = tok("x = 1\ny =")["input_ids"]
    ref = reference(served[0], prompt_ids, 12)
    c = client.completions.create(model=str(served[0]), prompt="x = 1\ny =", max_tokens=12, temperature=0)
    assert c.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    streamed = "".join(x.choices[0].text for x in client.completions.create(
        model=str(served[0]), prompt="x = 1\ny =", max_tokens=12, temperature=0, stream=True))
    assert streamed == c.choices[0].text


def test_concurrent_requests_are_batched_and_each_is_its_own_greedy_answer(server, served):
    client = server.client()
    prompts = [f"def f{i}(x):" for i in range(6)]
    results = {}

    def ask(p):
        results[p] = client.completions.create(model=str(served[0]), prompt=p, max_tokens=24, temperature=0,
                                               seed=3).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tok = char_tokenizer()
    for p in prompts:
        assert results[p] == tok.decode(reference(served[0], tok(p)["input_ids"], 24), skip_special_tokens=True), p


def test_sampling_and_stop_strings(server, served):
    client = server.client()
    one = client.completions.create(model=str(served[0]), prompt="abc", max_tokens=1)  # ends as it joins
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"
    a = client.completions.create(model=str(served[0]), prompt="abc", max_tokens=30, temperature=1.0, top_p=0.9,
                                  seed=11).choices[0].text
    b = client.completions.create(model=str(served[0]), prompt="abc", max_tokens=30, temperature=1.0, top_p=0.9,
                                  seed=11).choices[0].text
    assert a == b  # a seed gives the same draw
    full = client.completions.create(model=str(served[0]), prompt="abc", max_tokens=30, temperature=0).choices[0]
    if len(full.text) >= 6:
        stop = full.text[3:5]
        cut = client.completions.create(model=str(served[0]), prompt="abc", max_tokens=30, temperature=0, stop=[stop])
        assert cut.choices[0].text == full.text[:full.text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
        streamed = "".join(x.choices[0].text for x in client.completions.create(
            model=str(served[0]), prompt="abc", max_tokens=30, temperature=0, stop=[stop], stream=True))
        assert streamed == cut.choices[0].text


def test_api_key_is_required_except_for_health(server, served):
    body = {"model": str(served[0]), "prompt": "a", "max_tokens": 2}
    assert server.post("/v1/completions", body, key=None).status_code == 401
    r = server.post("/v1/completions", body, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert server.post("/v1/completions", body).status_code == 200


BAD = [  # (body, status, the param the error names)
    (b"{not json", 400, None),
    (b"\xff\xfe", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "M", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),  # over 4300 digits
    (b'{"model": "M", "prompt": "a \\ud800 b"}', 400, None),  # a lone surrogate: no text
    (b'{"model": "M", "prompt": ' + b"[" * 100000 + b"}", 400, None),
    ({"prompt": "a"}, 400, "model"),
    ({"model": "M", "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    (b'{"model": "M", "prompt": "a", "temperature": 1e999}', 400, "temperature"),  # inf
    (b'{"model": "M", "prompt": "a", "top_p": NaN}', 400, "top_p"),
    ({"model": "M", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"model": "M", "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "M", "prompt": "a", "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ({"model": "M", "prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    ({"model": "M", "prompt": "a", "seed": 2 ** 70}, 400, "seed"),
    ({"model": "M", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "M", "prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"model": "M", "prompt": "a", "n": 2}, 400, "n"),
    ({"model": "M", "prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "M", "prompt": ""}, 400, "prompt"),
    ({"model": "M", "prompt": [1, 2, 999999]}, 400, "prompt"),
    ({"model": "M", "prompt": "a" * 5000}, 400, "prompt"),  # longer than --max-prompt-tokens
    ({"model": "nope", "prompt": "a"}, 404, "model"),
]
BAD_CHAT = [
    ({"model": "M", "messages": []}, 400, "messages"),
    ({"model": "M", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "M", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": "M", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "M", "messages": "hello"}, 400, "messages"),
]


def test_every_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, served):
    name = str(served[0])
    for path, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
        for body, status, param in cases:
            if isinstance(body, dict) and body.get("model") == "M":
                body = {**body, "model": name}
            elif isinstance(body, bytes):
                body = body.replace(b'"M"', json.dumps(name).encode())
            r = server.post(path, body)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert error["message"] and error["type"], r.text
            if param:
                assert error["param"] == param, (body, error)
    big = b'{"model": "x", "prompt": "' + b"a" * (2 << 20) + b'"}'
    assert server.post("/v1/completions", big).status_code == 413
    assert httpx.get(server.url + "/v1/nothing", timeout=10).status_code == 404
    assert httpx.get(server.url + "/v1/completions", timeout=10).status_code == 405
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=name, prompt="a", logprobs=3)
    ok = server.post("/v1/completions", {"model": name, "prompt": "a", "max_tokens": 3})
    assert ok.status_code == 200
    assert 'status="5' not in server.metrics()


def _until(check, what: str, limit: float = 20.0):
    """Poll ``check()`` until it gives a true value (returned), or fail naming ``what``."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    pytest.fail(f"waited {limit:g} s for {what}")


def test_rows_freed_by_clients_that_leave_are_taken_by_queued_requests_while_another_decodes(served):
    """--max-batch 3: a keeper and two leavers (one streamed, one not) fill every row with the same 480-token
    greedy answer (no EOS in it); two short requests then wait in the queue. The leavers' clients go away and
    the short requests are answered while the keeper is still decoding. Had a leaver's row not been freed, a
    short request could only start after that leaver's 480 tokens, which end no sooner than the keeper's (same
    tokens, started later). (Plain decoding: one token a step, so the keeper runs long enough to watch.)"""
    s = Server(*served, "--method", "plain", "--max-batch", "3", "--max-tokens", "480")
    name, auth = str(served[0]), {"Authorization": f"Bearer {KEY}"}
    long = {"model": name, "prompt": "q", "max_tokens": 480, "temperature": 0}
    try:
        health = lambda: httpx.get(s.url + "/health", timeout=10).json()  # noqa: E731
        before = {o: _outcome(s.metrics(), o) for o in ("ok", "cancelled")}
        keeper = {"started": threading.Event(), "done": threading.Event(), "chunks": [], "finish": None}

        def keep():
            with httpx.stream("POST", s.url + "/v1/completions", json={**long, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        keeper["done"].set()
                    elif line.startswith("data: "):
                        choice = json.loads(line[6:])["choices"][0]
                        keeper["chunks"].append(choice["text"])
                        keeper["finish"] = choice["finish_reason"] or keeper["finish"]
                        keeper["started"].set()

        keeper_thread = threading.Thread(target=keep)
        keeper_thread.start()
        assert keeper["started"].wait(30)
        with contextlib.ExitStack() as leavers:
            r = leavers.enter_context(httpx.stream("POST", s.url + "/v1/completions",
                                                   json={**long, "stream": True}, timeout=30, headers=auth))
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream at once
            next(lines)  # the streamed leaver decodes
            raw = json.dumps(long).encode()
            sock = leavers.enter_context(socket.create_connection(("127.0.0.1", s.port)))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
            _until(lambda: health()["running"] == 3, "the non-streamed leaver to take the last row")
            answers = {}

            def ask(p):
                answers[p] = s.post("/v1/completions", {"model": name, "prompt": p, "max_tokens": 4,
                                                        "temperature": 0}, key=None)

            askers = [threading.Thread(target=ask, args=(p,)) for p in ("a", "b")]
            for t in askers:
                t.start()
            _until(lambda: health() == {"status": "ok", "running": 3, "waiting": 2}, "the short requests to queue")
            assert not keeper["done"].is_set()
        # both leavers' clients are gone: their rows must go to the two waiting requests
        for t in askers:
            t.join(60)
        keeper_running = not keeper["done"].is_set()
        ok_now = _outcome(s.metrics(), "ok") - before["ok"]
        assert keeper_running and ok_now <= 2, ("the short requests were answered only after the keeper ended",
                                                ok_now)
        for p, a in answers.items():
            assert a.status_code == 200 and a.json()["usage"]["completion_tokens"] == 4, (p, a.text)
        keeper_thread.join(60)
        assert keeper["done"].is_set() and keeper["finish"] == "length" and len("".join(keeper["chunks"])) == 480
        _until(lambda: health()["running"] == 0, "the batch to empty")
        after = s.metrics()
        assert _outcome(after, "cancelled") - before["cancelled"] == 2  # the two leavers, and only them
        assert _outcome(after, "ok") - before["ok"] == 3  # the keeper and the two short requests
    finally:
        code, err = s.stop()
    assert code == 0 and "Traceback" not in err, err


def _outcome(metrics: str, outcome: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'mtp_requests_finished_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


def _samples(metrics: str) -> dict[tuple, float]:
    """Prometheus text -> {(sample name, (label, value), ...): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(metrics) for s in family.samples}


def test_metrics_count_the_requests_and_tokens_served(server, served):
    """Three requests of known sizes, one after the other, on an idle server: each counter moves by exactly
    what they were (requests, outcomes, prompt and generated tokens, decoding steps, histogram counts) and the
    gauges read an idle server."""
    idle = lambda: httpx.get(server.url + "/health", timeout=10).json() == {  # noqa: E731
        "status": "ok", "running": 0, "waiting": 0}
    _until(idle, "an idle server")
    before = _samples(server.metrics())
    client = server.client()
    sizes = {"q": 5, "k": 9, "w": 17}
    usages = []
    for prompt, n in sizes.items():
        r = client.completions.create(model=str(served[0]), prompt=prompt, max_tokens=n, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == n
        usages.append(r.usage)
    _until(idle, "the last row to leave")
    after = _samples(server.metrics())

    def delta(name, **labels):
        key = (name, *sorted(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    requests, prompt_tokens = len(sizes), sum(u.prompt_tokens for u in usages)
    assert prompt_tokens == 2 * requests  # BOS + one character each
    assert delta("mtp_http_requests_total", route="completions", status="200") == requests
    assert delta("mtp_requests_finished_total", outcome="ok") == requests
    assert sum(delta("mtp_requests_finished_total", outcome=o) for o in
               ("cancelled", "timeout", "time_limit", "shutting_down", "decoding_failed", "internal_error")) == 0
    assert delta("mtp_prompt_tokens_total") == prompt_tokens
    # every token the clients received (what usage counts); each request's first comes from its prefill
    assert delta("mtp_generation_tokens_total") == sum(u.completion_tokens for u in usages) == sum(sizes.values())
    steps = delta("mtp_verify_steps_total")
    assert delta("mtp_row_steps_total") == steps  # one request at a time: one row per step
    # each step emits 1 to 4 tokens (the tree is 3 deep), the last one of a request maybe fewer
    assert sum(-(-(n - 1) // 4) for n in sizes.values()) <= steps <= sum(n - 1 for n in sizes.values())
    assert delta("mtp_time_to_first_token_seconds_count") == requests
    assert delta("mtp_request_seconds_count") == requests
    assert after[("mtp_queue_depth",)] == 0 and after[("mtp_running_requests",)] == 0
    # idle: no tokens per second (not the last busy moment's); the acceptance length is the last window's
    assert 1.0 <= after[("mtp_acceptance_length",)] <= 4.0 and after[("mtp_tokens_per_second",)] == 0


def test_a_full_queue_answers_429(served):
    s = Server(*served, "--max-batch", "1", "--max-queue", "1")
    try:
        body = {"model": str(served[0]), "prompt": "w", "max_tokens": 256, "temperature": 1.0}
        for _ in range(3):  # 8 at once: one decodes, one waits, the rest are refused (unless all end at once)
            codes = []

            def ask():
                codes.append(s.post("/v1/completions", body, key=None).status_code)

            threads = [threading.Thread(target=ask) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert set(codes) <= {200, 429}, (codes, s.stderr()[-2000:])
            if 429 in codes:
                break
        assert 429 in codes and codes.count(200) >= 2, codes
        r = s.post("/v1/completions", body, key=None)
        assert r.status_code == 200
    finally:
        code, err = s.stop()
    assert code == 0 and "Traceback" not in err, err


def _slow_send(port: int, parts: list[bytes], gap: float, out: dict, key: str) -> None:
    """A slow-loris client: sends ``parts`` ``gap`` seconds apart; records what came back and when."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        try:
            for part in parts:
                c.sendall(part)
                time.sleep(gap)
        except OSError:  # the server closed the connection on us: what we want
            pass
        data = b""
        try:
            while chunk := c.recv(65536):
                data += chunk
        except OSError:
            pass
    out[key] = (data, time.monotonic() - start)


def test_slow_clients_are_cut_off_and_connections_capped_while_others_are_served(served):
    """Header lines or body bytes dribbled every 0.5 s: after --read-timeout (1.5 s) a 408 and a closed
    connection, not an open one for as long as the client likes; beyond --max-connections a 503 at once; a
    normal request is answered meanwhile."""
    s = Server(*served, "--read-timeout", "1.5", "--max-connections", "6")
    try:
        out = {}
        head = [b"POST /v1/completions HTTP/1.1\r\n", b"Host: x\r\n"] + [b"X-Slow: 1\r\n"] * 40
        body = json.dumps({"model": str(served[0]), "prompt": "a", "max_tokens": 4}).encode()
        slow_body = [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body)] + [body[i:i + 1] for i in range(len(body))]
        clients = [threading.Thread(target=_slow_send, args=(s.port, head, 0.5, out, f"head{i}")) for i in range(2)]
        clients += [threading.Thread(target=_slow_send, args=(s.port, slow_body, 0.5, out, f"body{i}"))
                    for i in range(3)]
        for t in clients:
            t.start()
        time.sleep(0.3)
        r = s.post("/v1/completions", {"model": str(served[0]), "prompt": "ab", "max_tokens": 4}, key=None)
        assert r.status_code == 200  # served while five slow clients hold connections
        extra = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(2)]
        try:
            extra[-1].settimeout(10)
            over = extra[-1].recv(4096)  # the seventh connection: refused without a request
        finally:
            for c in extra:
                c.close()
        for t in clients:
            t.join(60)
        assert not any(t.is_alive() for t in clients)
        assert over.startswith(b"HTTP/1.1 503") and b"too_many_connections" in over, over[:200]
        for key, (data, seconds) in out.items():
            assert data.startswith(b"HTTP/1.1 408"), (key, data[:200])
            assert b"request_timeout" in data and seconds < 10, (key, seconds)
        assert s.post("/v1/completions", {"model": str(served[0]), "prompt": "ab", "max_tokens": 4},
                      key=None).status_code == 200
    finally:
        code, err = s.stop()
    assert code == 0 and "Traceback" not in err, err


def test_bench_serves_soak_answers_every_class_as_it_should(served):
    """bench serve's soak against a real server: valid requests (some at a field's edge: temperature 1e-300,
    5e-324, top_p 1e-300, ...) all answered, every bad class (numbers out of range included) a 4xx, the slow-loris
    client cut off with a 408 within --read-timeout, no 5xx."""
    import asyncio

    from mtp.bench.serve import BAD_KINDS, EXTREME, _soak

    s = Server(*served, "--read-timeout", "1", "--max-body-bytes", "4096", "--max-prompt-tokens", "64")
    try:
        soak = asyncio.run(_soak(s.url, str(served[0]), ["ab", "hello", "x y"], 3, 6.0, 4, 0.3, 4096, 64, 0, 1.0))
    finally:
        code, err = s.stop()
    assert code == 0 and "Traceback" not in err, err
    assert soak["server_errors_5xx"] == 0 and not soak["connection_failures"], soak
    assert soak["valid_completed"] == soak["valid"] > 0
    assert soak["extreme_completed"] == soak["extreme"] >= len(EXTREME), soak["extreme_by_kind"]
    assert set(soak["extreme_by_kind"]) == set(EXTREME)
    assert soak["bad_answered_4xx"] == soak["bad"] >= len(BAD_KINDS), soak["bad_by_kind"]
    assert soak["slow_clients"] >= 2 and soak["slow_cut_408"] == soak["slow_clients"], soak
    assert soak["slow_seconds_max"] < 4


def test_sigterm_ends_streams_with_an_event_and_exits_cleanly(served):
    """SIGTERM drains: the socket stays open while requests are in flight (/health answers 503 "shutting down",
    a new request 503 shutting_down), each stream ends with [DONE] or an error event, then the server exits 0."""
    s = Server(*served, "--shutdown-timeout", "1.5", "--max-batch", "1")
    body = {"model": str(served[0]), "prompt": "s", "max_tokens": 256, "temperature": 1.0, "stream": True}
    events = []

    def read():
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # signal once the server holds all three (a fixed wait raced a fast server:
        h = httpx.get(s.url + "/health", timeout=5).json()  # streams could end, or not yet be sent, before it)
        if h["running"] + h["waiting"] + events.count("[DONE]") >= 3:
            break
        time.sleep(0.005)
    s.proc.send_signal(signal.SIGTERM)
    health = httpx.get(s.url + "/health", timeout=5)  # one row at a time: three long streams are still going
    refused = httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=5)
    for t in readers:
        t.join(30)
    code, err = s.stop()
    assert code == 0 and "Traceback" not in err, err
    assert (health.status_code, health.json()) == (503, {"status": "shutting down"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert not any(t.is_alive() for t in readers)
    # each stream ended with [DONE] (finished in time) or with an error object
    ends = [e for e in events if e == "[DONE]" or '"error"' in e]
    assert len(ends) == 3, events[-5:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(s.url + "/health", timeout=2)


def test_bad_flags_and_a_taken_port_fail_in_one_line(served, tmp_path):
    from mtp.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "mtp", "serve", "--model", str(served[0]), "--method", "plain",
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("mtp: error: cannot listen on")
    assert Path(served[0]).is_dir()


def test_text_stream_holds_back_what_may_become_a_stop_string_and_cuts_it():
    from mtp.serve.protocol import TextStream, final_text

    tok = char_tokenizer(add_bos=False)
    ids = tok("hello END world")["input_ids"]
    stream = TextStream(tok, ["END"])
    sent = [stream.push([t]) for t in ids]
    assert "".join(sent) == "hello "
    assert sent[ids.index(tok("E")["input_ids"][0])] == ""  # "E" might start "END": held back
    assert final_text(tok, ids, ["END"]) == "hello "
    assert final_text(tok, ids, []) == "hello END world"
    s2 = TextStream(tok, ["ENDX"])  # a prefix that does not become the stop string is sent at the end
    assert "".join(s2.push([t]) for t in tok("ab EN")["input_ids"]) == "ab "
    assert s2.push([], final=True) == "EN"


def test_text_stream_detokenizes_incrementally_to_the_whole_texts_decode():
    """Pushed in chunks of any size, a real tokenizer's tokens stream to exactly the text one decode of all of them
    gives (split multi-byte characters, special tokens, spaces), cut at the first stop string."""
    import random

    from mtp.backbones import load_tokenizer, local_model_folder
    from mtp.serve.protocol import TextStream

    tok = load_tokenizer(local_model_folder("smollm2-135m"))
    texts = ["def f(x):\n    return x  +  1\n\n\nprint(f(2))", "Grüße aus Köln – naïve café 日本語 🤖🎉 ok",
             "  leading spaces, trailing  ", "a<|im_end|>b STOP c"]
    rng = random.Random(0)
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = ids + [rng.randrange(tok.vocab_size) for _ in range(40)]  # and arbitrary tokens (bytes, specials)
        whole = tok.decode(ids, skip_special_tokens=True)
        for stop in ([], ["STOP"], ["\n\n"]):
            cut = min([whole.find(s) for s in stop if s in whole] or [len(whole)])
            for _ in range(3):
                stream, out, k = TextStream(tok, stop), [], 0
                while k < len(ids):
                    n = rng.choice([1, 1, 1, 2, 3, 8])
                    out.append(stream.push(ids[k:k + n]))
                    k += n
                out.append(stream.push([], final=True))
                assert "".join(out) == whole[:cut], (text, stop)


def test_request_fields_are_parsed_into_typed_values():
    from mtp.serve.protocol import ApiError, Limits, parse

    lim = Limits(max_tokens=100, default_temperature=0.0)
    p = parse({"model": "m", "prompt": "hi", "stop": "x", "seed": 5, "n": 1, "presence_penalty": 0, "user": "u"},
              "completion", lim)
    assert (p.max_tokens, p.stop, p.seed, p.temperature, p.top_p) == (16, ["x"], 5, 0.0, 1.0)
    p = parse({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]}],
               "max_completion_tokens": 7, "top_k": -1}, "chat", lim)
    assert p.messages == [{"role": "system", "content": "a"}] and p.max_tokens == 7 and p.top_k == 0
    for body, param in (({"model": "m", "prompt": "a", "echo": "no"}, "echo"),
                        ({"model": "m", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1,
                          "max_completion_tokens": 1}, "max_completion_tokens"),
                        ({"model": "m", "prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
                        ({"model": "m", "prompt": "a", "response_format": {"type": "json_object"}}, "response_format")):
        kind = "chat" if "messages" in body else "completion"
        with pytest.raises(ApiError) as e:
            parse(body, kind, lim)
        assert e.value.status == 400 and e.value.param == param


def test_port_0_announces_the_port_the_system_chose(served):
    """``--port 0``: the announcement names the port that was bound, and the server answers there."""
    import re

    proc = subprocess.Popen([sys.executable, "-m", "mtp", "serve", "--model", str(served[0]), "--method", "plain",
                             "--max-tokens", "256", "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    try:
        deadline, port = time.monotonic() + 120, None
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "mtp serve exited"
            found = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
            port = int(found.group(1)) if found else None
        assert port and port != 0
        for _ in range(100):  # uvicorn starts serving on it just after the announcement
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)
