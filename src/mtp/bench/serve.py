"""``mtp bench serve``: ``mtp serve`` under load, as HTTP clients see it, speculative methods beside plain.

Per method, a server process on a free loopback port (real model) and asyncio clients (httpx, streaming):

1. **scaling**: the same ``--requests`` streamed requests at temperature 0 sent by 1 client, then shared by
   ``c`` concurrent clients (``--concurrency``): aggregate tokens/s, time to first token and time per output
   token (p50 / p95 over requests);
2. **soak** (``--duration`` seconds, ``--soak-clients`` clients): streamed and plain requests with
   ``--bad-share`` of them malformed, oversized or out of range, one valid request in ten at a field's edge
   (temperature 1e-300, top_p 1e-300, ...), and beside them a slow-loris client (its body a byte at a time);
   every valid one must complete, every bad one get its 4xx, the slow one a 408 within the server's
   ``--read-timeout``, none a 5xx; the server's resident memory at the end against after warm-up.

Afterwards (servers stopped) each distinct prompt is decoded alone in this process, as ``mtp generate`` does
(same method, dtype, heads, batch 1): the share of the servers' temperature-0 answers identical to it.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

from mtp.config import HEAD_METHODS
from mtp.errors import UserError


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def _request(client, url: str, model: str, prompt: str, max_tokens: int, stream: bool = True) -> dict:
    """One valid chat request: its text, tokens, finish, time to first token and per output token."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    out = {"prompt": prompt, "status": None, "text": "", "tokens": 0, "finish": None, "ttft": None, "tpot": None,
           "complete": False}
    if not stream:
        r = await client.post(url + "/v1/chat/completions", json=body)
        out["status"] = r.status_code
        if r.status_code == 200:
            data = r.json()
            out.update(text=data["choices"][0]["message"]["content"], tokens=data["usage"]["completion_tokens"],
                       finish=data["choices"][0]["finish_reason"], complete=True,
                       ttft=time.perf_counter() - start)
        return out
    first = last = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                out["complete"] = out["finish"] is not None
                break
            event = json.loads(data)
            if "error" in event:
                out["error"] = event["error"]
                break
            if event.get("usage"):
                out["tokens"] = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    out["text"] += piece
                if choice.get("finish_reason"):
                    out["finish"] = choice["finish_reason"]
    if first is not None:
        out["ttft"] = first - start
        if out["tokens"] > 1:
            out["tpot"] = (last - first) / (out["tokens"] - 1)
    return out


# Every wait on a server is bounded: it ends a request after its --timeout (600 s, waiting included) with an error,
# so a client waiting longer than that for the next bytes (or 30 s for a connection) has met a stuck server.
CLIENT_TIMEOUT, CONNECT_TIMEOUT = 630.0, 30.0  # seconds

BAD_KINDS = ("malformed-json", "oversized-body", "wrong-type", "unknown-parameter", "unknown-model",
             "max-tokens-too-large", "prompt-too-long", "number-overflow", "boolean-as-number")

# Valid requests at the edges of the numbers a field takes: each must be answered (200, a complete answer)
EXTREME = {
    "temperature-1e-300": {"temperature": 1e-300},  # greedy in the limit (no NaN, no error)
    "temperature-5e-324": {"temperature": 5e-324},  # the smallest positive double
    "top-p-1e-300": {"temperature": 1.0, "top_p": 1e-300},
    "temperature-2": {"temperature": 2.0, "seed": 2 ** 63 - 1},
    "max-tokens-1": {"max_tokens": 1},
}


