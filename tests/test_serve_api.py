"""``mtp serve``'s handlers (``mtp.serve.app.Api``) in-process, through Starlette's test client: no process, no
port, a tiny random Llama decoded plainly. The real-server tests (tests/test_serve.py) keep what only a process
shows (the openai client, SIGTERM, a taken port)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from mtp.decode.engine import SpeculativeDecoder  # noqa: E402
from mtp.serve.app import Api, Metrics, Settings  # noqa: E402
from mtp.serve.protocol import Limits  # noqa: E402
from mtp.serve.scheduler import Scheduler  # noqa: E402
from tests.conftest import char_tokenizer, tiny_model  # noqa: E402
from tests.test_decode import reference_greedy  # noqa: E402

KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab=128, dtype=torch.float32)


def make_api(model, *, chat_template=True, max_tokens=64, max_body_bytes=1 << 16, max_queue=8):
    tok = char_tokenizer()
    if chat_template:
        tok.chat_template = TEMPLATE
    metrics = Metrics()
    scheduler = Scheduler(SpeculativeDecoder(model, tok), max_batch=2, max_queue=max_queue, metrics=metrics)
    settings = Settings(("tiny",), Limits(max_tokens=max_tokens, max_prompt_tokens=256, context=512), KEY,
                        max_body_bytes, 60.0, "mtp-plain", (2,))
    return Api(scheduler, tok, settings, metrics), tok


@pytest.fixture(scope="module")
def client(model):
    api, tok = make_api(model)
    with TestClient(api.app()) as c:  # the lifespan starts and stops the scheduler
        c.tok = tok
        yield c


def test_text_completion_is_plain_greedy_and_counts_usage(client, model):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x =", "max_tokens": 10, "temperature": 0},
                    headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    ids = client.tok("x =")["input_ids"]
    ref = reference_greedy(model, ids, 10, eos=2)
    assert body["choices"][0]["text"] == client.tok.decode(ref, skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref),
                             "total_tokens": len(ids) + len(ref)}
    assert body["system_fingerprint"] == "mtp-plain"


def test_chat_stream_is_server_sent_events_ending_in_done(client, model):
    messages = [{"role": "user", "content": "hi"}]
    with client.stream("POST", "/v1/chat/completions", headers=AUTH,
                       json={"model": "tiny", "messages": messages, "max_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    prompt = client.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ref = reference_greedy(model, client.tok(prompt, add_special_tokens=False)["input_ids"], 8, eos=2)
    assert text == client.tok.decode(ref, skip_special_tokens=True)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("request_kw,status,code", [
    (dict(headers={}), 401, "invalid_api_key"),
    (dict(headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key"),
    (dict(content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}), 400, "invalid_json"),
    (dict(json={"model": "tiny", "prompt": "x", "max_tokens": 10 ** 6}), 400, None),
    (dict(json={"model": "tiny", "prompt": "x", "temperature": -1}), 400, None),
    (dict(json={"model": "tiny"}), 400, None),
    # JSON booleans are not numbers, a count is an integer (Python's True == 1 == 1.0)
    (dict(json={"model": "tiny", "prompt": "x", "n": True}), 400, None),
    (dict(json={"model": "tiny", "prompt": "x", "n": 1.0}), 400, None),
    (dict(json={"model": "tiny", "prompt": "x", "presence_penalty": False}), 400, None),
    (dict(content=b"[" + b" " * (1 << 17) + b"]", headers={**AUTH, "Content-Type": "application/json"}), 413,
     "body_too_large"),
])
def test_bad_requests_get_their_status_and_an_openai_error_body(client, request_kw, status, code):
    kw = {"headers": AUTH, **request_kw}
    r = client.post("/v1/completions", **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code


def test_models_health_metrics_and_unknown_routes(client):
    assert client.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models").status_code == 401  # the key guards everything but /health
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    before = client.get("/metrics", headers=AUTH).text
    client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 3, "temperature": 0},
                headers=AUTH)
    after = client.get("/metrics", headers=AUTH).text

    def value(text, name):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))

    assert value(after, "mtp_generation_tokens_total") - value(before, "mtp_generation_tokens_total") == 3
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert client.get("/v1/completions", headers=AUTH).status_code == 405


def test_a_counter_kept_elsewhere_is_read_when_metrics_are():
    """e.g. the prompt tokens a llama.cpp server's rows read from each other's cells (--prompt-cache)."""
    metrics, kept = Metrics(), [3]
    metrics.count("mtp_prompt_tokens_reused", "reused", lambda: kept[0])
    kept[0] = 40
    assert "mtp_prompt_tokens_reused_total 40.0" in metrics.text().decode()


def test_a_model_without_a_chat_template_refuses_chat_with_400(model):
    api, _ = make_api(model, chat_template=False)
    with TestClient(api.app()) as c:
        r = c.post("/v1/chat/completions", headers=AUTH,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_a_handler_that_raises_answers_500_and_the_server_goes_on(model, monkeypatch):
    api, _ = make_api(model)

    def broken(p):
        raise RuntimeError("boom")

    monkeypatch.setattr(api, "encode", broken)
    with TestClient(api.app(), raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "boom" not in r.text  # no internals leak to the client
        assert c.get("/health").json()["status"] == "ok"
        assert 'route="completions",status="500"' in c.get("/metrics", headers=AUTH).text


def test_a_draining_server_answers_503_on_health(model):
    api, _ = make_api(model)
    with TestClient(api.app()) as c:
        api.scheduler.drain(0.1)
        assert c.get("/health").status_code == 503


def test_models_retrieve_and_routes_with_a_trailing_slash(client):
    """The openai client's ``models.retrieve`` is ``GET /v1/models/{id}``; ``POST /v1/chat/completions/`` is the
    same route (a 307 redirect is not followed for POST by clients)."""
    r = client.get("/v1/models/tiny", headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == "tiny" and r.json()["object"] == "model"
    missing = client.get("/v1/models/other", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/models/tiny").status_code == 401
    r = client.post("/v1/chat/completions/", headers=AUTH, follow_redirects=False,
                    json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text


def test_tokens_per_second_is_zero_while_idle(client):
    import time

    client.post("/v1/completions", json={"model": "tiny", "prompt": "a b", "max_tokens": 6, "temperature": 0},
                headers=AUTH)
    for _ in range(50):  # the worker retires the row just after the answer leaves
        text = client.get("/metrics", headers=AUTH).text
        value = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith("mtp_tokens_per_second ")]
        if value == [0.0]:
            break
        time.sleep(0.05)
    assert value == [0.0]