async def _bad_request(client, url: str, model: str, kind: str, body_limit: int, prompt_limit: int) -> dict:
    good = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    content = None
    if kind == "malformed-json":
        content = b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "Hi"'
    elif kind == "oversized-body":
        content = json.dumps({**good, "messages": [{"role": "user", "content": "x" * (body_limit + 1)}]}).encode()
    elif kind == "wrong-type":
        content = json.dumps({**good, "temperature": "hot"}).encode()
    elif kind == "unknown-parameter":
        content = json.dumps({**good, "frobnicate": True}).encode()
    elif kind == "unknown-model":
        content = json.dumps({**good, "model": "no-such-model"}).encode()
    elif kind == "max-tokens-too-large":
        content = json.dumps({**good, "max_tokens": 10 ** 7}).encode()
    elif kind == "prompt-too-long":
        content = json.dumps({**good, "messages": [{"role": "user", "content": "word " * (prompt_limit + 10)}]}).encode()
    elif kind == "number-overflow":  # 1e999 is infinity to a JSON parser
        content = json.dumps(good).encode()[:-1] + b', "temperature": 1e999}'
    elif kind == "boolean-as-number":
        content = json.dumps({**good, "n": True}).encode()
    r = await client.post(url + "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    return {"kind": kind, "status": r.status_code}


async def _scaling(url: str, model: str, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """The same ``requests`` requests (the prompts in order, cycled) shared by ``clients`` concurrent clients,
    each sending its next one when the last is answered."""
    import httpx

    todo = [prompts[i % len(prompts)] for i in range(requests)]
    rows: list[dict] = []
    timeout = httpx.Timeout(CLIENT_TIMEOUT, connect=CONNECT_TIMEOUT)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker():
            while todo:
                prompt = todo.pop(0)
                try:
                    rows.append(await _request(client, url, model, prompt, max_tokens))
                except httpx.HTTPError as e:  # a time-out or a dropped connection: a failed request, counted
                    rows.append({"prompt": prompt, "status": 0, "complete": False, "error": f"{type(e).__name__}"})

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in rows if r["status"] == 200 and r["complete"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    return {"clients": clients, "requests": len(rows), "completed": len(ok), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": _pct(ttft, 0.5), "ttft_p95": _pct(ttft, 0.95),
            "tpot_p50": _pct(tpot, 0.5), "tpot_p95": _pct(tpot, 0.95), "answers": _answers(ok)}


def _answers(rows: list[dict]) -> list[list[str]]:
    return [[r["prompt"], r["text"]] for r in rows]


async def _extreme_request(client, url: str, model: str, kind: str, prompt: str) -> dict:
    """One valid request with a field at its edge (:data:`EXTREME`): answered completely, or a failure."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, **EXTREME[kind]}
    r = await client.post(url + "/v1/chat/completions", json=body)
    complete = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    return {"kind": kind, "status": r.status_code, "complete": complete}


async def _slow_client(url: str, body_limit: int, read_timeout: float, stop_at: float) -> list[dict]:
    """Slow-loris clients, one after another until ``stop_at``: headers, then the body one byte every
    ``read_timeout / 4`` s. Each should be answered 408 and cut off within about ``read_timeout`` s."""
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    out = []
    while time.monotonic() < stop_at:
        start = time.monotonic()
        reader, writer = await asyncio.open_connection(host, port)
        body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 200 + b'"}]}'
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        status, head = 0, b""
        try:
            for byte in body:  # a byte, then a quarter of the read time-out for the server to give up
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    head = await asyncio.wait_for(reader.read(64), read_timeout / 4)
                    break
                except TimeoutError:
                    continue
            else:  # the whole body went through: whatever the server answers
                head = await asyncio.wait_for(reader.read(64), read_timeout)
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            writer.close()
        if head.startswith(b"HTTP/1.1 "):
            status = int(head[9:12])
        out.append({"status": status, "seconds": time.monotonic() - start})
    return out


async def _soak(url: str, model: str, prompts: list[str], clients: int, duration: float, max_tokens: int,
                bad_share: float, body_limit: int, prompt_limit: int, seed: int, read_timeout: float = 30.0) -> dict:
    import httpx

    rng = random.Random(seed)
    plan = [rng.random() < bad_share for _ in range(100000)]
    counter = {"i": 0}
    valid, bad, failures, extreme = [], [], [], []
    stop_at = time.monotonic() + duration
    timeout = httpx.Timeout(CLIENT_TIMEOUT, connect=CONNECT_TIMEOUT)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(k: int):
            while time.monotonic() < stop_at:
                i = counter["i"]
                counter["i"] += 1
                try:
                    if plan[i % len(plan)]:
                        kind = BAD_KINDS[counter.setdefault("bad", 0) % len(BAD_KINDS)]  # every class in turn
                        counter["bad"] += 1
                        bad.append(await _bad_request(client, url, model, kind, body_limit, prompt_limit))
                    elif i % 10 == 5:  # one valid request in ten sits at a field's edge, every class in turn
                        kind = list(EXTREME)[counter.setdefault("extreme", 0) % len(EXTREME)]
                        counter["extreme"] += 1
                        extreme.append(await _extreme_request(client, url, model, kind, prompts[i % len(prompts)]))
                    else:
                        valid.append(await _request(client, url, model, prompts[i % len(prompts)], max_tokens,
                                                    stream=i % 2 == 0))
                except httpx.HTTPError as e:  # a dropped connection is a failure, not a crash of the bench
                    failures.append(f"{type(e).__name__}: {e}")

        start = time.perf_counter()
        *_, slow = await asyncio.gather(*(worker(k) for k in range(clients)),
                                        _slow_client(url, body_limit, read_timeout, stop_at))
        wall = time.perf_counter() - start
    statuses: dict[str, int] = {}
    for r in valid + bad + extreme:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    ok = [r for r in valid if r["status"] == 200 and r["complete"]]
    bad_4xx = [r for r in bad if 400 <= r["status"] < 500]
    return {"clients": clients, "seconds": wall, "valid": len(valid), "valid_completed": len(ok),
            "bad": len(bad), "bad_answered_4xx": len(bad_4xx), "bad_by_kind": _by_kind(bad),
            "status_counts": statuses, "server_errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
            "extreme": len(extreme), "extreme_completed": sum(r["complete"] for r in extreme),
            "extreme_by_kind": _by_kind(extreme), "slow_clients": len(slow),
            "slow_cut_408": sum(r["status"] == 408 for r in slow),
            "slow_seconds_max": max((r["seconds"] for r in slow), default=None),
            "connection_failures": failures[:10], "tokens": sum(r["tokens"] for r in ok),
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "answers": _answers(ok)}


def _by_kind(bad: list[dict]) -> dict:
    out: dict[str, list[int]] = {}
    for r in bad:
        out.setdefault(r["kind"], []).append(r["status"])
    return {k: sorted(set(v)) for k, v in out.items()}


def _references(cfg, method: str, prompts: list[str]) -> dict[str, str]:
    """What `mtp generate` prints for each prompt (same model, heads, method, dtype; alone, temperature 0)."""
    from mtp.config import DraftOptions
    from mtp.decode.run import encode_prompt, eos_ids, open_target

    opts = DraftOptions(seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, backend=cfg.backend, target=cfg.target)
    loaded = open_target(opts, cfg.model, cfg.heads, [method], {})
    backbone, tokenizer = loaded.backbone, loaded.tokenizer
    decoder, _ = loaded.decoder(method, opts)
    eos = eos_ids(backbone, tokenizer)
    out = {}
    for p in prompts:
        row = decoder.generate([encode_prompt(tokenizer, p)], cfg.max_tokens, eos).rows[0]
        out[p] = tokenizer.decode(row.tokens, skip_special_tokens=True)
    return out


def bench_serve(cfg, command: str = "") -> dict:
    from mtp.analysis.run import machine_info
    from mtp.prompts import load_prompts
    from mtp.serve.process import ServerProcess

    from mtp.backbones import backbone_config, check_context

    model_config = backbone_config(cfg.model)
    check_context(cfg.max_tokens, "--max-tokens", model_config)  # before any server starts
    server_max_tokens = min(max(cfg.max_tokens, 256), getattr(model_config, "max_position_embeddings", None) or 256)
    prompts = load_prompts(cfg.prompts, "eval", cfg.limit, cfg.seed)
    if not prompts:
        raise UserError(f"no prompts in {cfg.prompts!r}")
    say = (lambda *a: None) if cfg.quiet else (lambda m: print(f"bench serve: {m}", file=sys.stderr, flush=True))
    result = {"command": command, "machine": machine_info(cfg.device), "config": cfg.to_dict(), "methods": {}}
    body_limit, prompt_limit = 65536, 2048
    read_timeout = min(30.0, max(2.0, cfg.duration / 6))  # a slow-loris client is cut several times in a soak
    for method in cfg.methods:
        args = ["--model", cfg.model, "--dtype", cfg.dtype, "--device", cfg.device, "--method", method,
                "--max-batch", str(cfg.max_batch), "--max-queue", str(cfg.max_queue), "--max-tokens",
                str(server_max_tokens), "--max-body-bytes", str(body_limit), "--max-prompt-tokens",
                str(prompt_limit), "--backend", cfg.backend, "--target", cfg.target, "--quiet",
                "--read-timeout", f"{read_timeout:g}"]
        if method in HEAD_METHODS:
            args += ["--heads", cfg.heads]
        say(f"{method}: starting the server")
        server = ServerProcess(args)
        try:
            runs = _scaling_runs(server.url, cfg, prompts, lambda c: say(f"{method}: {c} concurrent client(s)"))
            rss_warm = server.rss_bytes()  # after the scaling runs: the largest batches have been allocated
            soak, rss_series = None, []
            if cfg.duration > 0 and (method == cfg.methods[-1] or cfg.soak_all):
                say(f"{method}: {cfg.soak_clients} clients for {cfg.duration:g} s, {cfg.bad_share:.0%} bad requests")
                soak = asyncio.run(_with_rss(server, rss_series, _soak(
                    server.url, cfg.model, prompts, cfg.soak_clients, cfg.duration, cfg.max_tokens, cfg.bad_share,
                    body_limit, prompt_limit, cfg.seed, read_timeout)))
            rss_end = server.rss_bytes()
        finally:
            code, log = server.stop()
        entry = {"scaling": runs, "soak": soak, "rss_warm_mb": rss_warm and rss_warm / 2**20,
                 "rss_end_mb": rss_end and rss_end / 2**20, "rss_soak_mb": [round(x / 2**20) for x in rss_series],
                 "exit_status": code,
                 "server_tracebacks": log.count("Traceback")}
        result["methods"][method] = entry
    if cfg.backend == "llama.cpp":
        say("llama-server, plain, on the same GGUF and threads, the same clients (its own scaling, for reference)")
        result["llama_server"] = _llama_server_scaling(cfg, prompts, server_max_tokens, prompt_limit)
    say("decoding each prompt alone, as `mtp generate` does, for the identity check")
    for method, entry in result["methods"].items():
        runs = {f"{c} client(s)": run.pop("answers") for c, run in entry["scaling"].items()}
        if entry["soak"]:
            runs["soak"] = entry["soak"].pop("answers")
        refs = _references(cfg, method, sorted({p for answers in runs.values() for p, _ in answers}))
        entry["identical"] = {}
        for name, answers in runs.items():
            same = [text == refs[p] for p, text in answers]
            entry["identical"][name] = {"answers": len(same), "identical": sum(same),
                                        "differing_prompts": sorted({p for (p, _), s in zip(answers, same) if not s})[:3]}
    return result


def _llama_server_scaling(cfg, prompts: list[str], max_tokens: int, prompt_limit: int) -> dict:
    """llama.cpp's own server with --max-batch slots (plain decoding, one unified KV cache of what those slots
    need) under the same scaling runs: what the llama.cpp backend's scaling is measured against."""
    import tempfile

    from mtp.decode.executors.llamacpp import default_threads
    from mtp.engines import llamacpp
    from mtp.serve.app import llama_ctx_size
    from mtp.engines.targets import target_gguf

    server = llamacpp.require_server()
    port = llamacpp.free_port()
    ctx = llama_ctx_size(cfg.max_batch, prompt_limit, max_tokens)  # what `mtp serve --backend llama.cpp` holds
    cmd = [str(server), "-m", str(target_gguf(cfg.model, cfg.target)), "--host", "127.0.0.1", "--port", str(port),
           "-c", str(ctx), "-np", str(cfg.max_batch), "--kv-unified", "-t", str(default_threads()), "--no-webui"]
    with tempfile.TemporaryDirectory() as tmp, llamacpp.Server(cmd, port, Path(tmp) / "llama-server.log") as srv:
        runs = _scaling_runs(srv.url, cfg, prompts)
    for run in runs.values():
        run.pop("answers")
    return {"command": " ".join(cmd), "scaling": runs}


def _scaling_runs(url: str, cfg, prompts: list[str], announce=None) -> dict:
    """A warm-up, then the scaling run at each of --concurrency, each with its tokens/s against one client's."""
    asyncio.run(_scaling(url, cfg.model, prompts, 2, 2, 8))  # warm-up
    runs = {}
    for c in cfg.concurrency:
        if announce:
            announce(c)
        runs[str(c)] = asyncio.run(_scaling(url, cfg.model, prompts, c, cfg.requests, cfg.max_tokens))
    one = runs.get("1")
    for run in runs.values():
        if one:
            run["vs_one_client"] = run["tokens_per_s"] / one["tokens_per_s"]
    return runs


async def _with_rss(server, series: list, work):
    """Run ``work``, sampling the server's resident memory every 5 s into ``series``."""
    task = asyncio.ensure_future(work)
    while not task.done():
        rss = server.rss_bytes()
        if rss:
            series.append(rss)
        await asyncio.wait({task}, timeout=5.0)
    return task.result()


def format_bench_serve(r: dict) -> str:
    cfg, m = r["config"], r["machine"]
    runs_on = f"GGUF {cfg['target']} on llama.cpp" if cfg.get("backend") == "llama.cpp" else cfg["dtype"]
    lines = [f"mtp serve under load: {cfg['model']} {runs_on}, {cfg['max_tokens']} new tokens per request, "
             f"temperature 0, --max-batch {cfg['max_batch']}; {m['cpu']} ({m['cpu_threads']} threads)", "",
             "| method | clients | requests | tokens/s | vs 1 client | TTFT p50 / p95 (s) | per token p50 / p95 (ms) |",
             "|---|---:|---:|---:|---:|---|---|"]
    f = lambda x, k=1.0, d=2: "-" if x is None else f"{x * k:.{d}f}"  # noqa: E731
    for method, e in r["methods"].items():
        for c, run in e["scaling"].items():
            lines.append(f"| {method} | {c} | {run['completed']}/{run['requests']} | {run['tokens_per_s']:.1f} | "
                         f"{run.get('vs_one_client', 1):.2f}x | {f(run['ttft_p50'])} / {f(run['ttft_p95'])} | "
                         f"{f(run['tpot_p50'], 1000, 1)} / {f(run['tpot_p95'], 1000, 1)} |")
    if r.get("llama_server"):
        for c, run in r["llama_server"]["scaling"].items():
            lines.append(f"| llama-server plain (reference) | {c} | {run['completed']}/{run['requests']} | "
                         f"{run['tokens_per_s']:.1f} | {run.get('vs_one_client', 1):.2f}x | {f(run['ttft_p50'])} / "
                         f"{f(run['ttft_p95'])} | {f(run['tpot_p50'], 1000, 1)} / {f(run['tpot_p95'], 1000, 1)} |")
    methods = list(r["methods"])
    if "plain" in r["methods"]:
        for method in methods:
            if method == "plain":
                continue
            for c in r["methods"][method]["scaling"]:
                base = r["methods"]["plain"]["scaling"].get(c)
                if base:
                    ratio = r["methods"][method]["scaling"][c]["tokens_per_s"] / base["tokens_per_s"]
                    lines.append(f"{method} vs plain at {c} client(s): {ratio:.2f}x tokens/s")
    for method, e in r["methods"].items():
        s = e["soak"]
        same = ", ".join(f"{v['identical']}/{v['answers']} ({k})" for k, v in e["identical"].items())
        peak = f", peak {max(e['rss_soak_mb'])} MB during the soak" if e.get("rss_soak_mb") else ""
        lines.append(f"{method}: temperature-0 answers identical to `mtp generate`: {same}; RSS "
                     f"{f(e['rss_warm_mb'], d=0)} MB after warm-up, {f(e['rss_end_mb'], d=0)} MB at the end{peak}; "
                     f"server exit status {e['exit_status']}, {e['server_tracebacks']} tracebacks")
        if s:
            lines.append(f"{method} soak, {s['clients']} clients for {s['seconds']:.0f} s: {s['valid_completed']}/"
                         f"{s['valid']} valid requests completed, {s['bad_answered_4xx']}/{s['bad']} bad ones got a "
                         f"4xx ({', '.join(f'{k} {v}' for k, v in s['bad_by_kind'].items())}), "
                         f"{s['server_errors_5xx']} 5xx, {len(s['connection_failures'])} dropped connections, "
                         f"{s['tokens_per_s']:.1f} tokens/s")
            if "extreme" in s:
                slowest = f", cut after {s['slow_seconds_max']:.1f} s at most" if s["slow_clients"] else ""
                lines.append(f"{method} soak: {s['extreme_completed']}/{s['extreme']} valid requests at a field's edge "
                             f"answered ({', '.join(s['extreme_by_kind'])}); {s['slow_cut_408']}/{s['slow_clients']} "
                             f"slow-loris clients answered 408{slowest}")
    return "\n".join(lines)
